"""Which event_ids of a batch the lake already holds, or the batch repeats, against a compact key index.

The index keeps a 64-bit hash (DuckDB's `hash`) of every event_id the lake committed in earlier batches, sorted,
and each batch's own sorted hashes beside them. A batch's ids are hashed and probed against it: no hash in common
means no id in common (equal ids hash equally), so the common case never reads the lake. Hashes in common (a
redelivered event, or rarely two ids sharing a hash) are settled exactly: the event_ids of only the batches
those hashes came from are read back and compared as strings. Repeats inside the batch are found the same
way, and the first occurrence in (file, line) order is the one kept.

The index is built from the lake the first time a run needs it (16 bytes per event: 8 in the runs, 8 in its
batch's array) and extended with each batch the run commits, so a follow-mode run reads the lake's event_ids
once, not once per batch. It is a few sorted runs, not one sorted array: a batch's sorted hashes are added as a
run, and runs are merged like a binary counter (at most ~log2(batches) runs; each hash is copied O(log batches)
times in all). Inserting 1M hashes into one sorted array cost ~0.7 s per batch (`np.insert`).

A batch's hashes are sorted where they are made: each parse task sorts its file's (`SortedHashes`) and the driver
merges the files' sorted runs (`SortedHashes.concat`, timsort: 15 ms for 10 x 100,000 hashes against 85 ms sorting
them afresh). The same sorted array is probed, checked for repeats, counted by the gate and added to the index.
"""

from __future__ import annotations

import functools
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


def stable_order(values: np.ndarray) -> np.ndarray:
    """`np.argsort(values, kind="stable")`, made from numpy's unstable sort (SIMD: 100,000 hashes ~1 ms against
    ~6 ms) with the rows of equal values, rare among hashes, put back in row order.

    >>> stable_order(np.array([5, 1, 5, 1], np.uint64)).tolist()
    [1, 3, 0, 2]
    """
    order = np.argsort(values)
    ranked = values[order]
    tie = ranked[1:] == ranked[:-1]
    if tie.any():
        # Equal values sit in runs of the sorted order; re-sorting only the runs' slots by (value, row) keeps every
        # run in its slots and puts its rows in ascending order.
        in_run = np.zeros(len(values), dtype=bool)
        in_run[1:] |= tie
        in_run[:-1] |= tie
        rows = order[in_run]
        order[in_run] = rows[np.lexsort((rows, ranked[in_run]))]
    return order


class SortedHashes:
    """`hash_ids` of rows in row order (`hashes`) and the same values sorted (`values`); the stable order that sorts
    them (`order`) is made only when asked for: the driver needs it for rows whose hash repeats, which are rare.

    >>> parts = [SortedHashes(np.array([5, 1, 5], np.uint64)), SortedHashes(np.array([1, 3], np.uint64))]
    >>> whole = SortedHashes.concat(parts)
    >>> whole.values.tolist(), whole.order.tolist()  # equal hashes stay in row order
    ([1, 1, 3, 5, 5], [1, 3, 4, 0, 2])
    >>> whole.sharing().tolist()  # rows whose hash another row has (5 at rows 0 and 2, 1 at rows 1 and 3)
    [0, 1, 2, 3]
    """

    def __init__(self, hashes: np.ndarray | list[np.ndarray], values: np.ndarray | None = None):
        # A list: the row-order parts of a concatenation, joined only when asked for (see `concat`).
        self._parts = hashes if isinstance(hashes, list) else [hashes]
        self.values = np.sort(self.hashes) if values is None else values

    @functools.cached_property
    def hashes(self) -> np.ndarray:
        return self._parts[0] if len(self._parts) == 1 else np.concatenate(self._parts)

    @functools.cached_property
    def order(self) -> np.ndarray:
        return stable_order(self.hashes)

    def __getstate__(self) -> dict:  # a parse task sends what it sorted, not the order nobody may ask for
        return {"hashes": self.hashes, "values": self.values}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["hashes"], state["values"])

    def __len__(self) -> int:
        return len(self.values)

    def sharing(self) -> np.ndarray:
        """Row positions (ascending) whose hash another row shares: the only rows whose id can repeat one.

        A sorted value equal to a neighbour marks a shared hash; the order that says which rows hold them is made
        only then."""
        same = self.values[1:] == self.values[:-1]
        if not same.any():
            return np.zeros(0, np.int64)
        shared = np.zeros(len(self.values), dtype=bool)
        shared[1:] |= same
        shared[:-1] |= same
        return np.sort(self.order[shared])

    @classmethod
    def concat(cls, parts: list[SortedHashes]) -> SortedHashes:
        """The parts' rows one after another, their values sorted (a 1M-row batch: ~6 ms, where merging the orders
        too took 27-63 ms of the batch's serial tail).

        Only the values are joined, and sorted in place: the row-order hashes are needed only for `order`, when a
        hash repeats. Each fresh 8 MB array cost up to ~15 ms in page faults here (9-36 ms -> 6 ms in all)."""
        if not parts:
            return cls(np.zeros(0, np.uint64))
        values = np.concatenate([p.values for p in parts])
        values.sort()  # equal values are interchangeable: numpy's default (SIMD) sort, twice as fast as its stable one
        return cls([p.hashes for p in parts], values)


