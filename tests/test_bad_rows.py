"""Bad input stays a row (or one line), never a crash and never a silent cut: prompt text that
is not valid Unicode, empty to the eye, or booleans where numbers are asked; an empty prompt file;
backfill output names too long to keep; the pending marker of a committed version."""

from __future__ import annotations

import io
import json
from datetime import date

import polars as pl
import pyarrow.parquet as pq
import pytest

from artifact_store import ArtifactStore
from data_engine.prompts import PromptFileError, prompt_table
from flows.backfill import BackfillError, DateRange, plan_partitions


def test_bad_prompt_text_and_booleans_are_failed_rows_and_the_rest_render(tmp_path):
    lines = [
        '{"prompt": "\\ud800 broken", "width": 64, "height": 64}',  # valid JSON, not valid Unicode
        '{"prompt": "   \\t ", "width": 64, "height": 64}',
        '{"prompt": "\\u200b\\u200d\\ufeff", "width": 64, "height": 64}',  # zero-width only
        '{"prompt": "a cat", "width": true, "height": 64}',
        '{"prompt": "a cat", "width": 64, "height": 64, "steps": false}',
        '{"prompt": "Cafe\\u0301 at dusk", "width": 64, "height": 64}',
    ]
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    table = prompt_table(path)
    rows = table.to_pylist()
    errors = [r["error"] for r in rows]
    assert "unicode" in errors[0].lower()
    assert "whitespace or invisible" in errors[1] and "whitespace or invisible" in errors[2]
    assert "boolean" in errors[3] and "boolean" in errors[4]
    assert errors[5] is None and rows[5]["prompt"] == "Café at dusk"  # normalised (NFC)
    pq.write_table(table, io.BytesIO())  # the failed rows are storable as they are


def test_an_empty_prompt_file_is_one_clear_error(tmp_path):
    path = tmp_path / "empty.parquet"
    pl.DataFrame(
        {"prompt": [], "width": [], "height": []},
        schema={"prompt": pl.String, "width": pl.Int64, "height": pl.Int64},
    ).write_parquet(path)
    with pytest.raises(PromptFileError, match="no rows"):
        prompt_table(path)


def test_backfill_refuses_names_it_would_have_to_cut(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    with pytest.raises(BackfillError, match="at most 128"):
        plan_partitions(
            "asd-ingest",
            {"dataset": "d" * 120, "source": "/d"},
            {},
            store,
            dates=DateRange(start=date(2026, 11, 1), end=date(2026, 11, 3)),
        )
    parts = plan_partitions(
        "asd-ingest",
        {"dataset": "d" * 117, "source": "/d"},
        {},
        store,
        dates=DateRange(start=date(2026, 11, 1), end=date(2026, 11, 3)),
    )
    assert len({p.output.name for p in parts}) == 3  # 128 characters each, all different


def test_a_committed_version_keeps_no_pending_marker(tmp_path):
    store = ArtifactStore(str(tmp_path / "store"))
    pending = store.resume_or_new("generations", "g", "hash-1")
    marker = store.path(pending.ref.prefix, "_PENDING.json")
    assert json.loads(store.fs.cat_file(marker))["input_hash"] == "hash-1"
    writer = store.writer(pending)
    writer.put_bytes("a.txt", b"a")
    ref = writer.commit()
    assert not store.fs.exists(marker)
    assert store.verify(ref) == [] and store.resume_or_new("generations", "g", "hash-1") == ref


def _two_committers_of_one_pending_version(url: str):
    store = ArtifactStore(url)
    pending = store.resume_or_new("generations", "twice", "hash-2")
    first, second = ArtifactStore(url).writer(pending), ArtifactStore(url).writer(pending)
    first.put_bytes("a.png", b"first")
    second.put_bytes("b.png", b"second")
    ref = first.commit(summary={"by": "first"})
    return store, ref, second


@pytest.mark.parametrize("where", ["folder", "s3"])
def test_a_version_is_committed_once_and_only_with_its_files(tmp_path, request, where):
    """Two runs resuming one pending version: the second commit fails cleanly and the first
    record stands; a commit whose listed file went missing is refused before any record."""
    from artifact_store import StoreError

    url = str(tmp_path / "store") if where == "folder" else request.getfixturevalue("s3_bucket")
    store, ref, second = _two_committers_of_one_pending_version(url)
    with pytest.raises(StoreError, match="committed by another run"):
        second.commit(summary={"by": "second"})
    fresh = ArtifactStore(url)
    assert fresh.record(ref)["summary"] == {"by": "first"} and set(fresh.record(ref)["files"]) == {"a.png"}
    writer = fresh.new_version("generations", "lost")
    writer.put_bytes("kept.png", b"1")
    writer.put_bytes("gone.png", b"2")
    fresh.fs.rm_file(fresh.path(writer.ref.prefix, "gone.png"))
    with pytest.raises(StoreError, match="gone.png"):
        writer.commit()
    assert not fresh.has_commit_record(writer.ref)


def test_a_huge_backfill_is_refused_before_any_run(tmp_path, capsys):
    from flows.cli import main

    store = ArtifactStore(str(tmp_path / "store"))
    ten_years = DateRange(start=date(2016, 1, 1), end=date(2025, 12, 31))
    with pytest.raises(BackfillError, match="3653 partitions"):
        plan_partitions("asd-ingest", {"dataset": "d", "source": "/d"}, {}, store, dates=ten_years)
    assert (
        len(
            plan_partitions(
                "asd-ingest",
                {"dataset": "d", "source": "/d"},
                {},
                store,
                dates=ten_years,
                max_partitions=4000,
            )
        )
        == 3653
    )
    assert (
        main(["--store", store.url, "backfill", "asd-ingest/ingest", "--dates", "2016-01-01..2025-12-31"])
        == 2
    )
    assert "3653 partitions, more than --max-partitions 100" in capsys.readouterr().err
