"""What each Dask worker of a local cluster is given: its environment (thread caps, the run's
Prefect API) and, on a machine with several GPUs, its own GPU (tested on the CPU by asking each
worker which device it would render on)."""

from __future__ import annotations

import pytest

from tasks.executors import task_runner_for, worker_device
from tasks.generate import GenerateSettings


def test_threads_and_explicit_devices_are_left_as_given():
    assert worker_device("auto", gpus=4) == "auto"  # not inside a Dask worker
    assert worker_device("cuda:3", gpus=4) == "cuda:3"
    assert worker_device("cpu", gpus=4) == "cpu"


@pytest.mark.timeout(300)
def test_each_local_worker_gets_its_gpu_and_the_runs_environment(prefect_harness):
    import distributed
    from prefect.settings import PREFECT_API_URL

    runner = task_runner_for(GenerateSettings(executor="dask", workers=2, device="cpu", torch_threads=1))
    kwargs = dict(runner.cluster_kwargs)
    with distributed.LocalCluster(**kwargs) as cluster, distributed.Client(cluster) as client:
        client.wait_for_workers(2)

        def given() -> dict:
            import os

            from tasks.executors import worker_device

            return {"device": worker_device("auto", gpus=2), "cuda": worker_device("cuda", gpus=3),
                    "threads": os.environ.get("OMP_NUM_THREADS"), "torch": os.environ.get("ASD_TORCH_THREADS"),
                    "api": os.environ.get("PREFECT_API_URL")}

        workers = list(client.scheduler_info()["workers"])
        seen = {w: client.submit(given, workers=[w], pure=False).result() for w in workers}
    assert sorted(v["device"] for v in seen.values()) == ["cuda:0", "cuda:1"]  # one GPU each, not both cuda:0
    assert sorted(v["cuda"] for v in seen.values()) == ["cuda:0", "cuda:1"]
    assert all(v["threads"] == "1" and v["torch"] == "1" for v in seen.values())
    assert all(v["api"].rstrip("/") == PREFECT_API_URL.value().rstrip("/") for v in seen.values())  # this run's API
