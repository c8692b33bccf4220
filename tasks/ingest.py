"""The ingest stage, in one place: its settings (and their adapter to the data engine's frozen
config), its identity (the sources' fingerprints and the output options), and its build: the
sources split into partitions (`data_engine.partitions`), one task per partition through the data
engine (reader -> downloader -> resizer -> writer) into its own shards and manifest fragment, on
threads of this process or Dask workers, then one merge (`data_engine.merge`) and one commit.
Partitions the newest version with the same options holds are copied from it."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from pydantic import field_validator, model_validator

from artifact_store import ArtifactRef, ArtifactStore, params_hash, redact_url, s3_storage_options
from asd_models.buckets import asd_buckets, kohya_buckets
from data_engine.engine import (
    IngestConfig,
    PartitionJob,
    PartitionResult,
    ingest_partition,
)
from data_engine.fetch import URL_SCHEMES, FetchOptions
from data_engine.merge import merge_partitions
from data_engine.partitions import Partition, plan_partitions
from data_engine.reuse import Reuse, has_download_failures, plan_reuse
from data_engine.samples import SampleSpec
from data_engine.sources import Source, SourceOptions, open_source
from data_manifests.demo import DEMO_SOURCE, demo_photos_folder
from data_manifests.settings import SEED_MAX, FanOutSettings, StageSettings, execution, output
from tasks.executors import fan_out, task_runner_for, with_run_environment
from tasks.progress import Progress, publish_table
from tasks.stage import Built, Inputs, Stage, StageRun, run_stage


class SourceSettings(StageSettings):
    """How inputs from strangers are read (folders, URL lists, shards): caps, downloads and the
    trust boundary. Shared by every stage that reads them (ingest, upscale)."""

    max_pixels: int = output(
        64_000_000,
        ge=1,
        le=178_956_970,
        description="decompression-bomb guard: reject larger images (at most PIL's own ceiling)",
    )
    download_concurrency: int = execution(16, ge=1, description="downloads in flight")
    per_host: int = execution(4, ge=1, description="concurrent requests per host")
    timeout_s: float = execution(20.0, gt=0, description="deadline of one request, headers included, seconds")
    retries: int = execution(3, ge=0, description="retries of a download that may pass (timeouts, 5xx, 429)")
    backoff_s: float = execution(0.5, ge=0, description="first retry delay, doubled each retry")
    max_bytes: int = output(
        64 << 20, ge=1, description="largest input accepted: download, file or shard member"
    )
    sample_max_bytes: int = output(
        128 << 20, ge=1, description="largest shard sample accepted: its members together (uncompressed)"
    )
    url_col: str | None = output(None, description="URL column of URL lists (default: url)")
    caption_col: str | None = output(
        None, description="caption column of URL lists (default: caption or text)"
    )
    caption_max_bytes: int = output(64 << 10, ge=1, description="largest caption file read (UTF-8 text only)")
    # the trust boundary: each of these widens what a stranger's input can reach (README: Trust boundary)
    allow_schemes: str = output(
        "http,https",
        description="URL schemes a URL list may use, comma-separated, "
        "from http, https, s3, file (s3 and file reach your machine's data)",
    )
    allow_private_addresses: bool = output(
        False,
        description="let URL lists reach loopback, private, link-local "
        "(cloud metadata) and other non-public addresses",
    )
    source_credentials: str | None = output(
        None,
        description="credentials for s3:// URL-list entries: an AWS "
        "profile name, or 'env' for the environment's (default: anonymous)",
    )
    follow_links_outside: bool = output(
        False, description="follow links in folder sources whose target lies outside the folder"
    )

    @field_validator("allow_schemes")
    @classmethod
    def _known_schemes(cls, value: str) -> str:
        schemes = [x.strip().lower() for x in value.split(",") if x.strip()]
        unknown = [x for x in schemes if x not in URL_SCHEMES]
        if unknown or not schemes:
            raise ValueError(
                f"unknown scheme(s) {', '.join(unknown) or '(none)'}: use some of {', '.join(URL_SCHEMES)}"
            )
        return ",".join(dict.fromkeys(schemes))

    @property
    def schemes(self) -> tuple[str, ...]:
        return tuple(self.allow_schemes.split(","))

    def source_options(self) -> SourceOptions:
        return SourceOptions(
            url_col=self.url_col,
            caption_col=self.caption_col,
            max_bytes=self.max_bytes,
            sample_max_bytes=self.sample_max_bytes,
            caption_max_bytes=self.caption_max_bytes,
            follow_links_outside=self.follow_links_outside,
        )

    def fetch_options(self) -> FetchOptions:
        return FetchOptions(
            timeout_s=self.timeout_s,
            retries=self.retries,
            backoff_s=self.backoff_s,
            max_bytes=self.max_bytes,
            concurrency=self.download_concurrency,
            per_host=self.per_host,
            allow_schemes=self.schemes,
            allow_private_addresses=self.allow_private_addresses,
            source_credentials=self.source_credentials,
        )


class IngestSettings(FanOutSettings, SourceSettings):
    """The data stage: sources -> validated, bucketed samples -> manifest + WebDataset shards,
    partition by partition on the executor (`executor`, `workers`, `dask_address`)."""

    bucket_table: Literal["asd", "kohya"] = output(
        "asd",
        description="asd: our 9-ratio table around bucket_base^2; kohya: every width from "
        "bucket_min_side to bucket_max_side with the largest height under bucket_max_area",
    )
    bucket_base: int = output(512, ge=64, description="bucket side for a square image, pixels")
    bucket_step: int = output(64, ge=8, description="bucket sides are multiples of this")
    bucket_min_side: int = output(256, ge=8, description="kohya table: shortest bucket side")
    bucket_max_side: int = output(1024, ge=8, description="kohya table: longest bucket side")
    bucket_max_area: int | None = output(
        None, ge=64, description="kohya table: max pixels (default bucket_base^2)"
    )
    crop: Literal["center", "random"] = output("center", description="crop after resize-to-cover")
    seed: int = output(
        0, ge=0, le=SEED_MAX, description="seed of random crops (per sample key: reproducible)"
    )
    min_side: int = output(64, ge=1, description="reject images whose shorter side is smaller")
    max_aspect: float = output(4.0, ge=1, description="reject images more elongated than this ratio")
    empty_caption: Literal["reject", "keep"] = output("reject", description="missing or blank captions")
    jpeg_quality: int = output(95, ge=1, le=100, description="JPEG quality of the bucket images")
    draft: bool = output(True, description="JPEG draft decoding at the smallest scale covering the bucket")
    resample: Literal["bilinear", "bicubic", "lanczos"] = output(
        "bilinear",
        description="resize filter (antialiased when shrinking); bilinear as diffusers' SD training",
    )
    shard_max_samples: int = output(1000, ge=1, description="samples per shard before it rotates")
    shard_max_bytes: int = output(256 << 20, ge=1 << 16, description="bytes per shard before it rotates")
    partition_inputs: int = output(
        1000,
        ge=1,
        description="inputs a partition (one task, its own shards) holds "
        "on average (half to twice this); a shard source is one partition a file",
    )

    @model_validator(mode="after")
    def _bucket_geometry(self) -> IngestSettings:
        if self.bucket_table == "asd" and self.bucket_base % self.bucket_step:
            raise ValueError(
                f"bucket_base {self.bucket_base} must be a multiple of bucket_step {self.bucket_step}"
            )
        if self.bucket_table == "kohya" and self.bucket_min_side > self.bucket_max_side:
            raise ValueError(
                f"bucket_min_side {self.bucket_min_side} > bucket_max_side {self.bucket_max_side}"
            )
        return self

    def engine_config(self) -> IngestConfig:
        """The data engine's frozen config (the one place it is built)."""
        buckets = (
            kohya_buckets(
                self.bucket_min_side,
                self.bucket_max_side,
                self.bucket_step,
                self.bucket_max_area or self.bucket_base**2,
            )
            if self.bucket_table == "kohya"
            else asd_buckets(self.bucket_base, self.bucket_step)
        )
        sample = SampleSpec(
            buckets=tuple((b.width, b.height) for b in buckets),
            min_side=self.min_side,
            max_pixels=self.max_pixels,
            max_aspect=self.max_aspect,
            crop=self.crop,
            seed=self.seed,
            jpeg_quality=self.jpeg_quality,
            draft=self.draft,
            resample=self.resample,
            max_bytes=self.max_bytes,
        )
        return IngestConfig(
            tuple(buckets),
            sample,
            self.fetch_options(),
            self.source_options(),
            self.empty_caption,
            self.shard_max_samples,
            self.shard_max_bytes,
            self.partition_inputs,
        )


