"""`asd backfill`: one deployment run per date or prompt-manifest version."""

from __future__ import annotations

import argparse
import json
import sys

from flows.backfill import MAX_PARTITIONS
from flows.cli.common import UserError, one_line


def add_parser(sub: argparse._SubParsersAction) -> None:
    b = sub.add_parser(
        "backfill",
        help="one deployment run per date or prompt-manifest version",
        description="Launches FLOW/DEPLOYMENT once per partition through run_deployment (idempotency "
        "key per partition, bounded concurrency), skipping partitions whose output is committed. "
        "Outputs are named NAME-PARTITION; {partition} and {date} in --param values are filled in.",
    )
    b.add_argument("deployment", help="FLOW/DEPLOYMENT, e.g. asd-generate/generate")
    b.add_argument("--dates", help="START..END[/STEP_DAYS], ISO dates, inclusive")
    b.add_argument("--prompts-versions", help="comma-separated prompts/NAME@VERSION references")
    b.add_argument(
        "--param", action="append", help="KEY=VALUE override of a deployment parameter (JSON or text)"
    )
    b.add_argument("--name", help="base name of the outputs (default: the deployment's own)")
    b.add_argument(
        "--max-concurrency", type=int, default=2, help="partition runs in flight at once (default: 2)"
    )
    b.add_argument(
        "--max-partitions",
        type=int,
        default=MAX_PARTITIONS,
        help=f"refuse a backfill of more partitions than this (default: {MAX_PARTITIONS})",
    )
    b.set_defaults(func=cmd_backfill)


def _param(text: str) -> tuple[str, object]:
    """KEY=VALUE, the value read as JSON when it parses (numbers, lists, objects), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise UserError(f"--param {text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except ValueError:
        return key, value


def _date_range(text: str):
    """START..END or START..END/STEP_DAYS (ISO dates)."""
    from flows.backfill import DateRange

    span, _, step = text.partition("/")
    start, sep, end = span.partition("..")
    if not sep:
        raise UserError(
            f"--dates {text!r}: expected START..END or START..END/STEP_DAYS (2026-11-01..2026-11-07)"
        )
    from pydantic import ValidationError

    try:
        return DateRange(start=start.strip(), end=end.strip(), step_days=step.strip() or 1)
    except ValidationError as exc:
        why = "; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())
        raise UserError(f"--dates {text!r}: {why} (expected START..END or START..END/STEP_DAYS)") from None


def cmd_backfill(args: argparse.Namespace) -> int:
    from flows.backfill import backfill_flow
    from flows.deploy import check_api_url

    if "/" not in args.deployment:  # every flag is checked before the server is asked anything
        raise UserError(
            f"deployment {args.deployment!r}: expected FLOW/DEPLOYMENT, e.g. asd-generate/generate"
        )
    dates = _date_range(args.dates) if args.dates else None
    versions = (
        [v.strip() for v in args.prompts_versions.split(",") if v.strip()] if args.prompts_versions else None
    )
    if (dates is None) == (versions is None):
        raise UserError("give exactly one of --dates or --prompts-versions")
    if args.max_concurrency < 1:
        raise UserError("--max-concurrency must be at least 1")
    n = len(dates.dates()) if dates else len(versions or [])
    if n > args.max_partitions:  # before the server is asked anything
        raise UserError(
            f"--dates/--prompts-versions give {n} partitions, more than --max-partitions "
            f"{args.max_partitions}: narrow the range or pass --max-partitions {n}"
        )
    parameters = dict(_param(p) for p in args.param or [])
    check_api_url()
    from prefect import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(args.deployment)
        except ObjectNotFound:
            raise UserError(
                f"no deployment {args.deployment!r} on the server at {client.api_url} "
                "(`asd deploy --list` shows what `asd deploy` registers)"
            ) from None
    rows = backfill_flow(
        args.deployment,
        dates=dates,
        prompts_versions=versions,
        parameters=parameters,
        name=args.name,
        max_concurrency=args.max_concurrency,
        max_partitions=args.max_partitions,
        store_url=args.store,
        return_state=True,
    )
    result = rows.result(raise_on_failure=False)
    if isinstance(result, BaseException):
        print(f"asd: backfill failed: {one_line(result)}", file=sys.stderr)
        return 1
    print(f"{'partition':52s} {'status':22s} {'seconds':>8s}  output / flow run")
    for r in result:
        print(
            f"{r['partition']:52s} {r['status']:22s} {r['seconds']:8.1f}  {r['output']} {r['flow_run'] or ''}"
        )
    return 0
