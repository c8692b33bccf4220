"""Where shard tasks run: threads of this process, or Dask worker processes (a local cluster,
or an existing scheduler by address), chosen per run from a stage's settings (`executor`, `workers`, `dask_address`, `torch_threads`,
`device`)."""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from prefect.futures import as_completed
from prefect.task_runners import ThreadPoolTaskRunner

MAX_IN_FLIGHT_PER_WORKER = (
    4  # tasks a fan-out keeps submitted per worker (a straggler or lost worker costs little)
)
WORKER_COUNT_EVERY_S = 10.0  # how often a fan-out asks a Dask scheduler how many workers it has now
T = TypeVar("T")
log = logging.getLogger("asd.executors")


def worker_count(settings: Any) -> int:
    """Workers the running flow's task runner really has: on Dask, the scheduler's live workers
    (an existing cluster or dask-cuda's one per GPU, whatever `workers` says; at least one while
    none has joined yet); on threads, `workers`."""
    if settings.executor != "dask":
        return settings.workers
    from prefect.context import FlowRunContext

    runner = getattr(FlowRunContext.get(), "task_runner", None)
    client = getattr(runner, "client", None) if runner is not None else None
    if client is None:
        return settings.workers
    try:
        info = client.scheduler_info(n_workers=-1)
    except (OSError, TimeoutError) as exc:  # the scheduler is busy or gone: keep the configured count
        log.warning(
            "could not ask the Dask scheduler for its workers (%s); sizing the fan-out by workers=%d",
            exc,
            settings.workers,
        )
        return settings.workers
    return max(1, len(info.get("workers") or {}) or int(info.get("n_workers") or 0))


def fan_out(
    submit: Callable[[T], Any], items: Iterable[T], settings: Any, annotate: bool = False
) -> Iterator[tuple[T, Any]]:
    """The one fan-out of every stage: `submit(item)` (a Prefect task's `.submit`) for each item,
    at most `MAX_IN_FLIGHT_PER_WORKER` per live worker in flight (the count re-read from a Dask
    scheduler every `WORKER_COUNT_EVERY_S`, so workers that join are fed), items pulled lazily;
    yields (item, result) as each task finishes. A task that failed after its retries raises
    here. `annotate`: GPU shards ask each for one GPU (`gpu_annotation`)."""
    pending = iter(items)
    running: dict[Any, T] = {}
    window, counted_at, exhausted = MAX_IN_FLIGHT_PER_WORKER * worker_count(settings), time.monotonic(), False
    while True:
        if time.monotonic() - counted_at > WORKER_COUNT_EVERY_S:
            window, counted_at = MAX_IN_FLIGHT_PER_WORKER * worker_count(settings), time.monotonic()
        with gpu_annotation(settings) if annotate else contextlib.nullcontext():
            while not exhausted and len(running) < window:
                item = next(pending, _END)
                if item is _END:
                    exhausted = True
                else:
                    running[submit(item)] = item
        if not running:
            return
        finished = next(as_completed(list(running)))
        yield running.pop(finished), finished.result()


_END: Any = object()


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


