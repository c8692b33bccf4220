"""The run's environment, typed in one place: every `ASD_*` variable the pipeline reads, with
its default and what it does. Read where a run (or a worker's task) starts, by calling
`runtime()`; never at import. Settings of a stage travel in its settings model instead; these
are the machine's: where the store and the model cache are, how to reach S3, where the
dashboard is served, and the defaults a site sets for the generate stage's executor.

The fault points of the tests (`ASD_FAULT_AT`, `ASD_FAULT_ONCE_FILE`) are not settings: they
live with the one seam that reads them, `artifact_store.faults`."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class RuntimeSettings(BaseSettings):
    """`ASD_<FIELD>` in the environment (e.g. `ASD_STORE`, `ASD_S3_RETRIES`)."""

    model_config = SettingsConfigDict(env_prefix="ASD_", frozen=True, extra="ignore")

    store: str | None = Field(None, description="the store URL when none is given (default: ./asd-store)")
    store_block: str | None = Field(
        None, description="a Prefect Secret block holding a JSON object of s3fs options for the store"
    )
    s3_retries: int = Field(
        8, ge=0, description="S3 request attempts (botocore adaptive retries and s3fs backoff)"
    )
    cache: Path = Field(Path.home() / ".cache" / "asd", description="local cache of model versions")
    site_url: str | None = Field(
        None, description="where the store's _site/ is served (links in the Prefect UI)"
    )
    torch_threads: int | None = Field(
        None, ge=1, description="torch CPU threads in a worker process (set for Dask workers by the executor)"
    )
    gpu_by_worker_name: bool = Field(
        False,
        description="set by a local Dask cluster this pipeline starts for its "
        "workers: each sees every GPU and renders on cuda:<worker name mod GPUs>",
    )
    executor: Literal["threads", "dask"] | None = Field(
        None, description="the generate stage's executor when its settings leave it unset"
    )
    dask_address: str | None = Field(
        None, description="the generate stage's Dask scheduler when its settings leave it unset"
    )
    lease_s: float = Field(
        120.0,
        gt=0,
        description="a resumable job's lease on its pending version lasts this long "
        "without a heartbeat (renewed every third of it)",
    )
    lease_wait_s: float = Field(
        0.0,
        ge=0,
        description="how long a second run of a job waits for the run holding "
        "its lease (then reuses its commit); 0: refuse at once, naming the holder",
    )


def runtime() -> RuntimeSettings:
    """The environment as it is now (call where a run or a task starts)."""
    return RuntimeSettings()