@dataclass(frozen=True)
class Ingest(Stage):
    """Folders, URL lists and shards -> `datasets/<name>` (manifest + per-bucket shards).
    `asd-demo:photos` names the demo photos shipped inside the installed packages.
    `retry_failed`: a committed version of the same inputs with failed downloads is redone,
    downloading those again."""

    flow: ClassVar[str] = "asd-ingest"
    output_param: ClassVar[str] = "dataset"
    kind: ClassVar[str] = "datasets"
    builds_in_task: ClassVar[bool] = False  # it fans out over partition tasks of its own
    sources: tuple[str, ...]
    settings: IngestSettings = IngestSettings()
    retry_failed: bool = False

    def __post_init__(self) -> None:
        if not self.sources:
            raise ValueError("ingest needs at least one source (folder, URL list, or shards)")
        object.__setattr__(
            self, "sources", tuple(str(demo_photos_folder()) if s == DEMO_SOURCE else s for s in self.sources)
        )

    @cached_property
    def opened(self) -> list[Source]:
        """Each source opened once, for the identity and the build."""
        return [open_source(s, s3_storage_options(), self.settings.source_options()) for s in self.sources]

    def resolve(self, store: ArtifactStore) -> Inputs:
        fingerprints = [s.fingerprint() for s in self.opened]
        return Inputs(
            reads=[redact_url(s) for s in self.sources],
            parents=[],
            identity={"sources": fingerprints, "options": self.options_hash},
        )

    @property
    def options_hash(self) -> str:
        return params_hash(self.settings.identity())

    def keep(self, store: ArtifactStore, found: ArtifactRef) -> bool:
        return not (self.retry_failed and has_download_failures(store, found))

    def build(self, run: StageRun, inputs: Inputs) -> Built:
        store, dataset, logger = run.store, run.pending.ref.name, run.logger
        st = with_run_environment(self.settings)
        config = st.engine_config()
        job = PartitionJob(store.url, run.pending, config, s3_storage_options())
        results, previous = partitions_flow.with_options(task_runner=task_runner_for(st))(
            self, job, st.workers, run.rerun, st.executor
        )
        index = merge_partitions(store, run.writer, run.pending, results, dataset, config)
        if index["total_ok"] + index["total_failed"] == 0:
            raise ValueError(
                f"ingest sources {[redact_url(x) for x in self.sources]} hold no inputs at all "
                "(nothing committed)"
            )
        first_failures = index.pop("_first_failures")
        for key, source, error in first_failures:
            logger.warning("rejected %s (%s): %s", key, source, error)
        if index["total_failed"] > len(first_failures):
            logger.warning(
                "... %d rejected in all, by stage: %s", index["total_failed"], index["failed_by_stage"]
            )
        summary = {
            "samples_ok": index["total_ok"],
            "samples_failed": index["total_failed"],
            "reused": index["reused"],
            "failed_by_stage": index["failed_by_stage"],
            "partitions": index["partitions"],
            "partitions_copied": index["partitions_copied"],
            "buckets": {b: v["count"] for b, v in index["buckets"].items()},
        }
        logger.info(
            "%s: %d ok, %d failed (%s), %d reused, %d partitions, buckets %s",
            run.pending.ref,
            index["total_ok"],
            index["total_failed"],
            index["failed_by_stage"],
            index["reused"],
            index["partitions"],
            summary["buckets"],
        )
        return Built(
            params={
                "sources": [redact_url(x) for x in self.sources],
                **self.settings.model_dump(),
                "output_hash": self.options_hash,
                "retry_failed": self.retry_failed,
            },
            summary=summary,
            parents=[previous] if previous is not None and index["reused"] else [],
            extra={"index": index},
        )

    def publish(self, store: ArtifactStore, ref: str, built: Built | None) -> None:
        if built is not None:
            publish_table("bucket-stats", bucket_rows(built.extra["index"]), f"bucket statistics of {ref}")


