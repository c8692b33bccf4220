"""What every `asd` subcommand shares: the one-line user error, its parser, and the small
parsers of references and paths."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path
from typing import Any

USER_ERROR = 2


class UserError(Exception):
    """A mistake in what the user gave: printed as one line, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line (`asd: ...`) and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]  # argparse's returns NoReturn; this one exits too
        sub = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        print(
            f"asd: {message}" + (f" ({sub}; see `{self.prog} --help`)" if sub else " (see `asd --help`)"),
            file=sys.stderr,
        )
        raise SystemExit(USER_ERROR)


def int_in(lo: int, hi: int) -> Any:
    """An argparse type: an integer in [lo, hi] (else argparse's one-line error naming the flag)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is outside {lo}..{hi}")
        return value

    parse.__name__ = "integer"
    return parse


def planned(plan: Any, dry_run: bool) -> bool:
    """A job's plan before any work: printed when `dry_run` (False: stop here), else checked
    against its cap (over it: one line, exit 2). True: go on and run the job."""
    from tasks.job_plan import JobTooLarge

    if dry_run:
        print("\n".join(plan.lines()))
        return False
    try:
        plan.check()
    except JobTooLarge as exc:
        raise UserError(str(exc)) from None
    return True


def ref_arg(text: str, kind: str) -> str:
    """Accept NAME, NAME@VERSION or KIND/NAME@VERSION; checked before any work."""
    from artifact_store import ArtifactRef

    ref = text if text.startswith(f"{kind}/") else f"{kind}/{text}"
    ArtifactRef.parse(ref)
    return ref


def local_or_url(spec: str) -> str:
    """Local paths become absolute (flows may run elsewhere); URLs and patterns stay as given."""
    if "://" in spec:
        return spec
    return (
        str(Path(spec).expanduser().resolve()) if "{" not in spec else str(Path(spec).expanduser().absolute())
    )


def checked_sources(specs: list[str], source_options, store=None) -> list[str]:
    """The sources as a flow takes them (local paths absolute; with `store`, a version of the
    store, `datasets/`, `generations/` or `upscales/NAME@VERSION`, pinned), each opened once
    here: a typo or an unreadable list fails in one line, naming it, before any flow run."""
    from artifact_store import redact_url, s3_storage_options
    from data_engine.sources import open_source
    from data_manifests.demo import DEMO_SOURCE
    from tasks.version_images import IMAGE_KINDS

    out = []
    for spec in specs:
        if spec == DEMO_SOURCE:  # the demo photos, wherever the packages are installed
            out.append(spec)
            continue
        if store is not None and spec.split("/", 1)[0] in ("datasets", *IMAGE_KINDS):
            out.append(str(store.resolve(spec)))  # a missing version is named by the CLI's store errors
            continue
        try:
            open_source(local_or_url(spec), s3_storage_options(), source_options)
        except (OSError, ValueError) as exc:
            raise UserError(f"source {redact_url(spec)!r}: {exc}") from exc
        out.append(local_or_url(spec))
    return out


def print_metrics(store, ref: str) -> None:
    import polars as pl

    df = pl.read_parquet(io.BytesIO(store.read_bytes(ref, "metrics.parquet")))
    df = df.filter(~pl.col("metric").str.contains("/"))
    with pl.Config(tbl_rows=50, fmt_str_lengths=90, tbl_width_chars=160, tbl_hide_dataframe_shape=True):
        print(df)


def one_line(exc: BaseException) -> str:
    from pydantic import ValidationError

    from flows.settings_cli import describe_validation_error

    if isinstance(exc, ValidationError):
        return describe_validation_error(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text
