"""The ingestion job end to end, parsing in its threads and in Ray tasks: every line lands once, in the right table."""

from __future__ import annotations

import gzip
import json
from collections import Counter
from pathlib import Path

import pytest

from ingestion.job import IngestJob
from ingestion.parse import line_starts
from ray_jobs.ingest import main as ingest_main
from tests.ingestion.lake_checks import good_event, lake_rows, make_config, unreferenced_data_files, write_lines


@pytest.fixture
def lake(tmp_path: Path):
    return tmp_path, make_config(tmp_path)


@pytest.fixture(params=["threads", "ray"])
def lake_parsed_on(request, tmp_path: Path):
    """A lake whose job parses in its own threads (one machine) or in Ray tasks (what a cluster runs)."""
    if request.param == "ray":
        request.getfixturevalue("ray_local")
    return tmp_path, make_config(tmp_path, f"ingest.parse_on={request.param}")


def test_bad_inputs_are_quarantined_and_nothing_valid_is_lost(lake_parsed_on):
    tmp, cfg = lake_parsed_on
    landing = tmp / "landing"
    good = [good_event(i) for i in range(40)]
    write_lines(landing, "a-001.jsonl", [good[0], b'{"broken', good[1], {**good_event(99), "user_id": -1},
                                         good[2], {**good_event(98), "action": "dance"}, good[3], good[3]])
    write_lines(landing, "a-002.jsonl", [good[4], b"\xff\xfe\xfd", good[2], b'{"event_id": "t", "ts": 17'])
    (landing / "a-003.jsonl").write_bytes(b"")
    (landing / "a-004.jsonl.gz").write_bytes(gzip.compress(
        b"".join(json.dumps(e).encode() + b"\n" for e in good[5:40]))[:-30])
    (landing / "ignored.txt").write_text("not a landing file\n")

    report = IngestJob(cfg).run_once()
    events, quarantine = lake_rows(cfg)

    ids = [e["event_id"] for e in events]
    assert len(ids) == len(set(ids)), "no duplicate may reach the events table"
    assert {"e0", "e1", "e2", "e3", "e4"} <= set(ids)
    reasons = Counter(q["reason"].split(":")[0] for q in quarantine)
    assert reasons["duplicate event_id"] == 2  # e3 in the same file, e2 across files
    assert reasons["malformed JSON"] == 2 + (1 if any(q["line_no"] >= 0 and q["source_file"].endswith(".gz")
                                                     for q in quarantine) else 0)
    for expected in ("user_id must be > 0", "unknown action", "not valid UTF-8", "empty file", "corrupt gzip"):
        assert reasons[expected] >= 1, expected
    dup = next(q for q in quarantine if q["reason"] == "duplicate event_id" and q["source_file"] == "a-002.jsonl")
    assert json.loads(dup["raw"])["event_id"] == "e2"
    # Every line of the plain files is in exactly one table.
    for name in ("a-001.jsonl", "a-002.jsonl"):
        placed = [e["source_offset"] for e in events if e["source_file"] == name] + \
                 [q["source_offset"] for q in quarantine if q["source_file"] == name]
        assert sorted(placed) == line_starts((landing / name).read_bytes()).tolist()
    assert report.totals()["valid"] == len(events)
    assert report.docs_path and Path(report.docs_path.removeprefix("file://")).exists()
    # The files with duplicates were written again without them; what the parse tasks first wrote is gone.
    assert unreferenced_data_files(cfg.lake.events) == []


def test_rerun_adds_nothing_and_new_files_are_picked_up(lake_parsed_on):
    tmp, cfg = lake_parsed_on
    write_lines(tmp / "landing", "a-001.jsonl", [good_event(i) for i in range(50)])
    IngestJob(cfg).run_once()
    again = IngestJob(cfg).run_once()
    assert again.batches == []
    write_lines(tmp / "landing", "a-002.jsonl", [good_event(i) for i in range(45, 60)])
    IngestJob(cfg).run_once()
    events, quarantine = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(60))
    assert [q["reason"] for q in quarantine] == ["duplicate event_id"] * 5


