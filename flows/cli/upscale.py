"""`asd upscale`: existing images enlarged to any size with FSTD (ASD-upscale)."""

from __future__ import annotations

import argparse

from flows.cli.common import checked_sources, planned, ref_arg
from flows.settings_cli import add_settings_arguments, settings_from_args
from tasks.upscale import Upscale, UpscaleSettings


def add_parser(sub: argparse._SubParsersAction) -> None:
    u = sub.add_parser(
        "upscale",
        help="enlarge existing images to any size with FSTD (folders, URL lists, shards, datasets/...)",
        description="SOURCE: a folder of images (captions from sidecar .txt or metadata.jsonl become prompts), a "
        "URL list, WebDataset/img2dataset shards (local or s3://), or a version of the store: datasets/, "
        "generations/ or upscales/NAME@VERSION (their prompts become prompts). Each image is enlarged to --scale "
        "(default 2), an exact --size WxH or a --long-side, with img2img FSTD by --model, or by an "
        "x4-upscaler-style model (--upscaler), and back-projected so that its downscale is the input "
        "(--fidelity).",
    )
    u.add_argument("source", nargs="+")
    u.add_argument("--model", required=True, help="NAME, NAME@VERSION or models/NAME@VERSION")
    u.add_argument("--name", default="upscales", help="name of the upscales artifact to write")
    u.add_argument("--rerun", action="store_true", help="upscale again even if this exact job is committed")
    u.add_argument(
        "--dry-run",
        action="store_true",
        help="print what the job would do (inputs, output pixels, UNet evaluations) and stop: nothing is written",
    )
    add_settings_arguments(u, UpscaleSettings)
    u.set_defaults(func=cmd_upscale)


def cmd_upscale(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from flows.stages import upscale_flow

    check_name(args.name)
    settings = settings_from_args(UpscaleSettings, args)
    store = ArtifactStore(args.store)
    model = str(
        store.resolve(ref_arg(args.model, "models"))
    )  # a missing model is named before anything starts
    sources = checked_sources(args.source, settings.source_options(), store)
    stage = Upscale(tuple(sources), model, settings)
    if not planned(stage.plan(store, model), args.dry_run):
        return 0
    ref = upscale_flow(sources, model, args.name, settings, store.url, args.rerun)
    summary = store.record(ref).get("summary", {})
    print(ref)
    print(
        f"  {summary.get('images_ok', 0)} upscaled ({summary.get('images_rendered_by_this_run', 0)} by this run, "
        f"{summary.get('images_resumed', 0)} resumed), {summary.get('images_failed', 0)} failed"
        + (
            f"; round-trip SSIM {summary['roundtrip_ssim_mean']:.3f} (mean)"
            if "roundtrip_ssim_mean" in summary
            else ""
        )
    )
    return 0
