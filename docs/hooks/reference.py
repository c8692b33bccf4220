"""mkdocs hook: the reference pages are generated from the code, so they cannot drift.

A page holds a marker comment and gets the generated Markdown in its place:

    <!-- asd:cli -->          every `asd` subcommand's --help
    <!-- asd:settings -->     every stage's settings: flag, default, role, description
    <!-- asd:environment -->  every ASD_* variable (data_manifests/runtime.py)
    <!-- asd:schemas -->      every Arrow schema of data_manifests/schemas.py, with its comments
    <!-- asd:samplers -->     the named samplers and their own options
    <!-- asd:layout -->       the store's layout: the names artifact_store uses, with their comments
    <!-- asd:bench:NAME -->   what bench/NAME.py measures and how to run it (its docstring)
                              and its flags (its --help)
"""

from __future__ import annotations

import argparse
import ast
import io
import re
import tokenize
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
MARKER = re.compile(r"<!-- asd:([a-z]+)(?::([a-z_]+))? -->")


def cli() -> str:
    from flows.cli import build_parser

    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    out = []
    for name, sub in action.choices.items():
        sub.prog = f"asd {name}"
        out.append(f"## asd {name}\n\n```text\n{sub.format_help().strip()}\n```\n")
    return "\n".join(out)


def _default(field: Any) -> str:
    value = field.get_default(call_default_factory=True)
    return "" if value is None else f"`{value}`"


def settings() -> str:
    from tasks.registry import STAGES

    out = []
    for command, entry in STAGES.items():
        model = entry.settings
        out.append(f"## asd {command}: `{model.__name__}`\n\n{(model.__doc__ or '').strip()}\n")
        out.append("| flag | default | role | what it sets |\n|---|---|---|---|")
        for name, field in model.model_fields.items():
            role = (
                (field.json_schema_extra or {}).get("role", "")
                if isinstance(field.json_schema_extra, dict)
                else ""
            )
            text = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `--{name.replace('_', '-')}` | {_default(field)} | {role} | {text} |")
        out.append("")
    return "\n".join(out)


def environment() -> str:
    from data_manifests.runtime import RuntimeSettings

    rows = ["| variable | default | what it sets |", "|---|---|---|"]
    for name, field in RuntimeSettings.model_fields.items():
        default = field.get_default(call_default_factory=False)
        shown = "" if default is None else f"`{default}`"
        if name == "cache":
            shown = "`~/.cache/asd`"
        rows.append(f"| `ASD_{name.upper()}` | {shown} | {(field.description or '').replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _schema_comments(source: str) -> dict[str, list[tuple[str, str, str]]]:
    """Schema name -> (field, type, comment) from data_manifests/schemas.py, comments included."""
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out: dict[str, list[tuple[str, str, str]]] = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.Assign) and isinstance(node.value, ast.Call)):
            continue
        name = node.targets[0].id if isinstance(node.targets[0], ast.Name) else None
        if not name or not node.value.args or not isinstance(node.value.args[0], ast.List):
            continue
        fields = []
        for elt in node.value.args[0].elts:
            if isinstance(elt, ast.Tuple) and isinstance(elt.elts[0], ast.Constant):
                fields.append((elt.elts[0].value, ast.unparse(elt.elts[1]), comments.get(elt.lineno, "")))
            elif isinstance(elt, ast.Starred):
                fields.append((f"*{ast.unparse(elt.value)}", "", "every field of that schema"))
        out[name] = fields
    return out


def schemas() -> str:
    out = []
    for name, fields in _schema_comments((ROOT / "data_manifests" / "schemas.py").read_text()).items():
        out.append(f"## `{name}`\n\n| field | type | meaning |\n|---|---|---|")
        out += [f"| `{f}` | `{t}` | {c.replace('|', '/')} |" for f, t, c in fields]
        out.append("")
    return "\n".join(out)