def test_contract_types_in_delta(lake):
    tmp, cfg = lake
    write_lines(tmp / "landing", "a-001.jsonl", [good_event(i) for i in range(5)])
    IngestJob(cfg).run_once()
    from deltalake import DeltaTable

    table = DeltaTable(cfg.lake.events)
    schema = table.to_pyarrow_table().schema
    assert str(schema.field("ts").type) == "timestamp[us, tz=UTC]"
    assert table.metadata().partition_columns == ["dt"]
    first = table.to_pyarrow_table().sort_by("event_id").to_pylist()[0]
    assert first["ts"].timestamp() * 1000 == good_event(0)["ts"] and first["dt"] == "2026-01-01"


def test_failed_batch_expectation_quarantines_the_batch_and_exits_nonzero(tmp_path, capsys):
    # Impressions may be at most half of a batch: this batch is all impressions.
    args = [f"lake.root={tmp_path / 'lake'}", f"ingest.landing_dir={tmp_path / 'landing'}",
            "ingest.batch_rules.min_rows_for_rates=10",
            "ingest.batch_rules.action_share_bounds={impression: [0.0, 0.5]}"]
    write_lines(tmp_path / "landing", "a-001.jsonl", [{**good_event(i), "action": "impression"} for i in range(30)])
    code = ingest_main(["--once", *[part for a in args for part in ("--set", a)]])
    assert code == 2
    err = capsys.readouterr().err
    assert "expect_column_values_to_be_between(column=share_impression, max_value=0.5" in err
    cfg = make_config(tmp_path, *args[2:])
    events, quarantine = lake_rows(cfg)
    assert events == []
    assert len(quarantine) == 30
    assert all(q["reason"].startswith("batch expectation failed: expect_column_values_to_be_between("
                                      "column=share_impression") for q in quarantine)
    assert sorted(json.loads(q["raw"])["event_id"] for q in quarantine) == sorted(f"e{i}" for i in range(30))
    assert unreferenced_data_files(cfg.lake.events) == []  # the parse task's data files are removed with the batch


def test_follow_mode_picks_up_files_as_they_arrive(lake):
    import threading

    tmp, cfg = lake
    cfg.ingest.poll_interval_s = 0.2
    write_lines(tmp / "landing", "a-001.jsonl", [good_event(i) for i in range(10)])
    batches, done = [], threading.Event()

    def on_batch(batch) -> None:  # called as each batch commits, before the next poll
        batches.append(batch)
        if len(batches) == 1:  # a producer publishes the second file while the job runs (temp name, rename)
            write_lines(tmp / "landing", ".a-002.jsonl.tmp", [good_event(i) for i in range(10, 25)])
            (tmp / "landing" / ".a-002.jsonl.tmp").rename(tmp / "landing" / "a-002.jsonl")
        else:
            done.set()

    report = IngestJob(cfg).follow(max_seconds=120.0, on_batch=on_batch, stop=done)
    events, _ = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(25))
    assert [b.files for b in report.batches] == [1, 1] and len(batches) == 2


@pytest.mark.parametrize("config_file", ["expectations/events_batch.json", "validation_definitions/events_batch.json",
                                         "great_expectations.yml"])
def test_a_gx_project_file_emptied_by_a_kill_is_rebuilt(lake, config_file):
    # A run killed while GX rewrote its project files (as the crash trials caught once) leaves one empty.
    tmp, cfg = lake
    write_lines(tmp / "landing", "a-001.jsonl", [good_event(i) for i in range(20)])
    IngestJob(cfg).run_once()
    (Path(cfg.lake.gx_root) / "gx" / config_file).write_text("")
    write_lines(tmp / "landing", "a-002.jsonl", [good_event(i) for i in range(20, 30)])
    report = IngestJob(cfg).run_once()
    assert [b.valid for b in report.batches] == [10]
    events, _ = lake_rows(cfg)
    assert sorted(e["event_id"] for e in events) == sorted(f"e{i}" for i in range(30))
