"""Which event_ids of a batch the lake already holds, or the batch repeats, against a compact key index.

The index keeps a 64-bit hash (DuckDB's `hash`) of every event_id the lake committed in earlier batches,
with the batch it came in, sorted. A batch's ids are hashed and probed against it: no hash in common means no
id in common (equal ids hash equally), so the common case never reads the lake. Hashes in common (a
redelivered event, or rarely two ids sharing a hash) are settled exactly: the event_ids of only the batches
those hashes came from are read back and compared as strings. Repeats inside the batch are found the same
way, and the first occurrence in (file, line) order is the one kept.

The index is built from the lake the first time a run needs it (16 bytes per event) and extended with each
batch the run commits, so a follow-mode run reads the lake's event_ids once, not once per batch. It is a few
sorted runs, not one sorted array: a batch's hashes are sorted once and added as a run, and runs are merged like
a binary counter (at most ~log2(batches) runs; each hash is copied O(log batches) times in all). Inserting 1M hashes
into one sorted array cost ~0.7 s per batch (`np.insert`), a new run ~0.1 s.
"""

from __future__ import annotations

import threading

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable

_connections = threading.local()  # connecting costs ~14 ms, as much as hashing 100,000 ids


def hash_ids(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """64-bit hashes of strings, in their order: the same string gets the same hash in every process (DuckDB's
    `hash` has no seed), so parse tasks hash and the driver's index compares."""
    con = getattr(_connections, "con", None)
    if con is None:
        con = _connections.con = duckdb.connect()
    con.register("ids", pa.table({"id": ids}))
    try:
        # DuckDB keeps insertion order for a plain projection (its preserve_insertion_order default).
        return con.sql("SELECT hash(id) AS h FROM ids").fetchnumpy()["h"].astype(np.uint64, copy=False)
    finally:
        con.unregister("ids")


def _first_occurrences(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Indices of the first occurrence of each distinct string."""
    rows = pa.table({"id": ids, "row": pa.array(np.arange(len(ids)))})
    return np.asarray(rows.group_by("id", use_threads=False).aggregate([("row", "min")])["row_min"])


class EventKeyIndex:
    """Hashes of the event_ids committed in batches before `upto`, with their batch numbers, in sorted runs.

        index = EventKeyIndex(DeltaTable(cfg.lake.events))
        keys = hash_ids(ids); repeated = index.duplicates(ids, batch_no, keys)
        ...commit ids[~repeated]...; index.committed(keys[~repeated], batch_no)
    """

    def __init__(self, events: DeltaTable):
        self.events = events
        self.runs: list[tuple[np.ndarray, np.ndarray]] = []  # (hashes sorted, their batches); sizes decrease
        self.upto: int | None = None
        # (keys, their sort order) of the last `duplicates` call: a batch without duplicates commits the very array
        # it probed, and sorting 1M hashes again would cost ~0.1 s.
        self._probed: tuple[np.ndarray, np.ndarray] | None = None

    def _insert(self, keys: np.ndarray, batches: np.ndarray, order: np.ndarray | None = None) -> None:
        order = np.argsort(keys, kind="stable") if order is None else order
        run = keys[order], batches[order]
        while self.runs and len(self.runs[-1][0]) <= len(run[0]):
            older = self.runs.pop()
            merged = np.concatenate([older[0], run[0]])
            order = np.argsort(merged, kind="stable")  # timsort: two sorted runs merge in linear time
            run = merged[order], np.concatenate([older[1], run[1]])[order]
        self.runs.append(run)

    def _cover(self, batch_no: int) -> None:
        """Make the index hold exactly the batches before `batch_no`, reading only what it lacks."""
        if self.upto is None or self.upto > batch_no:  # first use, or a batch is redone: start over
            self.runs, self.upto = [], 0
        if self.upto == batch_no:
            return
        self.events.update_incremental()
        rows = self.events.to_pyarrow_table(columns=["event_id", "ingest_batch"], filters=[
            ("ingest_batch", ">=", self.upto), ("ingest_batch", "<", batch_no)])
        if rows.num_rows:
            self._insert(hash_ids(rows["event_id"]), rows["ingest_batch"].to_numpy())
        self.upto = batch_no

    def committed(self, keys: np.ndarray, batch_no: int) -> None:
        """Record the `hash_ids` of the ids a batch just committed (when the index covers the batches before it)."""
        if self.upto == batch_no:
            if len(keys):
                probed = self._probed
                order = probed[1] if probed is not None and probed[0] is keys else None
                self._insert(keys, np.full(len(keys), batch_no, np.int64), order)
            self.upto = batch_no + 1
        self._probed = None

    def _batches_sharing(self, sorted_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(positions in `sorted_keys` whose hash the index holds, the batches those hashes came from)."""
        shared, sources = [], []
        for run_keys, run_batches in self.runs:
            # Sorted needles: numpy's binary search starts from the previous answer, and memory is read in order.
            lo, hi = np.searchsorted(run_keys, sorted_keys), np.searchsorted(run_keys, sorted_keys, "right")
            hits = np.flatnonzero(hi > lo)
            shared.append(hits)
            sources += [run_batches[a:b] for a, b in zip(lo[hits], hi[hits])]
        return (np.unique(np.concatenate(shared)) if shared else np.zeros(0, np.int64),
                np.unique(np.concatenate(sources)) if sources else np.zeros(0, np.int64))

    def duplicates(self, ids: pa.ChunkedArray | pa.Array, batch_no: int, keys: np.ndarray) -> np.ndarray:
        """Mask of the ids of batch `batch_no` that an earlier batch committed or that repeat an earlier row.

        `keys` are the ids' `hash_ids` (the caller keeps them to record the batch once it is committed)."""
        dup = np.zeros(len(ids), dtype=bool)
        if len(ids) == 0:
            return dup
        self._cover(batch_no)
        order = np.argsort(keys, kind="stable")
        self._probed = (keys, order)
        sorted_keys = keys[order]
        at, sources = self._batches_sharing(sorted_keys)
        if at.size:
            shared = np.sort(order[at])
            self.events.update_incremental()
            known = self.events.to_pyarrow_table(columns=["event_id"], filters=[
                ("ingest_batch", "in", sources.tolist())])["event_id"]
            found = pc.is_in(ids.take(pa.array(shared)), value_set=known)
            dup[shared[found.to_numpy(zero_copy_only=False)]] = True
        if (sorted_keys[1:] == sorted_keys[:-1]).any():  # only rows whose hash repeats can repeat an id
            _, inverse, counts = np.unique(keys, return_inverse=True, return_counts=True)
            suspects = np.flatnonzero(counts[inverse] > 1)
            firsts = np.zeros(suspects.size, dtype=bool)
            firsts[_first_occurrences(ids.take(pa.array(suspects)))] = True
            dup[suspects[~firsts]] = True
        return dup
