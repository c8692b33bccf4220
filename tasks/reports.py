"""What a finished pipeline run shows in the Prefect UI: a summary (every committed reference,
the metrics table) and links to the report, the generated images and the store's dashboard."""

from __future__ import annotations

import io

from prefect import task

from artifact_store import ArtifactStore
from artifact_store.members import image_uri
from artifact_store.refs import SITE_DIR
from dashboard.build import build_site, version_page
from data_manifests.runtime import runtime
from tasks.progress import publish_markdown
from tasks.runtime import in_prefect_run, run_logger

SUMMARY_IMAGES = 50  # image rows in the run summary (the rest: generations table, gallery, manifest)


def browsable(store: ArtifactStore, uri: str) -> str:
    """A link a browser can follow: local store paths as file:// URLs, others as they are."""
    return f"file://{uri}" if store.is_local and uri.startswith("/") else uri


def site_link(store: ArtifactStore, page: str) -> str:
    """A dashboard page: under $ASD_SITE_URL when the site is served, else the file in the store."""
    base = runtime().site_url
    if base:
        return f"{base.rstrip('/')}/{page}"
    return browsable(store, store.uri(SITE_DIR, page))


@task(name="build-dashboard")
def refresh_dashboard(store_url: str) -> str | None:
    """Rebuild the store's dashboard (`_site/`); a failure is logged, never fails the run."""
    from prefect.settings import PREFECT_UI_URL

    try:
        built = build_site(ArtifactStore(store_url), prefect_ui=PREFECT_UI_URL.value())
    except Exception as exc:  # noqa: BLE001 - the dashboard is a view; the committed work stands
        run_logger().warning("the dashboard was not rebuilt: %s", exc)
        return None
    run_logger().info(
        "dashboard: %d pages (%d new pictures) at %s", built.pages, built.pictures_made, built.index
    )
    return built.index


def summary_markdown(store: ArtifactStore, refs: dict[str, str]) -> str:
    import polars as pl
    import pyarrow.parquet as pq

    lines = [
        "# Any-Size-Diffusion pipeline run",
        "",
        f"Store: `{store.display_url}`",
        "",
        "| stage | committed version |",
        "|---|---|",
    ]
    lines += [f"| {stage} | `{ref}` |" for stage, ref in refs.items()]
    if "generations" in refs:
        gen = store.resolve(refs["generations"])
        summary = store.record(gen)["summary"]
        with store.open_checked(
            gen, "manifest.parquet"
        ) as f:  # its head only: a manifest may hold millions of rows
            pf = pq.ParquetFile(f)
            n_rows = pf.metadata.num_rows
            head = next(pf.iter_batches(batch_size=SUMMARY_IMAGES), None)
            head_rows = head.to_pylist() if head is not None else []
        ok, failed = summary.get("images_ok", 0), summary.get("images_failed", 0)
        lines += [
            "",
            f"## Images ({ok} rendered, {failed} failed)",
            "",
            "| size | seconds | image |",
            "|---|---:|---|",
        ]
        for r in head_rows:
            where = image_uri(store, gen, r) if r["image"] else f"failed: {r['error']}"
            lines.append(f"| {r['width']}x{r['height']} | {r['seconds'] or 0:.1f} | `{where}` |")
        if n_rows > SUMMARY_IMAGES:
            lines += [
                "",
                f"(the first {SUMMARY_IMAGES} of {n_rows}; all of them: the `generations` table "
                "artifact, the gallery, `manifest.parquet`)",
            ]
    if "evaluation" in refs:
        metrics = pl.read_parquet(io.BytesIO(store.read_bytes(refs["evaluation"], "metrics.parquet")))
        lines += ["", "## Metrics", "", "| metric | value | status |", "|---|---:|---|"]
        for r in metrics.filter(~pl.col("metric").str.contains("/")).iter_rows(named=True):
            value = "" if r["value"] is None else f"{r['value']:.4g}"
            lines.append(f"| {r['metric']} | {value} | {r['status']} |")
        lines += [
            "",
            "Details of each metric: the `evaluation-report` artifact and `report.md` of the evaluation.",
        ]
    return "\n".join(lines) + "\n"


def publish_pipeline_summary(store: ArtifactStore, refs: dict[str, str]) -> None:
    """The parent run's artifacts: the summary markdown plus links to the report, the images and
    the dashboard pages of the versions (a failure is logged; the work is done already)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_link_artifact

    publish_markdown("pipeline-summary", summary_markdown(store, refs), "what this pipeline run committed")
    links: list[tuple[str, str, str]] = []
    if "evaluation" in refs:
        ev = store.resolve(refs["evaluation"])
        links.append(("report-link", browsable(store, store.file_uri(ev, "report.md")), f"report of {ev}"))
    if "generations" in refs:
        gen = store.resolve(refs["generations"])
        links.append(("images-link", browsable(store, store.uri(gen.prefix, "images")), f"images of {gen}"))
        links.append(
            (
                "gallery-link",
                site_link(store, version_page(gen.kind, gen.name, gen.version)),
                f"gallery of {gen} in the store's dashboard",
            )
        )
    links.append(("dashboard-link", site_link(store, "index.html"), "the store's dashboard"))
    for key, link, text in links:
        try:
            create_link_artifact(link=link, link_text=text, key=key, description=text)
        except Exception as exc:  # noqa: BLE001 - the UI link is optional, the work is not
            run_logger().warning("could not publish the %s link artifact: %s", key, exc)
