"""The key index finds exactly the repeated event_ids a plain set would, also when hashes collide."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingestion import dedup
from ingestion.dedup import EventKeyIndex, SortedHashes

IDS = st.lists(st.text(alphabet="abc", min_size=1, max_size=3), max_size=30)


def reference(committed: list[list[str]], ids: list[str]) -> list[bool]:
    seen = {i for batch in committed for i in batch}
    out = []
    for event_id in ids:
        out.append(event_id in seen)
        seen.add(event_id)
    return out


def commit(path, batch_no: int, ids: list[str]) -> None:
    write_deltalake(str(path), pa.table({"event_id": pa.array(ids, pa.string()),
                                         "ingest_batch": pa.array([batch_no] * len(ids), pa.int64())}),
                    mode="append")


def colliding_hash(ids) -> np.ndarray:
    """Every id of the same length shares a hash: the exact comparison has to do all the work."""
    return np.array([len(s) for s in pa.chunked_array([ids]).to_pylist()] if len(ids) else [], np.uint64)


@pytest.mark.parametrize("collide", [False, True])
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(IDS, min_size=1, max_size=7))  # 7: runs merge and stay apart
def test_duplicates_match_a_plain_set(tmp_path_factory, monkeypatch, collide, batches):
    if collide:
        monkeypatch.setattr(dedup, "hash_ids", colliding_hash)
    path = tmp_path_factory.mktemp("events")
    commit(path, 0, [])
    index = EventKeyIndex(DeltaTable(str(path)))
    committed: list[list[str]] = []
    for batch_no, ids in enumerate(batches, start=1):
        column = pa.chunked_array([pa.array(ids, pa.string())])
        keys = SortedHashes(dedup.hash_ids(column))
        mask = index.duplicates(column, batch_no, keys)
        assert mask.tolist() == reference(committed, ids)
        kept = [i for i, dup in zip(ids, mask) if not dup]
        commit(path, batch_no, kept)
        index.committed(SortedHashes(keys.hashes[~mask]), batch_no)
        committed.append(kept)


def test_a_redone_batch_sees_only_earlier_batches(tmp_path):
    path = tmp_path / "events"
    commit(path, 1, ["a", "b"])
    commit(path, 2, ["c"])  # batch 2 committed its events, then the run died; the redo must not see them
    index = EventKeyIndex(DeltaTable(str(path)))
    for ids, batch_no, expected in ((["c", "a", "d", "d"], 3, [True, True, False, True]),
                                    (["c", "a", "d"], 2, [False, True, False])):
        column = pa.array(ids)
        assert index.duplicates(column, batch_no, SortedHashes(dedup.hash_ids(column))).tolist() == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 2**64 - 1) | st.integers(0, 9), max_size=600))
def test_stable_order_equals_numpys_stable_argsort(values):
    """Long enough for numpy's unstable sort to leave equal values out of row order (it is stable only below ~16)."""
    array = np.array(values, np.uint64)
    assert dedup.stable_order(array).tolist() == np.argsort(array, kind="stable").tolist()


def test_stable_order_puts_ties_back_in_row_order_where_the_plain_sort_does_not():
    array = np.random.default_rng(0).integers(0, 3, 5_000).astype(np.uint64)
    assert np.argsort(array).tolist() != np.argsort(array, kind="stable").tolist()  # the case the fix-up is for
    assert dedup.stable_order(array).tolist() == np.argsort(array, kind="stable").tolist()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), max_size=12), max_size=6))
def test_merged_sorted_parts_equal_one_stable_sort_of_the_whole(parts):
    """Parse tasks sort their own file's hashes; merging them must give exactly what sorting the batch gives."""
    arrays = [np.array(p, np.uint64) for p in parts]
    merged = SortedHashes.concat([SortedHashes(a) for a in arrays])
    whole = np.concatenate(arrays) if arrays else np.zeros(0, np.uint64)
    assert merged.hashes.tolist() == whole.tolist()
    assert merged.order.tolist() == np.argsort(whole, kind="stable").tolist()
    assert merged.values.tolist() == sorted(whole.tolist())


def test_a_failed_background_merge_is_raised_by_the_next_probe_and_loses_no_run(tmp_path, monkeypatch):
    path = tmp_path / "events"
    commit(path, 0, [])
    index = EventKeyIndex(DeltaTable(str(path)))
    for batch_no, ids in ((1, ["a", "b"]), (2, ["c", "d"])):
        column = pa.array(ids)
        keys = SortedHashes(dedup.hash_ids(column))
        assert not index.duplicates(column, batch_no, keys).any()
        commit(path, batch_no, ids)
        if batch_no == 2:  # the second equal-sized run is merged in the thread: make that fail
            def no_room() -> None:  # as the merge's sort would fail: before it replaces any run
                raise MemoryError("no room")

            monkeypatch.setattr(index, "_merge_runs", no_room)
        index.committed(keys, batch_no)
    column = pa.array(["a", "d", "e"])
    with pytest.raises(MemoryError, match="no room"):
        index.duplicates(column, 3, SortedHashes(dedup.hash_ids(column)))
    monkeypatch.undo()
    assert index.duplicates(column, 3, SortedHashes(dedup.hash_ids(column))).tolist() == [True, True, False]


def test_a_prefetched_index_answers_as_a_probed_one_and_its_error_reaches_the_probe(tmp_path, monkeypatch):
    path = tmp_path / "events"
    commit(path, 1, ["a", "b"])
    commit(path, 2, ["c"])
    column = pa.array(["c", "x", "a", "x"])
    keys = SortedHashes(dedup.hash_ids(column))
    index = EventKeyIndex(DeltaTable(str(path)))
    index.prefetch(3)  # what the job does as a batch starts parsing
    assert index.duplicates(column, 3, keys).tolist() == [True, False, True, True]
    index.prefetch(3)  # nothing left to read: no thread
    assert index._background is None

    def unreadable(*_, **__):
        raise OSError("lake unreachable")

    fresh = EventKeyIndex(DeltaTable(str(path)))
    monkeypatch.setattr(fresh.events, "to_pyarrow_table", unreadable)
    fresh.prefetch(3)
    with pytest.raises(OSError, match="lake unreachable"):
        fresh.duplicates(column, 3, keys)
    monkeypatch.undo()
    assert fresh.duplicates(column, 3, keys).tolist() == [True, False, True, True]  # nothing half-read was kept
