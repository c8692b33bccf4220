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

            return {
                "device": worker_device("auto", gpus=2),
                "cuda": worker_device("cuda", gpus=3),
                "threads": os.environ.get("OMP_NUM_THREADS"),
                "torch": os.environ.get("ASD_TORCH_THREADS"),
                "api": os.environ.get("PREFECT_API_URL"),
            }

        workers = list(client.scheduler_info()["workers"])
        seen = {w: client.submit(given, workers=[w], pure=False).result() for w in workers}
    assert sorted(v["device"] for v in seen.values()) == ["cuda:0", "cuda:1"]  # one GPU each, not both cuda:0
    assert sorted(v["cuda"] for v in seen.values()) == ["cuda:0", "cuda:1"]
    assert all(v["threads"] == "1" and v["torch"] == "1" for v in seen.values())
    assert all(
        v["api"].rstrip("/") == PREFECT_API_URL.value().rstrip("/") for v in seen.values()
    )  # this run's API


def test_eight_fake_gpus_each_get_one_worker_in_both_cluster_layouts():
    """dask-cuda gives worker k CUDA_VISIBLE_DEVICES rotated to start at GPU k: the worker must take
    its first visible device (taking index k of the rotated list put 8 workers on GPUs 0,2,4,6,0,2,4,6).
    Our own LocalCluster's workers see every GPU and take theirs by name."""
    n = 8
    physical = []
    for k in range(n):
        visible = [str((k + i) % n) for i in range(n)]
        dev = worker_device("auto", gpus=n, worker_name=k, by_name=False, visible=",".join(visible))
        physical.append(visible[int(dev.split(":")[1])])
    assert sorted(physical) == [str(i) for i in range(n)]  # every GPU busy, none twice
    by_name = [worker_device("cuda", gpus=n, worker_name=k, by_name=True) for k in range(n)]
    assert by_name == [f"cuda:{k}" for k in range(n)]
    # a worker pinned by hand to one GPU; a CPU machine; an explicit device
    assert worker_device("auto", gpus=1, worker_name="gpu-node-3", by_name=False, visible="5") == "cuda:0"
    assert worker_device("auto", gpus=0, worker_name=2, by_name=False, visible="") == "auto"
    assert worker_device("cuda:5", gpus=n, worker_name=2, by_name=True) == "cuda:5"


def test_dask_cuda_workers_get_the_runs_environment_through_their_nannies():
    """dask-cuda replaces a worker's `env`: the thread caps and the Prefect API travel through Dask's
    nanny environment too."""
    import dask

    from tasks.executors import through_nannies, worker_environment

    env = worker_environment(GenerateSettings(executor="dask", workers=4, torch_threads=2), gpu_by_name=False)
    assert env["OMP_NUM_THREADS"] == "2" and "ASD_GPU_BY_WORKER_NAME" not in env
    with dask.config.set({}):
        through_nannies(env)
        assert dask.config.get("distributed.nanny.pre-spawn-environ")["ASD_TORCH_THREADS"] == "2"


@pytest.mark.timeout(300)
def test_the_fan_out_window_follows_the_clusters_real_workers(prefect_harness):
    """With an existing cluster of 3 workers and the default workers=1, the fan-out keeps 4 tasks a
    worker in flight (12), not 4: every worker is fed."""
    import distributed
    from prefect import flow, task
    from prefect_dask import DaskTaskRunner

    from tasks.executors import MAX_IN_FLIGHT_PER_WORKER, fan_out, worker_count

    @task
    def square(x: int) -> int:
        return x * x

    with distributed.LocalCluster(
        n_workers=3, threads_per_worker=1, processes=False, dashboard_address=None
    ) as cluster:
        settings = GenerateSettings(executor="dask", dask_address=cluster.scheduler_address)
        assert settings.workers == 1

        @flow(task_runner=DaskTaskRunner(address=cluster.scheduler_address))
        def run() -> tuple[int, list[int]]:
            return worker_count(settings), sorted(r for _, r in fan_out(square.submit, range(30), settings))

        count, squares = run()
    assert count == 3 and 3 * MAX_IN_FLIGHT_PER_WORKER == 12
    assert squares == sorted(x * x for x in range(30))
