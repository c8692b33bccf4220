"""Progress for long loops: tqdm in a terminal, a Prefect progress artifact in the UI."""

from __future__ import annotations

import re
import sys
import time
from typing import Any

from tqdm.auto import tqdm

from tasks.runtime import in_prefect_run, run_logger


def _log(message: str) -> None:
    if in_prefect_run():
        from prefect import get_run_logger

        get_run_logger().info(message)


def publish_table(key: str, rows: list[dict[str, Any]], description: str) -> None:
    """A table artifact in the Prefect UI (inside a run; a failure is logged, the work goes on)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_table_artifact

    try:
        create_table_artifact(key=key, table=rows, description=description)
    except Exception as exc:  # noqa: BLE001 - the UI table is optional, the work is not
        run_logger().warning("could not publish the %s table artifact: %s", key, exc)


def publish_markdown(key: str, markdown: str, description: str) -> None:
    """A markdown artifact in the Prefect UI (inside a run; a failure is logged)."""
    if not in_prefect_run():
        return
    from prefect.artifacts import create_markdown_artifact

    try:
        create_markdown_artifact(key=key, markdown=markdown, description=description)
    except Exception as exc:  # noqa: BLE001
        run_logger().warning("could not publish the %s markdown artifact: %s", key, exc)


class Progress:
    """Context manager: `update(done)` with an absolute count; `note(text)` sets the postfix, which
    the UI artifact shows as its description. `key`: the artifact key (default: from the label)."""

    def __init__(
        self, label: str, total: int, unit: str = "it", min_interval_s: float = 2.0, key: str | None = None
    ) -> None:
        self.label, self.total, self.unit = label, max(1, total), unit
        self.key = key or re.sub(r"[^a-z0-9-]+", "-", label.lower()).strip("-")[:60] or "progress"
        self.min_interval_s = min_interval_s
        self.bar: Any = None
        self.artifact_id: Any = None
        self._last_push = 0.0
        self._next_log = 0.1
        self.done = 0
        self.postfix = ""

    def __enter__(self) -> Progress:
        self.bar = tqdm(
            total=self.total,
            desc=self.label,
            unit=self.unit,
            file=sys.stderr,
            dynamic_ncols=True,
            leave=False,
            disable=None,
        )
        if in_prefect_run():
            from prefect.artifacts import create_progress_artifact

            try:
                self.artifact_id = create_progress_artifact(
                    progress=0.0, key=self.key, description=self.label
                )
            except Exception as exc:  # noqa: BLE001 - the UI artifact is optional, the work is not
                run_logger().warning("no progress artifact for %s: %s", self.label, exc)
                self.artifact_id = None
        return self

    def update(self, done: int) -> None:
        self.bar.update(done - self.done)
        self.done = done
        if done / self.total >= self._next_log:  # a log line every 10%, for logs and the Prefect UI
            self._next_log = (int(10 * done / self.total) + 1) / 10
            _log(
                f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%) {self.postfix}"
            )
        now = time.monotonic()
        if self.artifact_id is not None and (
            now - self._last_push >= self.min_interval_s or done >= self.total
        ):
            from prefect.artifacts import update_progress_artifact

            self._last_push = now
            try:
                update_progress_artifact(
                    self.artifact_id,
                    progress=100.0 * done / self.total,
                    description=f"{self.label}: {done}/{self.total} {self.unit} {self.postfix}",
                )
            except Exception as exc:  # noqa: BLE001
                run_logger().warning("progress artifact of %s stopped updating: %s", self.label, exc)
                self.artifact_id = None

    def note(self, text: str) -> None:
        self.postfix = text
        self.bar.set_postfix_str(text, refresh=False)

    def __exit__(self, *exc: Any) -> None:
        if self.artifact_id is not None and exc[0] is None:
            self.update(self.total)
        self.bar.close()
