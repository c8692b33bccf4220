"""What the benches share for reporting: a Markdown table of result rows, the JSON file, and an
arm run in a fresh process (peak RSS is a process's high-water mark; one arm must not inherit
another's)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


def table(rows: list[dict], columns: dict[str, str | Callable[[dict], str]]) -> None:
    """Print a Markdown table of `rows`: a column's cell is its format string over the row, or a
    function of the row."""
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for r in rows:
        print("| " + " | ".join(c(r) if callable(c) else c.format(**r) for c in columns.values()) + " |")


def write_json(path: str | None, data: Any) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(data, indent=2))


def child_arm(module: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """`python -m module args...` in a fresh process; its last stdout line is the arm's JSON."""
    out = subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, cwd=ROOT, env=env
    )
    if out.returncode:
        raise SystemExit(f"{module} {' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])
