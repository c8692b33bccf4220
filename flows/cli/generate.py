"""`asd generate`: prompts rendered at any size (a prompt file, a stored manifest, or --prompt)."""

from __future__ import annotations

import argparse
import sys

from data_manifests.settings import PromptSpec
from flows.cli.common import UserError, planned, ref_arg
from flows.settings_cli import add_settings_arguments, settings_from_args
from tasks.generate import GenerateSettings
from tasks.job_plan import plan_job


def add_parser(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="render prompts at any size with FSTD")
    g.add_argument("--model", required=True, help="NAME, NAME@VERSION or models/NAME@VERSION")
    g.add_argument("--name", default="generations", help="name of the generations artifact to write")
    g.add_argument(
        "--prompts",
        help="Parquet/CSV/JSONL with prompt, width, height (optional: negative_prompt, "
        "seed, steps, guidance_scale, strength), or a stored prompts/NAME@VERSION",
    )
    g.add_argument("--prompt", help="one prompt, rendered at every --size")
    g.add_argument("--size", action="append", help="WIDTHxHEIGHT, repeatable (with --prompt)")
    g.add_argument("--seed", type=int, default=0, help="seed of --prompt (default: 0)")
    g.add_argument("--rerun", action="store_true", help="render again even if this exact job is committed")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the job's plan (images, pixels, UNet evaluations, estimated time) and render nothing",
    )
    add_settings_arguments(g, GenerateSettings)
    g.set_defaults(func=cmd_generate)


def parse_size(text: str) -> tuple[int, int]:
    """'1920x1080' -> (1920, 1080); anything else is a one-line user error."""
    w, sep, h = text.strip().lower().partition("x")
    if not sep or not w.isdigit() or not h.isdigit():
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT in pixels, e.g. 1920x1080")
    return int(w), int(h)


def prompts_from_args(args: argparse.Namespace):
    """The prompts of `asd generate`: an existing `prompts/NAME@VERSION` reference, or a
    validated table from a file (bad rows stay in it, reported as failed images) or from
    --prompt with --size. A file that cannot be read, or a bad --size, is a user error."""
    from pydantic import ValidationError

    from data_engine.prompts import PromptFileError, prompt_table, validate_rows

    if args.prompts:
        if args.prompt or args.size:
            raise UserError("give either --prompts FILE or --prompt TEXT with --size WxH, not both")
        if args.prompts.startswith("prompts/"):
            return ref_arg(args.prompts, "prompts")
        try:
            table = prompt_table(args.prompts)
        except PromptFileError as exc:
            raise UserError(str(exc)) from None
        bad = [
            (r, e)
            for r, e in zip(table.column("row").to_pylist(), table.column("error").to_pylist(), strict=True)
            if e
        ]
        for row, error in bad[:10]:
            print(f"asd generate: prompt row {row} will not be rendered: {error}", file=sys.stderr)
        return table
    if not args.prompt or not args.size:
        raise UserError("give --prompts FILE, or --prompt TEXT with one or more --size WxH")
    rows = []
    for s in args.size:
        w, h = parse_size(s)
        try:
            rows.append(PromptSpec(prompt=args.prompt, width=w, height=h, seed=args.seed).model_dump())
        except ValidationError as exc:
            err = exc.errors()[0]
            raise UserError(
                f"--size {s}: {err['loc'][0]} {err['msg']}"
                if err["loc"][0] in ("width", "height")
                else f"--{err['loc'][0]}: {err['msg']}"
            ) from None
    return validate_rows(rows, "--prompt")


def cmd_generate(args: argparse.Namespace) -> int:
    from artifact_store import ArtifactStore, check_name
    from data_engine.prompts import read_prompts
    from flows.stages import generate_flow
    from tasks.prompts import store_prompts

    check_name(args.name)
    model = ref_arg(args.model, "models")
    settings = settings_from_args(GenerateSettings, args)
    prompts = prompts_from_args(args)
    store = ArtifactStore(args.store)
    model = str(store.resolve(model))  # a missing model is named before the prompts are stored
    table = read_prompts(store, prompts) if isinstance(prompts, str) else prompts
    if not planned(plan_job(store, model, table, settings), args.dry_run):
        return 0
    if not isinstance(prompts, str):
        prompts = store_prompts(store.url, prompts, args.name, args.prompts or "--prompt")
    print(generate_flow(model, prompts, args.name, settings, store.url, args.rerun))
    return 0
