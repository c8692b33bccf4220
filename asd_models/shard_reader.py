"""WebDataset samples from a tar stream (plain or gzip), read within caps: the one shard
reader of ingest (foreign shards, and its own earlier shards) and of the training loader.

A tar's members are grouped into samples by key (WebDataset: the path up to the first dot of
the name). Only regular files are read, each after its header size (the uncompressed size,
whatever gzip layer it came through) is checked against `max_bytes`, and the members of one
sample together against `sample_max_bytes`: a sample over it keeps none of its members (memory
holds at most one sample within the cap) and says so in `__problems__`, as does a member that
repeats an extension of its sample. Problems are capped at a few lines a sample."""

from __future__ import annotations

import re
import tarfile
from collections.abc import Iterator
from typing import Any

WDS_NAME = re.compile(r"^((?:.*/|)[^./]+)\.([^/]+)$")  # key = path up to the first dot of the name
MAX_PROBLEMS = 5
STORED_MAX_BYTES = 1 << 30  # caps for shards this project wrote (checked against their sha256 already)


def printable(text: str) -> str:
    """A path or name as valid UTF-8 text (undecodable bytes of a file name become U+FFFD)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def _problem(sample: dict[str, Any], text: str) -> None:
    problems = sample["__problems__"]
    if len(problems) < MAX_PROBLEMS:
        problems.append(text)
    elif len(problems) == MAX_PROBLEMS:
        problems.append("(more problems of this sample not listed)")


def tar_stream_samples(stream: Any, max_bytes: int, sample_max_bytes: int) -> Iterator[dict[str, Any]]:
    """Samples of a tar or .tar.gz stream, in order: `{"__key__", "__problems__", ext: bytes}`;
    `"__over__": True` when the sample's members total more than `sample_max_bytes`."""
    sample: dict[str, Any] = {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if member.isdir():
                continue
            m = WDS_NAME.match(member.name)
            key, ext = (m.group(1), m.group(2).lower()) if m else (member.name, "")
            if sample and key != sample["__key__"]:
                yield sample
                sample = {}
            sample = sample or {"__key__": key, "__problems__": [], "__bytes__": 0}
            name = printable(member.name)
            if not member.isreg():
                _problem(sample, f"member {name} is not a regular file (a link or device); not read")
            elif member.size > max_bytes:
                _problem(
                    sample, f"member {name} is {member.size} bytes, over max_bytes {max_bytes}; not read"
                )
            elif sample.get("__over__") or sample["__bytes__"] + member.size > sample_max_bytes:
                if not sample.get("__over__"):
                    _problem(
                        sample,
                        f"sample {printable(key)}: its members total over sample_max_bytes "
                        f"{sample_max_bytes} at {name}; none kept",
                    )
                    for k in [k for k in sample if not k.startswith("__")]:
                        del sample[k]
                    sample["__over__"] = True
            elif ext in sample:
                _problem(sample, f"member {name} repeats the extension .{ext} of its sample; not read")
            elif ext:
                f = tar.extractfile(member)
                sample[ext] = f.read() if f is not None else b""
                sample["__bytes__"] += member.size
    if sample:
        yield sample


def sample_members(sample: dict[str, Any]) -> dict[str, Any]:
    """The members of a sample with its key (what a TarWriter takes), without the reader's notes."""
    return {k: v for k, v in sample.items() if not k.startswith("__") or k == "__key__"}
