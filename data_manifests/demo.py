"""The demo data set: real photos shipped inside installed packages, captions written here."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

HERE = Path(__file__).parent
DEMO_PHOTOS = HERE / "demo_photos.jsonl"
DEMO_PROMPTS = HERE / "demo_prompts.jsonl"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the demo photos need the package {package!r} installed (pip install -e .)")
    return Path(next(iter(spec.submodule_search_locations)))


def materialize_demo_photos(dest: str | Path) -> Path:
    """Copy the packaged photos into `dest` with a diffusers-ImageFolder `metadata.jsonl`
    (`file_name`, `text`), so the demo ingests them exactly as a user's folder."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in DEMO_PHOTOS.read_text().splitlines() if line.strip()]
    with open(dest / "metadata.jsonl", "w") as meta:
        for row in rows:
            src = _package_dir(row["package"]) / row["resource"]
            if not src.is_file():
                raise FileNotFoundError(f"demo photo {row['file_name']} not found at {src}")
            shutil.copyfile(src, dest / row["file_name"])
            meta.write(json.dumps({"file_name": row["file_name"], "text": row["text"]}) + "\n")
    return dest


def demo_prompts() -> list[dict]:
    return [json.loads(line) for line in DEMO_PROMPTS.read_text().splitlines() if line.strip()]


DEMO_SOURCE = "asd-demo:photos"  # a source that names the demo photos (deployments' runnable default)


def demo_photos_folder() -> Path:
    """The demo photos in a fixed folder of this machine's temp dir (the same path every time, so a
    re-ingest of `DEMO_SOURCE` is recognised as the same input); made once, then reused."""
    import hashlib
    import os
    import tempfile

    digest = hashlib.sha256(DEMO_PHOTOS.read_bytes()).hexdigest()[:12]
    folder = Path(tempfile.gettempdir()) / f"asd-demo-photos-{digest}"
    if (folder / "metadata.jsonl").is_file():
        return folder
    staging = Path(tempfile.mkdtemp(prefix=f"{folder.name}.", dir=folder.parent))
    materialize_demo_photos(staging)
    try:
        os.rename(staging, folder)  # one step: a reader sees no folder or the whole one
    except OSError:  # another process made it first
        shutil.rmtree(staging, ignore_errors=True)
    return folder
