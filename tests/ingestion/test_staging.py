"""Parse tasks write data files and statistics the driver commits: the pieces must add up to the whole."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pyarrow as pa
from deltalake import DeltaTable, write_deltalake
from hypothesis import given, settings
from hypothesis import strategies as st

from config.schema import IngestConfig
from ingestion.batch_stats import batch_statistics, file_statistics, repeated_ids
from ingestion.contract import ACTIONS, EVENTS_PARTITION_BY, EVENTS_SCHEMA, EventTimeBounds
from ingestion.dedup import SortedHashes, hash_ids
from ingestion.lake import commit_once, open_or_create
from ingestion.parse import FileLimits
from ingestion.staging import read_data_files, restage_without, stage_file, to_events, write_data_files
from tests.ingestion.lake_checks import good_event, unreferenced_data_files, write_lines

DAY_MS = 86_400_000

row = st.fixed_dictionaries({
    "event_id": st.sampled_from(["a", "b", "c", "dd", "a-much-longer-event-id"]),
    "ts": st.integers(1_767_225_600_000, 1_767_225_600_000 + 3 * DAY_MS),
    "user_id": st.integers(-2, 50), "item_id": st.integers(1, 9),
    "author_id": st.none() | st.integers(0, 5),
    "request_id": st.none() | st.text(max_size=4),
    "action": st.sampled_from([*ACTIONS, "dance"]),
    "value": st.none() | st.floats(allow_nan=True, allow_infinity=True),
})


def raw_table(rows: list[dict]) -> pa.Table:
    table = pa.Table.from_pylist(rows, schema=pa.schema([
        ("event_id", pa.string()), ("ts", pa.int64()), ("user_id", pa.int64()), ("item_id", pa.int64()),
        ("author_id", pa.int64()), ("request_id", pa.string()), ("action", pa.string()), ("value", pa.float64())]))
    return table.append_column("source_file", pa.array(["f"] * len(rows), pa.string())) \
        .append_column("source_offset", pa.array(np.arange(len(rows)) * 10, pa.int64()))


def differing(a: dict, b: dict) -> list[str]:
    """Keys whose values differ (NaN equals NaN; floats to 1e-12: sums of rates are added in another order)."""
    def equal(x, y) -> bool:
        if x is None or y is None:
            return x is y
        return x == y or (math.isnan(x) and math.isnan(y)) or abs(x - y) < 1e-12
    return sorted(k for k in a.keys() | b.keys() if k not in a or k not in b or not equal(a[k], b[k]))


@settings(max_examples=60, deadline=None)
@given(st.lists(row, min_size=1, max_size=40), st.lists(st.integers(0, 40), max_size=4))
def test_statistics_merged_from_files_equal_the_statistics_of_the_whole_batch(rows, cuts):
    cfg = IngestConfig(batch_rules={"min_rows_for_rates": 5, "max_null_rate": {"author_id": 0.5},
                                    "action_share_bounds": {"click": (0.0, 0.9)}})
    events = to_events(raw_table(rows), batch_no=3)
    bounds = sorted({0, len(rows), *(c for c in cuts if c < len(rows))})
    parts = [file_statistics(events.slice(a, b - a)) for a, b in itertools.pairwise(bounds)]
    ids, hashes = events["event_id"], SortedHashes(hash_ids(events["event_id"]))
    merged = batch_statistics(parts, repeated_ids(ids, hashes), cfg)
    whole = batch_statistics([file_statistics(events)], len(rows) - len(set(r["event_id"] for r in rows)), cfg)
    assert differing(merged, whole) == []


def test_event_id_hashes_are_the_same_in_every_process():
    ids = ["e1", "sim7-12345", "x" * 128, "ünïcode"]
    here = hash_ids(pa.array(ids)).tolist()
    code = ("import json, sys, pyarrow as pa; from ingestion.dedup import hash_ids; "
            "print(json.dumps(hash_ids(pa.array(json.loads(sys.argv[1]))).tolist()))")
    there = json.loads(subprocess.run([sys.executable, "-c", code, json.dumps(ids)], capture_output=True,
                                      text=True, check=True).stdout)
    assert here == there


def test_the_warm_up_task_imports_the_parser_in_a_worker_that_had_not():
    """Ray ships a remote function by value; the warm-up must import the parser itself, not just run."""
    from ray import cloudpickle

    from ingestion.staging import _loaded

    code = ("import pickle, sys; task = pickle.loads(sys.stdin.buffer.read()); before = 'ingestion.parse' in "
            "sys.modules; task(); print(before, 'ingestion.parse' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], input=cloudpickle.dumps(_loaded._function),
                         capture_output=True, check=True).stdout.decode().split()
    assert out == ["False", "True"]


def test_committed_data_files_read_and_skip_as_delta_own_writes(tmp_path):
    rows = [{**good_event(i), "ts": good_event(i)["ts"] + (i % 3) * DAY_MS} for i in range(300)]
    events = to_events(raw_table(rows), batch_no=7)
    theirs = str(tmp_path / "written_by_delta")
    write_deltalake(theirs, events, partition_by=EVENTS_PARTITION_BY)
    ours = str(tmp_path / "committed")
    table = open_or_create(ours, EVENTS_SCHEMA, EVENTS_PARTITION_BY)
    assert commit_once(table, write_data_files(events, ours, 7), EVENTS_SCHEMA, 7, EVENTS_PARTITION_BY)
    assert not commit_once(table, [], EVENTS_SCHEMA, 7, EVENTS_PARTITION_BY)  # the batch is there already

    def by_day(path: str) -> dict:
        actions = pa.table(DeltaTable(path).get_add_actions(flatten=True)).to_pylist()
        return {a["partition.dt"]: {k: v for k, v in a.items() if k.startswith(("num_records", "null_count.", "min.",
                                                                                  "max."))} for a in actions}

    mine, delta_own = by_day(ours), by_day(theirs)
    assert mine.keys() == delta_own.keys() and len(mine) == 3
    for day, stats in mine.items():
        for key, value in stats.items():
            if value is not None:
                assert value == delta_own[day][key], (day, key)
        assert stats["num_records"] == delta_own[day]["num_records"]
        assert stats["min.ts"] is not None and stats["max.ingest_batch"] == 7
    key = "event_id"
    assert DeltaTable(ours).to_pyarrow_table().sort_by(key) == DeltaTable(theirs).to_pyarrow_table().sort_by(key)
    one_day = [("ts", "<", events["ts"][0].as_py().replace(hour=23))]
    assert DeltaTable(ours).to_pyarrow_table(filters=one_day).num_rows == 100


def test_a_file_staged_again_without_rows_keeps_the_others_and_removes_its_old_files(tmp_path):
    landing = tmp_path / "landing"
    write_lines(landing, "a.jsonl", [good_event(i) for i in range(20)])
    options = {"landing": str(landing), "bounds": EventTimeBounds.from_config(IngestConfig()),
               "now_ms": 1_800_000_000_000, "limits": FileLimits.from_config(IngestConfig()), "isolate": False}
    table_path = str(tmp_path / "events")
    table = open_or_create(table_path, EVENTS_SCHEMA, EVENTS_PARTITION_BY)
    staged = stage_file("a.jsonl", options, table_path, batch_no=1)
    assert staged.keys.num_rows == 20 and staged.statistics["rows"] == 20
    again = restage_without(staged, np.array([0, 7, 19]), table_path, batch_no=1)
    kept = [f"e{i}" for i in range(20) if i not in (0, 7, 19)]
    assert again.keys["event_id"].to_pylist() == kept
    assert again.hashes.hashes.tolist() == hash_ids(pa.array(kept)).tolist()
    assert again.statistics["rows"] == 17
    assert sorted(read_data_files(again.data_files, table_path)["event_id"].to_pylist()) == sorted(kept)
    assert len(unreferenced_data_files(table_path)) == len(again.data_files)  # written, not committed yet
    commit_once(table, again.data_files, EVENTS_SCHEMA, 1, EVENTS_PARTITION_BY)
    assert unreferenced_data_files(table_path) == []


def test_repeated_ids_are_counted_exactly_when_hashes_collide():
    ids = pa.array(["a", "b", "a", "a", "c", "b"])
    assert repeated_ids(ids, SortedHashes(hash_ids(ids))) == 3
    assert repeated_ids(ids, SortedHashes(np.zeros(6, np.uint64))) == 3  # every hash equal: the strings decide
    assert repeated_ids(pa.array(["a", "b"]), SortedHashes(np.zeros(2, np.uint64))) == 0
