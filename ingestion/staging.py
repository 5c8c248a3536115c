"""Parse tasks write their file's rows as data files of the `events` table; the driver commits what passed.

A task parses one landing file, turns its valid rows into `events` rows and writes them as Parquet data files
inside the table's folder (one per `dt` day), with the Delta statistics readers skip files by. It sends back
only what the driver decides with: the rejects, each row's event_id, hash and position (for de-duplication
and to quarantine a duplicate), the file's gate statistics and the data files' add actions. The driver never
holds the batch's rows: a 1M-event batch moves ~35 bytes per row to it instead of ~120, and the Parquet
encoding runs in the tasks, in parallel.

Written files are not part of the table until the driver's one commit names them (`ingestion.lake.commit_once`,
which carries the batch's transaction marker). Files of a batch that is quarantined, rewritten without its
duplicates or killed before its commit are never referenced: the first two are deleted at once, a kill's are
left for Delta's `vacuum`, as any Delta writer's are.

Where the tasks run (`ingest.parse_on`, resolved by `parse_on`): in Ray tasks, one per file, when the job joins a
cluster (`ray.address` set), so a batch spreads over its nodes; in the driver's threads when the job's Ray would
be this machine alone. There, worker processes add nothing threads lack (the parser releases the GIL in Arrow's
reader and Parquet writer: 10 files took 0.55 s on 2 threads against 1.0 s on one) and cost a cold import of the
parser in every worker (~0.26 s of a core each, pandas most of it) plus Ray's own start (2.5 s here).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from deltalake.transaction import AddAction

import storage
from config.schema import PlatformConfig
from ingestion.batch_stats import file_statistics, scalar
from ingestion.contract import EVENTS_PARTITION_BY, EVENTS_SCHEMA, TS_TYPE, day_strings
from ingestion.dedup import SortedHashes, hash_ids
from ingestion.parse import parse_landing_files

_DATA_SCHEMA = pa.schema([f for f in EVENTS_SCHEMA if f.name not in EVENTS_PARTITION_BY])  # dt is in the path
# Columns the add actions carry minima and maxima for: the ones readers filter on. Strings are left out
# (delta-rs truncates long string bounds; a wrong bound would make a reader skip a file it needs).
_BOUNDED = [f.name for f in _DATA_SCHEMA if pa.types.is_integer(f.type) or pa.types.is_floating(f.type)
            or pa.types.is_timestamp(f.type)]
KEY_COLUMNS = ["event_id", "source_offset", "line_no", "source_file"]
# Dictionary-encode only the columns with few distinct values: trying it on event_ids and offsets costs 40% of
# the write and saves nothing (a 100,000-event file: 23 against 40 ms, 1.99 against 2.15 MB).
_DICTIONARY = ["action", "request_id", "source_file"]


def to_events(valid: pa.Table, batch_no: int) -> pa.Table:
    """Parsed rows (`ts` in ms, lineage columns) -> `EVENTS_SCHEMA` rows of ingestion batch `batch_no`."""
    ts = pc.cast(pc.multiply(valid["ts"], 1000), pa.int64()).cast(TS_TYPE)
    n = valid.num_rows
    return pa.table({
        "event_id": valid["event_id"], "ts": ts, "user_id": valid["user_id"], "item_id": valid["item_id"],
        "author_id": valid["author_id"], "request_id": valid["request_id"], "action": valid["action"],
        "value": valid["value"], "dt": day_strings(valid["ts"]),
        "ingest_batch": pa.array(np.full(n, batch_no, dtype=np.int64)),
        "source_file": valid["source_file"],
        "source_offset": valid["source_offset"],
    }).cast(EVENTS_SCHEMA)


def _stat(value):
    """A JSON statistic: timestamps as Delta writes them (ISO, UTC, milliseconds), non-finite floats left out."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if hasattr(value, "isoformat"):
        return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"
    return value