@task(name="ingest-partition", task_run_name="partition-{part.index}", cache_policy=NO_CACHE)
def ingest_partition_task(job: PartitionJob, part: Partition, reuse: Reuse | None) -> PartitionResult:
    """One partition into its own shards and manifest fragment (on a thread or a Dask worker)."""
    return ingest_partition(job, part, reuse)


@flow(name="asd-ingest-partitions", log_prints=True, validate_parameters=False)  # the stage as it is (opened)
def partitions_flow(
    stage: Ingest, job: PartitionJob, workers: int, rerun: bool, executor: str = "threads"
) -> tuple[list[PartitionResult], str | None]:
    """The fan-out: the sources planned into partitions (records streamed to plan files in the
    pending version), what each takes from the previous version, then one task a partition, at
    most a few per worker in flight; returns their results and the version reused from."""
    logger = get_run_logger()
    store = ArtifactStore(job.store_url)
    parts = plan_partitions(stage.opened, job.config.partition_inputs, store.pending_files(job.pending))
    if (
        executor == "threads" and 0 < len(parts) < workers
    ):  # fewer partitions than threads: they decode in threads
        job = dataclasses.replace(job, decode_threads=max(1, workers // len(parts)))
    previous, reuse = (
        (None, {}) if rerun else plan_reuse(store, job.pending, stage.options_hash, parts, stage.retry_failed)
    )
    whole = sum(1 for r in reuse.values() if r.whole is not None)
    logger.info(
        "%d partitions of %s; %d copied whole from %s, %d take some of its rows",
        len(parts),
        [redact_url(s) for s in stage.sources],
        whole,
        previous,
        len(reuse) - whole,
    )
    known = sum(p.inputs or 0 for p in parts)
    results: list[PartitionResult] = []
    done = 0
    todo = sorted(parts, key=lambda p: p.inputs or 0, reverse=True)  # the largest first: a short tail
    submit = lambda part: ingest_partition_task.submit(job, part, reuse.get(part.index))  # noqa: E731
    with Progress(f"ingest {job.pending.ref.name}", max(1, known), unit="input") as progress:
        for _, result in fan_out(
            submit, todo, stage.settings.model_copy(update={"workers": workers, "executor": executor})
        ):
            results.append(result)
            done += result.rows
            progress.update(min(progress.total, done))
            progress.note(f"{len(results)}/{len(parts)} partitions")
    return results, None if previous is None else str(previous)


def bucket_rows(index: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "bucket": b,
            "count": v["count"],
            "mean_aspect_error": round(v["mean_aspect_error"] or 0.0, 4),
            "shards": len(v["shards"]),
        }
        for b, v in index["buckets"].items()
    ]


def ingest(
    store_url: str | None,
    sources: list[str],
    dataset: str,
    settings: IngestSettings = IngestSettings(),
    rerun: bool = False,
    retry_failed: bool = False,
) -> str:
    """`sources` into a new version of `datasets/<dataset>`, or the committed version made from
    identical inputs (unless `rerun`, or `retry_failed` with failed downloads)."""
    return run_stage(Ingest(tuple(sources), settings, retry_failed), dataset, store_url, rerun).ref
