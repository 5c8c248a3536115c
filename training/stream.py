"""The sample stream of one-pass training: its order, its position, and the scores it was validated with.

- `SampleStream` lists the `samples_ranking` files in time order (from the Delta log's per-file
  `sample_no` statistics; the builder writes rows in time order, one dt partition after another).
  Its `shard` is one training worker's feed: the worker reads its own `sample_no` ranges from those
  files itself, batch k*world + rank in round k, so the workers move through time together, a round
  per DDP step, and no process but the workers touches the rows.
- `StreamPosition` is the set of samples trained on so far, one bit per `sample_no`. A checkpoint stores
  it; after a restart every worker drops the rows whose bit is set, so no sample consumed before the
  checkpoint is trained on twice (rows trained after it are trained again: their update was lost).
- `PredictionLog` keeps each worker's progressive-validation scores (every sample scored before it is
  trained on). It is flushed as one Parquet file per worker per checkpoint, named by step, so a restart
  from step S moves the files of later steps aside (`*.rolledback`, kept for audits) and the survivors
  hold each sample exactly once.

>>> import tempfile
>>> position = StreamPosition(6)
>>> position.mark(np.array([0, 1, 3]))
>>> position.count, position.watermark, position.untrained(np.array([1, 2, 3])).tolist()
(3, 2, [False, True, False])
>>> log = PredictionLog(tempfile.mkdtemp(), rank=0, tasks=("click",))
>>> log.add(np.array([0, 0]), np.array([7, 7]), np.array([10, 10]), np.array([[0.2], [0.9]]), np.array([[0], [1]]))
>>> log.flush(step=5); log.rollback(after_step=4); len(PredictionLog.read(log.root, ("click",)))
0
"""

from __future__ import annotations

import heapq
import io
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from features.sample_contract import RankingContract
from storage import filesystem

SAMPLE_NO = "sample_no"


