"""A version written through the public writer (`put_bytes`, one call a file) and committed, then
opened cold in fresh processes: the record's size, one file's open, `list_versions`.

    python -m bench.store_record [--files 100000] [--json bench/results/store_record.json]

Targets (issue "one way to do each thing"): record <= 64 KB, a cold open of one file <= 50 ms and
<= 20 MB more RSS, list_versions <= 50 ms. The fresh-process arms import the store first, so the
numbers are the open's own, not Python's start.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time

from bench.report import child_arm, table, write_json

TARGETS = {"record_kb": 64, "open_ms": 50, "open_rss_mb": 20, "list_versions_ms": 50}


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def arm(root: str, what: str) -> None:
    """Child: one cold read of the version written by the parent; prints a JSON line."""
    from artifact_store import ArtifactStore

    before = rss_mb()
    t0 = time.perf_counter()
    store = ArtifactStore(root)
    if what == "open":
        data = store.read_bytes("datasets/many@latest", "f/0049999.txt")
        assert data, "empty read"
    else:
        assert store.list_versions("datasets", "many")
    ms = (time.perf_counter() - t0) * 1000
    print(json.dumps({"ms": round(ms, 1), "rss_mb": round(rss_mb() - before, 1)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--json", default="bench/results/store_record.json")
    ap.add_argument("--arm", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.arm:
        arm(*args.arm)
        return
    from artifact_store import ArtifactStore

    with tempfile.TemporaryDirectory(prefix="asd-bench-store-") as tmp:
        store = ArtifactStore(tmp)
        w = store.new_version("datasets", "many")
        t0 = time.perf_counter()
        for i in range(args.files):
            w.put_bytes(f"f/{i:07d}.txt", f"file {i}".encode())
        written = time.perf_counter() - t0
        t0 = time.perf_counter()
        ref = w.commit()
        commit_s = time.perf_counter() - t0
        record_kb = store.record_size(ref) / 1024
        opened = min(
            (child_arm("bench.store_record", "--arm", tmp, "open") for _ in range(3)), key=lambda r: r["ms"]
        )
        listed = min(
            (child_arm("bench.store_record", "--arm", tmp, "list") for _ in range(3)), key=lambda r: r["ms"]
        )
    result = {
        "files": args.files,
        "write_s": round(written, 1),
        "commit_s": round(commit_s, 2),
        "record_kb": round(record_kb, 1),
        "open_ms": opened["ms"],
        "open_rss_mb": opened["rss_mb"],
        "list_versions_ms": listed["ms"],
        "targets": TARGETS,
    }
    rows = [
        {"what": k, "value": result[k], "target": f"<= {v}", "ok": "yes" if result[k] <= v else "NO"}
        for k, v in TARGETS.items()
    ]
    print(
        f"{args.files} files through put_bytes: written in {written:.1f} s, committed in {commit_s:.2f} s "
        "(best of 3 fresh processes for the reads)"
    )
    table(rows, {"measure": "{what}", "value": "{value}", "target": "{target}", "met": "{ok}"})
    write_json(args.json, result)


if __name__ == "__main__":
    main()