def _first_occurrences(ids: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Indices of the first occurrence of each distinct string."""
    rows = pa.table({"id": ids, "row": pa.array(np.arange(len(ids)))})
    return np.asarray(rows.group_by("id", use_threads=False).aggregate([("row", "min")])["row_min"])


class EventKeyIndex:
    """Hashes of the event_ids committed in batches before `upto`: all of them in a few sorted runs (to probe), and
    each batch's own sorted hashes (to tell which batches a probed hash came from).

        index = EventKeyIndex(DeltaTable(cfg.lake.events))
        keys = SortedHashes(hash_ids(ids)); repeated = index.duplicates(ids, batch_no, keys)
        ...commit ids[~repeated]...; index.committed(SortedHashes(keys.hashes[~repeated]), batch_no)
    """

    def __init__(self, events: DeltaTable):
        self.events = events
        self.runs: list[np.ndarray] = []  # sorted hashes; sizes decrease
        # Batch numbers live beside the runs, not in them: merging runs then moves 8 bytes per hash, not 16, and
        # needs no argsort (3M hashes: ~20 ms against ~100 ms, paid by the commit of the batch that merges).
        self.by_batch: dict[int, np.ndarray] = {}
        self.upto: int | None = None
        # Work off the batch's path: merging the runs after a commit, reading the lake's ids ahead of a probe.
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None

    def _merge_runs(self) -> None:
        """Merge the newest run into older ones while it is at least as long (a binary counter)."""
        runs = self.runs
        while len(runs) >= 2 and len(runs[-2]) <= len(runs[-1]):
            runs[-2:] = [np.sort(np.concatenate(runs[-2:]), kind="stable")]  # timsort merges two runs; lose none

    def wait(self) -> None:
        """Wait for work started by `committed` or `prefetch` (before the runs are read or changed); raises its
        error."""
        if self._background is not None:
            self._background.join()
            self._background = None
            if self._background_error is not None:
                error, self._background_error = self._background_error, None
                raise error

    def _in_background(self, work, *args) -> None:
        """Run `work(*args)` in a thread; its error is raised by the next `wait`, in the caller's thread."""
        def run() -> None:
            try:
                work(*args)
            except BaseException as err:
                self._background_error = err

        self._background = threading.Thread(target=run, name="key-index", daemon=True)
        self._background.start()

    def _add_batch(self, batch_no: int, sorted_keys: np.ndarray) -> None:
        self.by_batch[batch_no] = sorted_keys
        self.runs.append(sorted_keys)

    def prefetch(self, batch_no: int) -> None:
        """Start reading what the index lacks for batch `batch_no` from the lake, in a thread; `duplicates` waits.

        A fresh run on a lake with history reads and hashes every committed event_id (~0.2 s per million here,
        docs/scaling.md); started when the batch is planned, that overlaps the batch's parse. The lake's tables
        are not used by the caller meanwhile (the job starts it after its plan's commit and waits at the probe)."""
        self.wait()
        if self.upto != batch_no:
            self._in_background(self._read_lake, batch_no)

    def _cover(self, batch_no: int) -> None:
        """Make the index hold exactly the batches before `batch_no`, reading only what it lacks."""
        self.wait()
        self._read_lake(batch_no)

    def _read_lake(self, batch_no: int) -> None:
        if self.upto is None or self.upto > batch_no:  # first use, or a batch is redone: start over
            self.runs, self.by_batch, self.upto = [], {}, 0
        if self.upto == batch_no:
            return
        self.events.update_incremental()
        rows = self.events.to_pyarrow_table(columns=["event_id", "ingest_batch"], filters=[
            ("ingest_batch", ">=", self.upto), ("ingest_batch", "<", batch_no)])
        if rows.num_rows:
            keys, batches = hash_ids(rows["event_id"]), rows["ingest_batch"].to_numpy()
            order = np.lexsort((keys, batches))  # by batch, then hash: each batch's sorted hashes are a slice
            by_batch, batches = keys[order], batches[order]
            starts = np.flatnonzero(np.diff(batches, prepend=batches[0] - 1))
            for start, stop in zip(starts, [*starts[1:], len(keys)]):
                self.by_batch[int(batches[start])] = by_batch[start:stop]
            self.runs.append(np.sort(keys))  # one run for all the batches read
            self._merge_runs()
        self.upto = batch_no

    def committed(self, keys: SortedHashes, batch_no: int) -> None:
        """Record the hashes of the ids a batch just committed (when the index covers the batches before it).

        The runs are merged in a thread (numpy sorts without the GIL): a follower reports the batch at once and the
        merge (~20-50 ms per million hashes merged) overlaps the next batch's parse, which waits for it only at
        its probe."""
        self.wait()
        if self.upto == batch_no:
            if len(keys):
                self._add_batch(batch_no, keys.values)
                self._in_background(self._merge_runs)
            self.upto = batch_no + 1

    def _batches_sharing(self, sorted_keys: np.ndarray) -> tuple[np.ndarray, list[int]]:
        """(positions in `sorted_keys` whose hash the index holds, the batches those hashes came from)."""
        shared = [np.zeros(0, np.int64)]
        for run in self.runs:
            # Sorted needles: numpy's binary search starts from the previous answer, and memory is read in order.
            at = np.minimum(np.searchsorted(run, sorted_keys), len(run) - 1)
            shared.append(np.flatnonzero(run[at] == sorted_keys))
        hits = np.unique(np.concatenate(shared))
        if not hits.size:
            return hits, []
        wanted = sorted_keys[hits]  # usually a handful: a redelivered event, or two ids sharing a hash
        sources = [b for b, keys in self.by_batch.items()
                   if (keys[np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)] == wanted).any()]
        return hits, sources

    def duplicates(self, ids: pa.ChunkedArray | pa.Array, batch_no: int, keys: SortedHashes) -> np.ndarray:
        """Mask of the ids of batch `batch_no` that an earlier batch committed or that repeat an earlier row.

        `keys` are the ids' hashes (the caller keeps them to record the batch once it is committed)."""
        dup = np.zeros(len(ids), dtype=bool)
        if len(ids) == 0:
            return dup
        self._cover(batch_no)
        at, sources = self._batches_sharing(keys.values)
        if at.size:
            shared = np.sort(keys.order[at])
            self.events.update_incremental()
            known = self.events.to_pyarrow_table(columns=["event_id"], filters=[
                ("ingest_batch", "in", sources)])["event_id"]
            found = pc.is_in(ids.take(pa.array(shared)), value_set=known)
            dup[shared[found.to_numpy(zero_copy_only=False)]] = True
        suspects = keys.sharing()
        if suspects.size:
            firsts = np.zeros(suspects.size, dtype=bool)
            firsts[_first_occurrences(ids.take(pa.array(suspects)))] = True
            dup[suspects[~firsts]] = True
        return dup