def worker_environment(settings: Any, gpu_by_name: bool) -> dict[str, str]:
    """What the workers this process starts need in their environment: CPU threads split between
    them (else N workers x all cores contend), this run's Prefect API (else each would start a
    temporary server of its own), and whether a worker takes its GPU by its name."""
    threads = str(settings.torch_threads or max(1, (os.cpu_count() or 1) // settings.workers))
    env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "ASD_TORCH_THREADS": threads}
    api = current_api_url()
    if api:
        env["PREFECT_API_URL"] = api
    if gpu_by_name:  # read back by worker_device, through the typed environment (RuntimeSettings)
        env["ASD_GPU_BY_WORKER_NAME"] = "1"
    return env


def through_nannies(env: dict[str, str]) -> None:
    """`env` set by every nanny this process starts before it spawns its worker: dask-cuda's
    LocalCUDACluster replaces a worker's `env` with its own CUDA_VISIBLE_DEVICES, so the API URL
    and thread caps would be lost if they travelled there alone."""
    import dask

    dask.config.set({f"distributed.nanny.pre-spawn-environ.{k}": v for k, v in env.items()})


def task_runner_for(settings: Any):
    """ThreadPoolTaskRunner, or prefect-dask's DaskTaskRunner: `dask_address` connects to an
    existing cluster (`dask scheduler` + `dask worker --resources GPU=1` per GPU, or `dask cuda
    worker`); without one, a LocalCluster of `workers` single-threaded processes (one per GPU,
    each with a GPU resource, when the job runs on GPUs; dask-cuda's LocalCUDACluster, one
    worker per GPU whatever `workers` says, when it is installed). The fan-out sizes its window
    from the workers the cluster really has (`worker_count`)."""
    if settings.executor == "threads":
        return ThreadPoolTaskRunner(max_workers=settings.workers)
    from prefect_dask import DaskTaskRunner

    if settings.dask_address:
        return DaskTaskRunner(address=settings.dask_address)
    keep_worker_heap()
    # without dask-cuda: a LocalCluster (below) whose workers take their GPU by name (worker_device)
    if uses_gpu(settings) and importlib.util.find_spec("dask_cuda") is not None:
        env = worker_environment(settings, gpu_by_name=False)
        through_nannies(env)
        return DaskTaskRunner(
            cluster_class="dask_cuda.LocalCUDACluster",  # pins one GPU per worker
            cluster_kwargs={
                "threads_per_worker": 1,
                "resources": {"GPU": 1},
                "env": env,
                "dashboard_address": None,
            },
        )
    env = worker_environment(settings, gpu_by_name=True)
    kwargs = {
        "n_workers": settings.workers,
        "threads_per_worker": 1,
        "processes": True,
        "dashboard_address": None,
        "env": env,
    }
    if uses_gpu(settings):
        kwargs["resources"] = {"GPU": 1}
    return DaskTaskRunner(cluster_class="distributed.LocalCluster", cluster_kwargs=kwargs)


def dask_worker_name() -> str | int | None:
    """This Dask worker's name, or None outside a Dask worker."""
    try:
        from distributed import get_worker

        return get_worker().name
    except (ImportError, ValueError):
        return None


def worker_device(
    device: str,
    gpus: int | None = None,
    worker_name: str | int | None = None,
    by_name: bool | None = None,
    visible: str | None = None,
) -> str:
    """The device this process renders on, for "auto" and "cuda" inside a Dask worker:
    - a worker of our own LocalCluster (`ASD_GPU_BY_WORKER_NAME`, named 0, 1, ...) sees every GPU
      and takes `cuda:<name mod GPUs>`, so N workers use N GPUs, not all cuda:0;
    - a worker with CUDA_VISIBLE_DEVICES set (dask-cuda's LocalCUDACluster or `dask cuda worker`,
      which give worker k the list rotated to start at its own GPU, or a worker you pinned) takes
      its first visible device, `cuda:0`;
    - elsewhere (threads, an explicit cuda:N, a CPU machine) as given.
    `gpus`, `worker_name`, `by_name` (`ASD_GPU_BY_WORKER_NAME`), `visible` (CUDA_VISIBLE_DEVICES):
    this process's, unless given (tests lay out 8 fake GPUs)."""
    if device not in ("auto", "cuda"):
        return device
    name = dask_worker_name() if worker_name is None else worker_name
    if name is None:
        return device
    if gpus is None:
        import torch

        gpus = torch.cuda.device_count()
    if gpus < 1:
        return device
    if by_name is None:
        from data_manifests.runtime import runtime

        by_name = runtime().gpu_by_worker_name
    if by_name:
        return f"cuda:{int(name) % gpus}" if gpus > 1 and str(name).isdigit() else device
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "") if visible is None else visible
    return "cuda:0" if visible.strip() else device


@contextlib.contextmanager
def gpu_annotation(settings: Any) -> Iterator[None]:
    """Each GPU shard asks for one GPU, so a Dask worker runs as many as it has GPUs."""
    if settings.executor == "dask" and uses_gpu(settings):
        import dask

        with dask.annotate(resources={"GPU": 1}):
            yield
    else:
        yield
