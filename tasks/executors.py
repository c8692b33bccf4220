"""Where shard tasks run: threads of this process, or Dask worker processes (a local cluster,
or an existing scheduler by address), chosen per run from a stage's settings (`executor`, `workers`, `dask_address`, `torch_threads`,
`device`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect.task_runners import ThreadPoolTaskRunner

MAX_IN_FLIGHT_PER_WORKER = 4  # tasks a fan-out keeps submitted per worker (a straggler or lost worker costs little)


def with_run_environment(settings: Any, update: dict[str, Any] | None = None) -> Any:
    """Fan-out settings as a run takes them: where they keep the default executor (threads) or
    Dask address (none), the run's environment's (`$ASD_EXECUTOR`, `$ASD_DASK_ADDRESS`), read
    where the run starts; plus `update`."""
    from data_manifests.runtime import runtime

    env = runtime()
    update = dict(update or {})
    for name in ("executor", "dask_address"):
        if getattr(settings, name) == type(settings).model_fields[name].default and getattr(env, name):
            update[name] = getattr(env, name)
    return settings.model_copy(update=update) if update else settings


def uses_gpu(settings: Any) -> bool:
    device = getattr(settings, "device", "cpu")
    if device.startswith("cuda"):
        return True
    if device == "auto":
        import torch

        return torch.cuda.is_available()
    return False


def current_api_url() -> str | None:
    """The Prefect API this process talks to (the temporary server's, in the embedded default)."""
    try:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            url = str(client.api_url)
    except Exception:  # noqa: BLE001 - no API reachable: workers fall back to their own default
        return None
    return url if url.startswith("http") else None


def keep_worker_heap() -> None:
    """Dask's nannies start workers with `MALLOC_TRIM_THRESHOLD_=65536` (glibc hands freed memory
    back at once), so every decoded image's buffers are fresh pages to fault in again: ingest on 2
    local workers decoded 95 images/s with it, 122 without, the same partitions in a process pool
    130 (2 cores). Unset for the workers this process starts (workers you start yourself: see the
    README's Several machines)."""
    import dask

    dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None})


def task_runner_for(settings: Any):
    """ThreadPoolTaskRunner, or prefect-dask's DaskTaskRunner: `dask_address` connects to an
    existing cluster (`dask scheduler` + `dask worker --resources GPU=1` per GPU, or `dask cuda
    worker`); without one, a LocalCluster of `workers` single-threaded processes (one per GPU,
    each with a GPU resource, when the job runs on GPUs; dask-cuda's LocalCUDACluster, pinning
    one GPU per worker, when it is installed)."""
    if settings.executor == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    # CPU threads split between the worker processes (else N workers x all cores contend)
    threads = str(settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.workers))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "ASD_TORCH_THREADS": threads}
    api = current_api_url()
    if api:  # workers report to this run's Prefect API (else each would start a temporary server of its own)
        env["PREFECT_API_URL"] = api
    keep_worker_heap()
    kwargs = {"n_workers": settings.workers, "threads_per_worker": 1, "processes": True,
              "dashboard_address": None, "env": env}
    if uses_gpu(settings):
        try:
            import dask_cuda  # noqa: F401

            return DaskTaskRunner(cluster_class="dask_cuda.LocalCUDACluster",  # pins one GPU per worker
                                  cluster_kwargs={"threads_per_worker": 1, "resources": {"GPU": 1}, "env": env,
                                                  "dashboard_address": None})
        except ImportError:
            kwargs["resources"] = {"GPU": 1}  # each worker pins its own GPU when it loads the model (worker_device)
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def worker_device(device: str, gpus: int | None = None) -> str:
    """The device this process renders on. In a worker of a local Dask cluster (named 0, 1, ...
    by `LocalCluster`) on a machine with several GPUs, "auto" and "cuda" mean the worker's own
    GPU, `cuda:<name mod GPUs>`, so N workers use N GPUs, not all cuda:0. Elsewhere (threads, a
    remote worker started with its own CUDA_VISIBLE_DEVICES, an explicit cuda:N) as given."""
    if device not in ("auto", "cuda"):
        return device
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus < 2:
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
    except (ImportError, ValueError):  # not inside a Dask worker
        return device
    return f"cuda:{int(name) % gpus}" if isinstance(name, int) or str(name).isdigit() else device


@contextlib.contextmanager
def gpu_annotation(settings: Any) -> Iterator[None]:
    """Each GPU shard asks for one GPU, so a Dask worker runs as many as it has GPUs."""
    if settings.executor == "dask" and uses_gpu(settings):
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield
