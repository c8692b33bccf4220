"""`asd`: the command line, one module per subcommand (`flows/cli/<subcommand>.py`, each with its
`add_parser` and the function it runs). Each subcommand runs a flow or reads the store.

Stage flags are generated from the stage's settings model (`flows.settings_cli`). Every user
mistake is one line, `asd: <what> (<where>)`, and exit code 2, before any work starts."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from flows.cli.common import USER_ERROR, OneLineParser, UserError, one_line

__all__ = ["USER_ERROR", "UserError", "build_parser", "main"]


def _quiet_environment() -> None:
    """Defaults the user's environment may override, set where a run starts (before the libraries
    that read them are imported): no analytics, no torchvision-fallback chatter."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _quiet_library_bars() -> None:
    """Weight loading bars of diffusers/transformers say nothing to a pipeline user."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="asd", description="Any-Size-Diffusion pipeline (Prefect 3)")
    p.add_argument("--store", default=None, help="artifact store URL (default: $ASD_STORE or ./asd-store)")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=OneLineParser)
    from flows.cli import (
        backfill,
        dashboard,
        demo,
        deploy,
        evaluate,
        generate,
        ingest,
        model,
        store,
        train,
        upscale,
    )

    for command in (
        demo,
        ingest,
        model,
        train,
        generate,
        upscale,
        evaluate,
        store,
        deploy,
        backfill,
        dashboard,
    ):
        command.add_parser(sub)
    for parser in _all_subparsers(p):
        # `asd deploy --store URL` as well as `asd --store URL deploy`; SUPPRESS keeps the global one
        parser.add_argument(
            "--store", default=argparse.SUPPRESS, help="artifact store URL (as `asd --store`)"
        )
    return p


def _all_subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                found += [child, *_all_subparsers(child)]
    return found


def _user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the user gave something wrong (not a bug): one line, exit 2."""
    from botocore.exceptions import BotoCoreError, ClientError  # s3fs[boto3] is a dependency
    from pydantic import ValidationError

    from artifact_store import StoreError
    from asd_models.arad_training import CheckpointMismatch
    from asd_models.loading import ModelNotFoundError
    from asd_models.lora import LoraError
    from flows.backfill import BackfillError

    # CorruptRecord (a StoreError) is caught before these, in main(): it exits 1, not 2
    from flows.deploy import DeployError

    return (
        UserError,
        StoreError,
        ValidationError,
        ModelNotFoundError,
        BotoCoreError,
        ClientError,
        DeployError,
        BackfillError,
        CheckpointMismatch,
        LoraError,
    )


class _OneLineForUserErrors(logging.Filter):
    """Prefect logs a flow's exception with its traceback to the console before the CLI prints
    it: for a user error (a refused run, a bad input found inside a flow) that record is dropped
    from the console, since the CLI's one line says it. The run's own log (the API handler, the
    Prefect UI) keeps it."""

    def __init__(self, types: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.types = types

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, self.types)


def _quiet_user_error_tracebacks() -> None:
    """The filter above on every console handler (Prefect's sits on the root logger)."""
    from prefect.logging.handlers import PrefectConsoleHandler

    quiet = _OneLineForUserErrors(_user_error_types())
    for name in ("", "prefect", "prefect.flow_runs", "prefect.task_runs"):
        for handler in logging.getLogger(name).handlers:
            if isinstance(handler, PrefectConsoleHandler):
                handler.addFilter(quiet)


def _stop_on_sigterm() -> None:
    """SIGTERM ends `asd` like Ctrl-C: cleanup runs (Prefect's temporary server is stopped)."""

    def handler(signum: int, frame) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    if hasattr(signal, "SIGTERM"):
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _quiet_environment()
    args = build_parser().parse_args(argv)
    from artifact_store import CorruptRecord, redact

    _quiet_library_bars()
    _stop_on_sigterm()
    from flows.server_guard import tie_temporary_server_to_this_process

    tie_temporary_server_to_this_process()
    _quiet_user_error_tracebacks()
    try:
        return args.func(args)
    except CorruptRecord as exc:
        print(f"asd: {redact(one_line(exc))}", file=sys.stderr)
        return 1
    except _user_error_types() as exc:
        print(f"asd: {redact(one_line(exc))} ({args.cmd})", file=sys.stderr)
        return USER_ERROR
    except KeyboardInterrupt:
        print("asd: interrupted", file=sys.stderr)
        return 130
