"""The sample stream of one-pass training: its order, its position, and the scores it was validated with.

- `SampleStream` lists the `samples_ranking` files in time order (from the Delta log's per-file
  `sample_no` statistics; the builder writes rows in time order, one dt partition after another) and
  reads them with Ray Data in that order.
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

import io
import itertools
import math
import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from deltalake import DeltaTable

from features.sample_contract import RankingContract
from storage import filesystem

SAMPLE_NO = "sample_no"


@dataclass
class SampleStream:
    """The `samples_ranking` table as a time-ordered stream (optionally its first `max_requests` rows), with the
    contract its builder committed (features/sample_contract.py)."""

    files: list[str]
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
        order = sorted(range(len(lo)), key=lambda i: lo[i])
        for a, b in itertools.pairwise(order):
            if hi[a] >= lo[b]:
                raise ValueError(f"{path}: files overlap in {SAMPLE_NO} ({adds['path'][a]}, {adds['path'][b]}); "
                                 "rebuild the samples (they must be written in time order)")
        root = table.table_uri.rstrip("/")
        files = [f"{root}/{adds['path'][i]}" for i in order if max_requests is None or lo[i] < max_requests]
        total = int(sum(rows))
        in_files = int(sum(rows[i] for i in order if max_requests is None or lo[i] < max_requests))
        return cls(files=files, num_samples=total if max_requests is None else min(total, max_requests),
                   rows_in_files=in_files, contract=contract)

    def head(self, columns: list[str], rows: int) -> pa.Table:
        """The stream's first `rows` samples (at most its length), in order, read on the caller."""
        wanted = columns if SAMPLE_NO in columns else [SAMPLE_NO, *columns]  # the order comes from it
        return _read_chunk(pa.table({"id": [0]}), self.files, wanted, min(rows, self.num_samples), self.num_samples)

    def dataset(self, columns: list[str], block_rows: int = 128):
        """A Ray Dataset of the stream in order, one block per `block_rows` samples (the caller sets preserve_order
        on the consumer). Each block is read by sample_no range (Parquet row-group statistics prune the files):
        Ray's Parquet reader may schedule a file's row groups in any order, and `streaming_split` hands whole
        blocks to whichever worker asks next, so small ordered blocks keep the workers together in time."""
        import ray

        chunks = max(1, math.ceil(self.num_samples / block_rows))
        return ray.data.range(chunks, override_num_blocks=chunks).map_batches(
            _read_chunk, batch_size=1, batch_format="pyarrow",
            fn_kwargs={"files": self.files, "columns": columns, "rows": block_rows, "limit": self.num_samples})


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
        """Write what was scored since the last flush as `step-<step>-rank-<rank>.parquet`."""
        if not self._parts:
            return
        table = pa.concat_tables(self._parts)
        pq.write_table(table, f"{self.path}/step-{step:09d}-rank-{self.rank}.parquet", filesystem=self.fs)
        self._parts = []

    def rollback(self, after_step: int) -> None:
        """Set aside this worker's files written after `after_step` (their updates were lost)."""
        for info in self.fs.get_file_info(pafs.FileSelector(self.path)):
            step, rank = _step_rank(info.base_name)
            if rank == self.rank and step is not None and step > after_step:
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


def _read_chunk(batch: pa.Table, files: list[str], columns: list[str], rows: int, limit: int) -> pa.Table:
    lo = int(batch["id"][0].as_py()) * rows
    hi = min(lo + rows, limit)
    fs, _ = filesystem(files[0])
    data = pads.dataset([filesystem(f)[1] for f in files], filesystem=fs, format="parquet")
    wanted = [c for c in columns if c in data.schema.names]  # older tables may lack newer optional columns
    table = data.to_table(columns=wanted, filter=(pads.field(SAMPLE_NO) >= lo) & (pads.field(SAMPLE_NO) < hi))
    return table.take(pc.sort_indices(table, [(SAMPLE_NO, "ascending")]))


def _step_rank(name: str) -> tuple[int | None, int | None]:
    parts = name.split(".")[0].split("-")
    if len(parts) != 4 or parts[0] != "step" or parts[2] != "rank":
        return None, None
    return int(parts[1]), int(parts[3])