@dataclass
class SampleStream:
    """The `samples_ranking` table as a time-ordered stream (optionally its first `max_requests` rows), with the
    contract its builder committed (features/sample_contract.py). `files` are in `sample_no` order; `first` and
    `last` are each file's smallest and largest `sample_no` (the Delta log's statistics)."""

    files: list[str]
    first: list[int]
    last: list[int]
    num_samples: int
    rows_in_files: int
    contract: RankingContract

    @classmethod
    def open(cls, path: str, storage_options: dict[str, str] | None = None,
             max_requests: int | None = None) -> SampleStream:
        table = DeltaTable(path, storage_options=storage_options or None)
        meta = next((h for h in table.history() if h.get("operation") == "WRITE" and "tasks" in h), None)
        if meta is None:
            raise ValueError(f"{path} has no sample-builder commit (tasks/stat_names metadata): run ray_jobs.samples")
        contract = RankingContract.from_metadata({k: v for k, v in meta.items() if isinstance(v, str)}, path)
        adds = pa.table(table.get_add_actions(flatten=True)).to_pydict()
        lo, hi, rows = adds[f"min.{SAMPLE_NO}"], adds[f"max.{SAMPLE_NO}"], adds["num_records"]
        if any(v is None for v in (*lo, *hi)):
            raise ValueError(f"{path}: a file has no {SAMPLE_NO} statistics in the Delta log; rebuild the samples "
                             "with ray_jobs.samples")
        order = sorted(range(len(lo)), key=lambda i: lo[i])
        # Files may overlap in sample_no (delta-rs can write one partition's rows to two files at once); the
        # reader merges them. What must hold is that the rows are exactly 0..N-1, each once.
        if order and (lo[order[0]] != 0 or max(hi) + 1 != sum(rows)):
            raise ValueError(f"{path}: {SAMPLE_NO} runs {min(lo)}..{max(hi)} over {int(sum(rows))} rows, not 0..N-1 "
                             "each once; rebuild the samples with ray_jobs.samples")
        kept = [i for i in order if max_requests is None or lo[i] < max_requests]
        root = table.table_uri.rstrip("/")
        total = int(sum(rows))
        return cls(files=[f"{root}/{adds['path'][i]}" for i in kept], first=[int(lo[i]) for i in kept],
                   last=[int(hi[i]) for i in kept],
                   num_samples=total if max_requests is None else min(total, max_requests),
                   rows_in_files=int(sum(rows[i] for i in kept)), contract=contract)

    def head(self, columns: list[str], rows: int) -> pa.Table:
        """The stream's first `rows` samples (at most its length), in order, read on the caller."""
        return _RangeReader(self, columns).read(0, min(rows, self.num_samples))

    def shard(self, columns: list[str], batch_rows: int, rank: int, world: int, start: int = 0) -> Iterator[pa.Table]:
        """Worker `rank`'s batches of one pass, in order, read by this process from the table's files (plus
        `sample_no`). The stream is cut into batches of `batch_rows` (batch i = samples [i*b, (i+1)*b)) and
        round k gives batch k*world + r to worker r: the workers train round k as one DDP step, so every row
        is scored by a model trained on exactly the rows before its round (no skew between workers). Rounds
        that end at or before `start` are skipped unread (a resumed run's watermark)."""
        if batch_rows < 1 or world < 1 or not 0 <= rank < world:
            raise ValueError(f"shard: need batch_rows >= 1 and 0 <= rank < world, got {batch_rows}, {rank}, {world}")
        reader = _RangeReader(self, columns)
        round_rows = world * batch_rows
        for lo in range(start // round_rows * round_rows + rank * batch_rows, self.num_samples, round_rows):
            yield reader.read(lo, min(lo + batch_rows, self.num_samples))


class StreamPosition:
    """One bit per sample: trained or not."""

    def __init__(self, num_samples: int, bits: np.ndarray | None = None):
        self.trained = np.zeros(num_samples, bool) if bits is None else bits.astype(bool)

    def mark(self, sample_nos: np.ndarray) -> None:
        self.trained[sample_nos] = True

    def untrained(self, sample_nos: np.ndarray) -> np.ndarray:
        return ~self.trained[sample_nos]

    @property
    def count(self) -> int:
        return int(self.trained.sum())

    @property
    def watermark(self) -> int:
        """Every sample below this one has been trained on."""
        missing = np.flatnonzero(~self.trained)
        return int(missing[0]) if len(missing) else len(self.trained)

    def to_bytes(self) -> bytes:
        buf = io.BytesIO()
        np.savez_compressed(buf, bits=np.packbits(self.trained), n=len(self.trained))
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> StreamPosition:
        z = np.load(io.BytesIO(data))
        return cls(int(z["n"]), np.unpackbits(z["bits"])[: int(z["n"])])


class PredictionLog:
    """Progressive-validation scores of one worker: one row per scored candidate."""

    def __init__(self, root: str, rank: int, tasks: tuple[str, ...]):
        self.root, self.rank, self.tasks = root, rank, tasks
        self.fs, self.path = filesystem(root)
        self.fs.create_dir(self.path, recursive=True)
        self._parts: list[pa.Table] = []

    def add(self, sample_no, user_id, request_ts, probs: np.ndarray, labels: np.ndarray) -> None:
        cols = {SAMPLE_NO: sample_no, "user_id": user_id, "request_ts": request_ts}
        for t, task in enumerate(self.tasks):
            cols[f"p_{task}"] = probs[:, t].astype(np.float32)
            cols[f"y_{task}"] = labels[:, t].astype(np.int8)
        self._parts.append(pa.table(cols))

    def flush(self, step: int) -> None:
        """Write what was scored since the last flush as `step-<step>-rank-<rank>.parquet`.

        Written under a `.partial` name and renamed when complete: a worker killed mid-write leaves a partial
        file that no reader takes (and `rollback` removes), never a truncated `.parquet` (a kill trial found
        one, which the audit of the rolled-back scores could not read)."""
        if not self._parts:
            return
        table = pa.concat_tables(self._parts)
        final = f"{self.path}/step-{step:09d}-rank-{self.rank}.parquet"
        pq.write_table(table, final + ".partial", filesystem=self.fs)
        self.fs.move(final + ".partial", final)
        self._parts = []

    def rollback(self, after_step: int) -> None:
        """Set aside this worker's files written after `after_step` (their updates were lost); remove its
        partial files (writes a kill interrupted)."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.path)):
            step, rank = _step_rank(info.base_name)
            if rank != self.rank or step is None:
                continue
            if info.base_name.endswith(".partial"):
                self.fs.delete_file(info.path)
            elif step > after_step and not info.base_name.endswith(".rolledback"):
                self.fs.move(info.path, info.path + ".rolledback")

    @staticmethod
    def read(root: str, tasks: tuple[str, ...], rolled_back: bool = False) -> pa.Table:
        """Every kept (or, with `rolled_back`, every set-aside) score row, in sample order."""
        fs, path = filesystem(root)
        suffix = ".parquet.rolledback" if rolled_back else ".parquet"
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(path)) if i.base_name.endswith(suffix))
        if not files:
            cols = [SAMPLE_NO, "user_id", "request_ts"] + [f"{k}_{t}" for t in tasks for k in ("p", "y")] + ["step"]
            return pa.table({c: pa.array([], pa.int64()) for c in cols})
        tables = []
        for f in files:
            with fs.open_input_file(f) as fh:
                table = pq.read_table(fh)
            step, _ = _step_rank(os.path.basename(f))
            tables.append(table.append_column("step", pa.array(np.full(table.num_rows, step, np.int64))))
        table = pa.concat_tables(tables)
        return table.take(pc.sort_indices(table, [(SAMPLE_NO, "ascending")]))


class _RangeReader:
    """Reads rising `sample_no` ranges of a stream's files, decoding each Parquet row group at most once.

    Neither files nor the rows inside a file need be in order: delta-rs may write a later chunk of the builder's
    stream before an earlier one, and may write one partition's rows to two files at once, so a row group can
    hold the end of one chunk and the start of the next, and two files can cover the same span. Row groups are
    therefore taken by their `sample_no` statistics, across every file that may hold rows below a range's end:
    each such group is decoded (sorted) into a pool, the range is cut from each pooled group, and a group leaves
    the pool once a range passes its last row. Groups and files that end before a range are skipped unread."""

    def __init__(self, stream: SampleStream, columns: list[str]):
        self.files = deque(zip(stream.files, stream.first, stream.last, strict=True))  # unopened, by first row
        self.columns = columns
        self.fs = filesystem(stream.files[0])[0] if stream.files else None
        self.groups: list[tuple[int, int, int, int]] = []  # heap of unread groups: (min, max, file, group index)
        self.opened: list[tuple[str, pq.ParquetFile]] = []
        self.pool: list[tuple[np.ndarray, pa.Table]] = []  # decoded groups' rows not handed out yet, each sorted

    def read(self, lo: int, hi: int) -> pa.Table:
        """The rows with lo <= sample_no < hi, in order; a range must not start before the previous one ended."""
        self._decode_below(lo, hi)
        parts, kept = [], []
        for nos, table in self.pool:
            a, b = np.searchsorted(nos, lo), np.searchsorted(nos, hi)
            if b > a:
                parts.append(table.slice(a, b - a))
            if b < len(nos):
                kept.append((nos[b:], table.slice(b)))
        self.pool = kept
        if not parts:
            return pa.table({SAMPLE_NO: pa.array([], pa.int64())})
        out = pa.concat_tables(parts, promote_options="default").combine_chunks()
        return _in_order(out, f"{self.opened[-1][0]} (rows {lo}..{hi - 1})")

    def _decode_below(self, lo: int, hi: int) -> None:
        """Decode into the pool every unread row group that may hold rows in [lo, hi)."""
        while self.files and self.files[0][1] < hi:  # open every file that may hold rows below hi
            path, first, last = self.files.popleft()
            if last < lo:
                continue
            parquet = pq.ParquetFile(self.fs.open_input_file(filesystem(path)[1]))
            self.opened.append((path, parquet))
            for low, top, group in _group_bounds(parquet, first, last):
                heapq.heappush(self.groups, (low, top, len(self.opened) - 1, group))
        while self.groups and self.groups[0][0] < hi:  # later groups start later still
            _, top, file, group = heapq.heappop(self.groups)
            if top < lo:
                continue
            path, parquet = self.opened[file]
            names = parquet.schema_arrow.names
            wanted = [SAMPLE_NO, *(c for c in self.columns if c in names and c != SAMPLE_NO)]  # older tables lack
            table = _in_order(parquet.read_row_group(group, columns=wanted), f"{path} group {group}")
            nos = table[SAMPLE_NO].to_numpy()
            start = np.searchsorted(nos, lo)  # rows below `lo` belong to earlier ranges (other workers, or trained)
            if start < len(nos):
                self.pool.append((nos[start:], table.slice(start)))


def _group_bounds(parquet: pq.ParquetFile, first: int, last: int) -> list[tuple[int, int, int]]:
    """Each row group's (min, max) sample_no from the Parquet statistics (the file's, where a group has none)
    and its index."""
    meta = parquet.metadata
    leaves = [meta.schema.column(i).path for i in range(meta.num_columns)]  # list columns have nested leaves
    if SAMPLE_NO not in leaves:
        raise ValueError(f"a samples file has no {SAMPLE_NO} column; rebuild the samples with ray_jobs.samples")
    column = leaves.index(SAMPLE_NO)
    out = []
    for g in range(meta.num_row_groups):
        stats = meta.row_group(g).column(column).statistics
        known = stats is not None and stats.has_min_max
        out.append((int(stats.min) if known else first, int(stats.max) if known else last, g))
    return out


def _in_order(table: pa.Table, where: str) -> pa.Table:
    """The rows sorted by sample_no; a sample_no that appears twice is an error (the stream would train on it twice)."""
    nos = table[SAMPLE_NO].to_numpy()
    if (np.diff(nos) > 0).all():
        return table
    order = np.argsort(nos, kind="stable")
    if (np.diff(nos[order]) == 0).any():
        raise ValueError(f"{where}: a {SAMPLE_NO} appears twice; rebuild the samples with ray_jobs.samples")
    return table.take(pa.array(order))


def _step_rank(name: str) -> tuple[int | None, int | None]:
    parts = name.split(".")[0].split("-")
    if len(parts) != 4 or parts[0] != "step" or parts[2] != "rank":
        return None, None
    return int(parts[1]), int(parts[3])