def _constant_comments(path: Path) -> dict[str, tuple[Any, str]]:
    """Module-level `NAME = value  # comment` constants of a source file."""
    source = path.read_text()
    comments = {
        tok.start[0]: tok.string.lstrip("# ").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    out = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            try:
                value = ast.literal_eval(node.value)
            except ValueError:
                continue
            out[node.targets[0].id] = (value, comments.get(node.lineno, ""))
    return out


def layout() -> str:
    """The store's layout from the names `artifact_store` defines (so the page cannot drift)."""
    from artifact_store.refs import NAME_RE, VERSION_RE

    refs = _constant_comments(ROOT / "artifact_store" / "refs.py")
    lists = _constant_comments(ROOT / "artifact_store" / "file_lists.py")

    def row(path: str, key: str, table: dict[str, tuple[Any, str]], what: str = "") -> str:
        return f"| `{path.format(table[key][0])}` | {what or table[key][1]} |"

    kinds = ", ".join(f"`{k}`" for k in refs["KINDS"][0])
    rows = [
        "| path (under the store root) | what it is |",
        "|---|---|",
        f"| `<kind>/<name>/<version>/` | a version: kind one of {kinds}; name `{NAME_RE.pattern}`; "
        f"version `{VERSION_RE.pattern}` (UTC time, then 8 random hex digits) |",
        row(
            "<kind>/<name>/<version>/{}",
            "COMMIT_RECORD",
            refs,
            "the commit record, written last: a version without one is not committed",
        ),
        row(
            "<kind>/<name>/<version>/{}/part-<n>.parquet",
            "FILE_LIST_DIR",
            lists,
            "a large version's file list, in path-sorted parts the record names with their sha256",
        ),
        row("<kind>/<name>/<version>/{}", "PENDING_MARKER", refs),
        row("<kind>/<name>/<version>/{}/<epoch>.json", "LEASE_DIR", refs),
        row("<kind>/<name>/<version>/{}/", "FRAGMENT_DIR", refs),
        row(
            "<kind>/<name>/{}",
            "LATEST_POINTER",
            refs,
            "the newest committed version's id (a hint: readers check it against its record)",
        ),
        row(
            "{}/",
            "CATALOG_DIR",
            refs,
            "one row per committed version (kind, name, version, parents, summary): what `asd store catalog` and the dashboard read",
        ),
        row("{}/", "SITE_DIR", refs),
    ]
    return "\n".join(rows) + "\n"


def samplers() -> str:
    from asd_models.samplers import SAMPLERS

    rows = ["| `--sampler` | what it is | `--sampler-options` |", "|---|---|---|"]
    for name, cls in SAMPLERS.items():
        doc = (cls.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
        opts = ", ".join(f"`{k}` ({t.__name__})" for k, t in cls.options.items()) or "none"
        rows.append(f"| `{name}` | {doc} | {opts} |")
    return "\n".join(rows) + "\n"


def bench(name: str) -> str:
    """A bench's page head: its module docstring and its flags, read from bench/NAME.py."""
    path = ROOT / "bench" / f"{name}.py"
    if not path.is_file():
        raise ValueError(f"no bench named {name!r}: {path} does not exist")
    tree = ast.parse(path.read_text())
    doc = ast.get_docstring(tree) or ""
    out = [f"*From `bench/{name}.py`*:\n\n```text\n{doc.strip()}\n```\n"]
    flags = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "add_argument"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and str(node.args[0].value).startswith("--")
    ]
    if flags:
        out.append("| flag | default | what it sets |\n|---|---|---|")
        for node in flags:
            kw = {k.arg: k.value for k in node.keywords}
            default = ast.unparse(kw["default"]) if "default" in kw else ""
            helptext = kw.get("help")
            text = helptext.value if isinstance(helptext, ast.Constant) else ""
            if (
                "action" in kw
                and isinstance(kw["action"], ast.Constant)
                and kw["action"].value == "store_true"
            ):
                default = "off"
            out.append(
                f"| `{node.args[0].value}` | {default and f'`{default}`'} | {str(text).replace('|', '/').replace('%%', '%')} |"
            )
        out.append("")
    return "\n".join(out)


GENERATORS = {
    "cli": cli,
    "settings": settings,
    "environment": environment,
    "schemas": schemas,
    "samplers": samplers,
    "layout": layout,
}


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    def fill(m: re.Match[str]) -> str:
        if m.group(1) == "bench" and m.group(2):
            return bench(m.group(2))
        if m.group(1) not in GENERATORS or m.group(2):
            raise ValueError(f"unknown reference marker {m.group(0)}: expected one of {sorted(GENERATORS)}")
        return GENERATORS[m.group(1)]()

    return MARKER.sub(fill, markdown)
