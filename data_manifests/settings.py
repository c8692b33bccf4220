"""What every stage's settings share, and the one prompt row every layer reads.

Each stage's own settings model lives with its stage (`tasks/<stage>.py`) and derives from
`StageSettings`: unknown fields are refused, and every field declares its role where it is
defined, `output(...)` (changes what the stage produces, so its identity covers it) or
`execution(...)` (only how it runs). Cross-field checks run in `model_validator(mode="after")`.
"""

from __future__ import annotations

import unicodedata
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticUndefined

SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes [0, 2^64)


OUTPUT = "output"  # the field changes what the stage produces: part of its identity (input hash)
EXECUTION = "execution"  # how the stage runs (workers, batching, retries): same output, up to float rounding
ROLES = (OUTPUT, EXECUTION)


def output(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A settings field that changes the stage's output (its identity covers it)."""
    return Field(default, json_schema_extra={"role": OUTPUT}, **kwargs)


def execution(default: Any = PydanticUndefined, **kwargs: Any) -> Any:
    """A settings field that only changes how the stage runs (left out of its identity)."""
    return Field(default, json_schema_extra={"role": EXECUTION}, **kwargs)


class StageSettings(BaseModel):
    """Base of every stage's settings: unknown fields are a mistake, not something to drop
    silently; every field declares its role (`output(...)` or `execution(...)`) where it is
    defined, and `identity()` is what a stage's input hash covers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def role(cls, name: str) -> str | None:
        extra = cls.model_fields[name].json_schema_extra
        role = extra.get("role") if isinstance(extra, dict) else None
        return role if isinstance(role, str) else None

    def identity(self) -> dict[str, Any]:
        """The fields that change the output, with their values."""
        return self.model_dump(include={n for n in type(self).model_fields if self.role(n) == OUTPUT})


class FanOutSettings(StageSettings):
    """Settings of a stage that fans its work out as Prefect tasks (`tasks.executors`): threads of
    this process, or Dask worker processes (a local cluster, or an existing scheduler)."""

    executor: Literal["threads", "dask"] = execution(
        "threads",
        description="tasks in threads of this process, or on Dask worker processes (left at threads, "
        "$ASD_EXECUTOR decides)",
    )
    workers: int = execution(1, ge=1, description="threads, or Dask worker processes of a local cluster")
    dask_address: str | None = execution(
        None,
        description="an existing Dask scheduler, e.g. tcp://host:8786 (unset: $ASD_DASK_ADDRESS, else a "
        "local cluster of `workers` processes)",
    )
    torch_threads: int | None = execution(
        None, ge=1, description="CPU threads of torch in each Dask worker (default: cores / workers)"
    )

    @model_validator(mode="after")
    def _dask_address_with_dask(self) -> FanOutSettings:
        """An address given with the threads executor would be ignored: say so instead."""
        if self.dask_address and self.executor != "dask":
            raise ValueError(
                f"dask_address {self.dask_address!r} is used only with executor 'dask' (add --executor dask)"
            )
        return self


class PromptSpec(BaseModel):
    """One prompt of a generation job; steps / guidance_scale / strength override the job's."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    prompt: str = Field(min_length=1)
    negative_prompt: str = ""
    width: int = Field(ge=64, le=16384)
    height: int = Field(ge=64, le=16384)
    seed: int = Field(0, ge=0, le=SEED_MAX)
    steps: int | None = Field(None, ge=1, le=1000)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    strength: float | None = Field(None, gt=0, le=1)

    @field_validator("width", "height", "seed", "steps", "guidance_scale", "strength", mode="before")
    @classmethod
    def _no_booleans(cls, value: Any) -> Any:
        if isinstance(value, bool):  # pydantic would take true as 1
            raise ValueError("a boolean is not a number")
        return value

    @field_validator("prompt", "negative_prompt")
    @classmethod
    def _text(cls, value: str, info: Any) -> str:
        """NFC-normalised Unicode; a prompt of only whitespace or invisible characters is empty."""
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError("not valid Unicode text (an unpaired surrogate)") from None
        value = unicodedata.normalize("NFC", value)
        if info.field_name == "prompt" and not "".join(
            c for c in value if unicodedata.category(c) not in INVISIBLE
        ):
            raise ValueError("empty: only whitespace or invisible characters")
        return value


INVISIBLE = {"Zs", "Zl", "Zp", "Cc", "Cf"}  # separators, controls and format characters (zero-width ones)