def _delta_stats(rows: pa.Table) -> str:
    """Delta's per-file statistics: row count, null counts, and bounds of the numeric and time columns.

    Timestamp bounds are written in milliseconds, as Delta's are; event times are whole milliseconds (`to_events`
    makes them from the contract's ms), so the bounds are exact, never rounded inwards."""
    low, high = {}, {}
    for name in _BOUNDED:
        bounds = pc.min_max(rows[name])
        lo, hi = _stat(scalar(bounds["min"])), _stat(scalar(bounds["max"]))
        if lo is not None and hi is not None:
            low[name], high[name] = lo, hi
    return json.dumps({"numRecords": rows.num_rows, "minValues": low, "maxValues": high,
                       "nullCount": {name: rows[name].null_count for name in _DATA_SCHEMA.names}})



def write_data_files(events: pa.Table, table_uri: str, batch_no: int) -> list[AddAction]:
    """Write `events` rows as one Parquet file per day under `table_uri` (not committed); their add actions."""
    fs, root = storage.filesystem(table_uri)
    actions = []
    days = pc.unique(events["dt"]).to_pylist()
    for day in sorted(days):
        rows = events if len(days) == 1 else events.filter(pc.equal(events["dt"], day))
        data = rows.select(_DATA_SCHEMA.names).cast(_DATA_SCHEMA)
        buffer = io.BytesIO()
        # Parquet min/max only where Delta keeps bounds too: string bounds (random event_ids) skip nothing, and
        # computing them was a fifth of the write (15 -> 12.5 ms per 100,000 rows).
        pq.write_table(data, buffer, compression="snappy", use_dictionary=_DICTIONARY, write_statistics=_BOUNDED)
        relative = f"dt={day}/part-b{batch_no:08d}-{uuid.uuid4()}.parquet"
        fs.create_dir(f"{root}/dt={day}", recursive=True)
        with fs.open_output_stream(f"{root}/{relative}") as out:
            out.write(buffer.getbuffer())
        actions.append(AddAction(relative, buffer.tell(), {"dt": day}, int(time.time() * 1000), True,
                                 _delta_stats(data)))
    return actions


def read_data_files(actions: list[AddAction], table_uri: str) -> pa.Table:
    """The `events` rows of uncommitted data files (their `dt` from the add actions)."""
    fs, root = storage.filesystem(table_uri)
    parts = []
    for a in actions:
        rows = pq.read_table(f"{root}/{a.path}", filesystem=fs, schema=_DATA_SCHEMA)
        parts.append(rows.append_column("dt", pa.repeat(pa.scalar(a.partition_values["dt"]), rows.num_rows)))
    return (pa.concat_tables(parts) if parts else EVENTS_SCHEMA.empty_table()).select(EVENTS_SCHEMA.names)


def delete_data_files(actions: list[AddAction], table_uri: str) -> None:
    fs, root = storage.filesystem(table_uri)
    for a in actions:
        fs.delete_file(f"{root}/{a.path}")


@dataclass
class StagedFile:
    """One landing file after its parse task: what the driver needs, not the rows themselves."""
    name: str
    rejects: pa.Table  # parse.REJECT_FILE_SCHEMA
    keys: pa.Table  # KEY_COLUMNS of each valid row, in line order
    hashes: SortedHashes  # of keys["event_id"], sorted here so the driver only merges the files' runs
    data_files: list[AddAction]
    statistics: dict  # batch_stats.file_statistics of the rows written


def stage_file(name: str, options: dict, table_uri: str, batch_no: int) -> StagedFile:
    """Parse one landing file and write its valid rows; `options` are `parse_landing_files`' keyword arguments."""
    valid, rejects = parse_landing_files([name], **options)
    events = to_events(valid, batch_no)
    data_files = write_data_files(events, table_uri, batch_no) if events.num_rows else []
    return StagedFile(name, rejects, valid.select(KEY_COLUMNS), SortedHashes(hash_ids(valid["event_id"])),
                      data_files, file_statistics(events))


