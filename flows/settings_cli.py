"""argparse flags generated from a stage's settings model: one `--flag` per field, choices
for `Literal`s, help and default from the field (written once, in the stage's settings model in `tasks/<stage>.py`)."""

from __future__ import annotations

import argparse
import types
import typing
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ValidationError


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """(the non-None type, whether None is allowed) of `X`, `X | None` or `Optional[X]`."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return (args[0] if len(args) == 1 else str), True
    return annotation, False


def add_settings_arguments(
    parser: argparse.ArgumentParser,
    model: type[BaseModel],
    aliases: dict[str, list[str]] | None = None,
    title: str | None = None,
) -> None:
    """Add one flag per field of `model` to `parser`, in a group named after the stage."""
    group = parser.add_argument_group(
        title or f"settings ({model.__name__}: {(model.__doc__ or '').strip().splitlines()[0]})"
    )
    for name, field in model.model_fields.items():
        flags = ["--" + name.replace("_", "-"), *(aliases or {}).get(name, [])]
        kind, optional = _base_type(field.annotation)
        text = field.description or ""
        default = field.get_default(call_default_factory=True)
        if default is not None:
            text += f" (default: {default})"
        text = text.replace("%", "%%")  # argparse formats help with %: a literal one must be doubled
        if kind is bool:
            group.add_argument(
                *flags, dest=name, action=argparse.BooleanOptionalAction, default=None, help=text
            )
        elif typing.get_origin(kind) is list:  # a repeatable flag: each use adds one item
            group.add_argument(
                *flags,
                dest=name,
                action="append",
                default=None,
                metavar=name.upper(),
                help=text + " (repeatable)",
            )
        elif typing.get_origin(kind) is Literal:
            group.add_argument(
                *flags, dest=name, choices=[str(c) for c in typing.get_args(kind)], default=None, help=text
            )
        else:
            group.add_argument(
                *flags,
                dest=name,
                type=_parser_of(kind, name, optional),
                default=None,
                metavar=name.upper(),
                help=text,
            )


def _parser_of(kind: Any, name: str, optional: bool):
    convert = {int: int, float: float}.get(kind, str)

    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "auto"):
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected {convert.__name__ if convert is not str else 'text'}, got {text!r}"
            ) from None

    parse.__name__ = name
    return parse


SettingsT = TypeVar("SettingsT", bound=BaseModel)


def settings_from_args(
    model: type[SettingsT], args: argparse.Namespace, base: BaseModel | None = None
) -> SettingsT:
    """The settings given on the command line, over `base` (or the model's defaults)."""
    given = {n: getattr(args, n) for n in model.model_fields if getattr(args, n, None) is not None}
    start = base.model_dump() if base is not None else {}
    return model(**{**start, **given})


def settings_to_args(settings: BaseModel) -> list[str]:
    """The flags that give `settings` on a command line built by `add_settings_arguments`
    (fields left at their default are left out): `settings_from_args` reads them back equal."""
    out: list[str] = []
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if value == field.get_default(call_default_factory=True):
            continue
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            out.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            out += [flag, "none" if value is None else str(value)]
    return out


def describe_validation_error(exc: ValidationError, flags: bool = True) -> str:
    """One line: each failing field as its --flag (or name) and pydantic's message."""
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"] if p != "__root__")
        where = ("--" + loc.replace("_", "-")) if flags and loc else (loc or exc.title)
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(
            f"{where}: {msg}"
            + (f" (got {err['input']!r})" if loc and not isinstance(err.get("input"), dict) else "")
        )
    return "; ".join(parts)