def restage_without(staged: StagedFile, drop: np.ndarray, table_uri: str, batch_no: int) -> StagedFile:
    """`staged` with the rows at positions `drop` (of its keys) removed: its data files written again."""
    gone = pa.array(staged.keys["source_offset"].to_numpy()[drop])
    events = read_data_files(staged.data_files, table_uri)
    events = events.filter(pc.invert(pc.is_in(events["source_offset"], value_set=gone)))
    data_files = write_data_files(events, table_uri, batch_no) if events.num_rows else []
    delete_data_files(staged.data_files, table_uri)
    keep = np.ones(staged.keys.num_rows, dtype=bool)
    keep[drop] = False
    return StagedFile(staged.name, staged.rejects, staged.keys.filter(pa.array(keep)),
                      SortedHashes(staged.hashes.hashes[keep]),
                      data_files, file_statistics(events))


# Ray retries the task when its worker dies; an error reading the file or writing the table fails the try.
@ray.remote(num_cpus=1)
def stage_task(name: str, options: dict, table_uri: str, batch_no: int) -> StagedFile:
    return stage_file(name, options, table_uri, batch_no)


@ray.remote(num_cpus=1)
def _loaded() -> bool:
    """Import this module (the parser, DuckDB, Parquet) in a worker ahead of the files.

    The import must be in the body: Ray sends a remote function by value, so a worker imports only the modules
    the function's code names (an empty body imported nothing, and the first parse task paid ~0.3 s for it)."""
    return importlib.import_module(__name__).stage_file is not None


def warm_up_workers() -> None:
    """One no-op task per CPU the cluster has, not waited for; the imports come off a cold batch's parse."""
    for _ in range(max(1, int(ray.cluster_resources().get("CPU", 1)))):
        _loaded.remote()


def parse_on(cfg: PlatformConfig) -> str:
    """Where the ingestion job parses: `ingest.parse_on`, with "auto" meaning "ray" when the job joins a cluster
    (`ray.address` set) and "threads" (in the driver, no Ray at all) when it would start a local one.

    >>> import config
    >>> parse_on(config.load(None, [])), parse_on(config.load(None, ["ray.address=auto"]))
    ('threads', 'ray')
    """
    if cfg.ingest.parse_on != "auto":
        return cfg.ingest.parse_on
    return "ray" if cfg.ray.address else "threads"


@dataclass
class Staging:
    """A batch's files being staged; `result()` waits for them (in file order) and raises a task's error."""
    result: Callable[[], list[StagedFile]]


class ThreadStager:
    """Stages a batch's files in this process's threads, one file per thread at a time, results in file order.
    `start` returns at once; the caller works on while the files parse and collects them with `.result()`.

    `threads`: the job's CPUs on this machine (`ray.num_cpus`, the budget a local Ray would get), else every core
    this process may run on; each thread holds one file's rows at a time. The threads live as long as the stager:
    each keeps its DuckDB connection (`dedup.hash_ids`) across batches."""

    def __init__(self, threads: int | None = None):
        self.threads = threads or len(os.sched_getaffinity(0))
        self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="ingest-parse")

    def start(self, names: list[str], options: dict, table_uri: str, batch_no: int) -> Staging:
        futures = [self._pool.submit(stage_file, name, options, table_uri, batch_no) for name in names]
        return Staging(lambda: [f.result() for f in futures])


class RayStager:
    """Stages a batch's files in Ray tasks, one per file, results in file order (as `ThreadStager`); Ray must be
    initialised."""

    def __init__(self):
        warm_up_workers()  # cold workers load the parser while the driver opens the lake and plans the batch

    def start(self, names: list[str], options: dict, table_uri: str, batch_no: int) -> Staging:
        refs = [stage_task.remote(name, options, table_uri, batch_no) for name in names]
        return Staging(lambda: ray.get(refs))
