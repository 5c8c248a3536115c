"""Training samples (docs/design.md, "Training samples"): `samples_ranking` and `samples_retrieval` Delta tables.

Ranking: one row per recommendation request (live-stream) or exposure group (ratings), in time order:
- live-stream: the impressions sharing a `request_id` are the candidates, the request time T is the
  first of them. A candidate's labels come from the same user's engagements that carry the same
  request_id and item, dated in [T, T + samples.label_window_s): click, long view (a view of at least
  samples.long_view_s seconds), like, follow, gift. Engagements without a request_id are history, never labels;
- ratings (MovieLens): one user's ratings within one samples.group_window_s window (aligned to the epoch)
  form a group, T is the first of them; like = rating >= 4, love = rating == 5.
History: the user's last N engagements strictly before T. Stats: the user's, each candidate's and each
candidate's author's windowed stats as of T, taken from the feature tables with Feast's point-in-time
rule (the latest row at or before T, within the view's TTL), which only holds events before that row's
time. `stats_asof_ms` is the newest such row's time, for leakage checks. The commit that writes the table
carries its contract (features/sample_contract.py: kind, tasks, stat names, columns, vocabulary sizes).

Retrieval: per user, the chronological items of `samples.retrieval_actions` (the last
`samples.retrieval_max_length`); leave-one-out: the last item is the test target, the one before it validation.

    SampleBuilder(cfg).run()      # see ray_jobs.samples; run the feature job first
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from deltalake import CommitProperties, WriterProperties, write_deltalake

from config.schema import PlatformConfig
from features.job import FeatureJob
from features.offline import duckdb_connection
from features.partitions import prepare_events, with_partition
from features.repo import absolute_paths
from features.sample_contract import RankingContract
from features.sample_groups import RankingGroups, ranking_partition, retrieval_partition
from features.spec import FeatureStoreSpec
from ingestion.contract import day_strings

CHUNK_REQUESTS = 20_000  # requests joined with stats at once: bounds the driver's memory
# Training reads the stream in blocks of a few batches by sample_no range (training/stream.py); Parquet statistics
# can only skip whole row groups, so a row group per file (~100k rows) made every 1k-row block decode its file.
RANKING_ROW_GROUP_ROWS = 1024

log = logging.getLogger("features")


@dataclass
class SamplesReport:
    """What a build wrote: rows of each table and time per phase."""

    kind: str
    tasks: tuple[str, ...]
    requests: int = 0
    candidates: int = 0
    users: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


@contextlib.contextmanager
def sort_shuffle(preserve_order: bool = False) -> Iterator[None]:
    """Run Ray Data's groupbys as sort shuffles: on a small cluster the default hash shuffle starts
    aggregator actors per shuffle (4-10 s each on 2 cores), the pull-based sort shuffle tasks (~0.3 s).
    With `preserve_order`, blocks also come out in order (a sorted dataset iterates in sort order)."""
    from ray.data.context import ShuffleStrategy

    ctx = ray.data.DataContext.get_current()
    previous = ctx.shuffle_strategy, ctx.execution_options.preserve_order
    ctx.shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    ctx.execution_options.preserve_order = preserve_order or previous[1]
    try:
        yield
    finally:
        ctx.shuffle_strategy, ctx.execution_options.preserve_order = previous


def ranking_tasks(kind: str) -> tuple[str, ...]:
    """The label columns (`label_<task>`) of a kind of ranking samples."""
    return ("like", "love") if kind == "ratings" else ("click", "long_view", "like", "follow", "gift")


class SampleBuilder:
    """Builds both sample tables from the `events` table and the feature tables. Ray must be initialised."""

    def __init__(self, cfg: PlatformConfig):
        self.cfg = absolute_paths(cfg)
        self.spec = FeatureStoreSpec.from_config(self.cfg.features)
        self.opts = self.cfg.lake.storage_options or None
        self.ranking_path = self.cfg.lake.table("samples_ranking")
        self.retrieval_path = self.cfg.lake.table("samples_retrieval")

    def kind(self) -> str:
        """`samples.kind`, or when auto: ratings if the events hold ratings and no impressions."""
        if self.cfg.samples.kind != "auto":
            return self.cfg.samples.kind
        con = duckdb_connection()
        try:
            impressions, rates = con.execute(f"""
                SELECT count(*) FILTER (action = 'impression' AND request_id IS NOT NULL),
                       count(*) FILTER (action = 'rate') FROM delta_scan('{self.cfg.lake.events}')""").fetchone()
        finally:
            con.close()
        return "ratings" if rates and not impressions else "livestream"

    def contract(self, kind: str, tasks: tuple[str, ...]) -> RankingContract:
        """What `samples_ranking` promises its readers; vocabulary sizes are the largest ids in `events`."""
        con = duckdb_connection()
        try:
            users, items, authors = con.execute(f"""
                SELECT max(user_id), max(item_id), coalesce(max(author_id), 0)
                FROM delta_scan('{self.cfg.lake.events}')""").fetchone()
        finally:
            con.close()
        return RankingContract(kind=kind, tasks=tasks, stat_names=tuple(self.spec.stat_names),
                               num_users=int(users or 1), num_items=int(items or 1), num_authors=int(authors))

    def run(self) -> SamplesReport:
        """Rebuild both tables from the whole `events` table (each in one Delta commit)."""
        log.info("phase read")  # phase lines: where a kill landed, for bench.crash
        kind = self.kind()
        report = SamplesReport(kind=kind, tasks=ranking_tasks(kind))
        t = time.perf_counter()
        parts = self.cfg.features.partitions
        groups = RankingGroups(kind=kind, spec=self.spec, samples=self.cfg.samples, tasks=report.tasks)
        metadata = self.contract(kind, report.tasks).to_metadata()
        with sort_shuffle(preserve_order=True):
            events = (ray.data.read_delta(self.cfg.lake.events, storage_options=self.opts, columns=[
                "user_id", "item_id", "author_id", "request_id", "ts", "action", "value", "source_file",
                "source_offset"]).map_batches(_prepare_with_request, batch_format="pyarrow", batch_size=None)
                      .map_batches(with_partition, batch_format="pyarrow", batch_size=None,
                                   fn_kwargs={"key": "user_id", "partitions": parts})
                      .materialize())
            log.info("phase ranking")
            # Request rows leave Ray sorted by time, a chunk at a time: the driver holds one chunk, not all.
            requests = (events.groupby("part", num_partitions=parts)
                        .map_groups(ranking_partition, batch_format="pyarrow", fn_kwargs={"groups": groups})
                        .sort(["request_ts", "request_id"]))
            chunks = requests.iter_batches(batch_format="pyarrow", batch_size=CHUNK_REQUESTS)
            _write(self.ranking_path, self._with_stats(chunks, report), self.opts, ["dt"], metadata,
                   row_group_rows=RANKING_ROW_GROUP_ROWS)
            report.seconds["ranking"] = round(time.perf_counter() - t, 3)
            log.info("phase retrieval")  # the ranking table is committed, the retrieval table not yet
            t = time.perf_counter()
            sequences = (events.groupby("part", num_partitions=parts)
                         .map_groups(retrieval_partition, batch_format="pyarrow",
                                     fn_kwargs={"actions": self.cfg.samples.retrieval_actions,
                                                "max_length": self.cfg.samples.retrieval_max_length}))
            report.users = _write(self.retrieval_path, (b for t in sequences.iter_batches(
                batch_format="pyarrow", batch_size=None) for b in t.to_batches()), self.opts)
            report.seconds["retrieval"] = round(time.perf_counter() - t, 3)
        log.info("phase committed")
        return report

    def _with_stats(self, chunks: Iterator[pa.Table], report: SamplesReport) -> Iterator[pa.RecordBatch]:
        """Time-ordered request chunks -> sample rows with stats (`sample_no` counts from 0)."""
        con = duckdb_connection()
        job = FeatureJob(self.cfg)
        empty = self.spec.empty_stats().astype(np.float32)
        try:
            for chunk in chunks:
                start = report.requests
                ts_ms = pc.divide(pc.cast(chunk["request_ts"], pa.int64()), 1000).to_numpy()
                counts = pc.list_value_length(chunk["cand_item_ids"]).to_numpy()
                report.requests += chunk.num_rows
                report.candidates += int(counts.sum())
                rows = np.repeat(np.arange(chunk.num_rows), counts)
                cand_ts = ts_ms[rows]
                user = _asof(con, job.table("user"), "user_id", chunk["user_id"].to_numpy(), ts_ms, self.spec)
                items = _asof(con, job.table("item"), "item_id",
                              pc.list_flatten(chunk["cand_item_ids"]).to_numpy(), cand_ts, self.spec)
                authors = _asof(con, job.table("author"), "author_id",
                                pc.list_flatten(chunk["cand_author_ids"]).to_numpy(), cand_ts, self.spec)
                asof = user.asof.copy()
                np.maximum.at(asof, rows, np.maximum(items.asof, authors.asof))
                offsets = pa.array(np.r_[0, np.cumsum(counts)].astype(np.int32))
                out = chunk.append_column("sample_no", pa.array(np.arange(start, start + chunk.num_rows)))
                out = out.append_column("user_stats", _vectors(user.stats, empty))
                out = out.append_column("cand_item_stats",
                                        pa.ListArray.from_arrays(offsets, _vectors(items.stats, empty)))
                out = out.append_column("cand_author_stats",
                                        pa.ListArray.from_arrays(offsets, _vectors(authors.stats, empty)))
                out = out.append_column("stats_asof_ms", pa.array(asof, pa.int64()))
                out = out.append_column("dt", day_strings(pa.array(ts_ms)))
                yield from out.combine_chunks().to_batches()
        finally:
            con.close()


def _write(path: str, batches: Iterator[pa.RecordBatch], opts, partition_by: list[str] | None = None,
           metadata: dict[str, str] | None = None, row_group_rows: int | None = None) -> int:
    """Overwrite the table with `batches` in one commit (rows land in the order given); returns the row count.
    `row_group_rows` caps the Parquet row groups (the smallest unit a reader decodes)."""
    first = next(batches, None)
    if first is None:
        return 0
    written = 0

    def counted() -> Iterator[pa.RecordBatch]:
        nonlocal written
        for batch in _chain(first, batches):
            written += batch.num_rows
            yield batch

    write_deltalake(path, pa.RecordBatchReader.from_batches(first.schema, counted()), mode="overwrite",
                    partition_by=partition_by, schema_mode="overwrite", storage_options=opts,
                    commit_properties=CommitProperties(custom_metadata=metadata or {}),
                    writer_properties=WriterProperties(max_row_group_size=row_group_rows) if row_group_rows else None)
    return written


@dataclass
class _AsOf:
    stats: pa.ChunkedArray | list  # per query: the stats list, or null (no row within the TTL)
    asof: np.ndarray  # per query: the row's time in ms, 0 when none


def _asof(con, table: str, key: str, keys: np.ndarray, ts_ms: np.ndarray, spec: FeatureStoreSpec) -> _AsOf:
    """Feast's point-in-time rule with DuckDB's ASOF join: per (key, t) the latest row at or before t,
    ignored when older than the TTL. Rows come back in query order.

    Both sides are copied into temp tables and joined on integer milliseconds first: an ASOF join straight
    over a delta_scan and a registered Arrow table with timestamptz keys ran ~500x slower here."""
    if len(keys) == 0:
        return _AsOf([], np.zeros(0, np.int64))
    con.register("queries_arrow", pa.table({"q": np.arange(len(keys)), "k": np.asarray(keys, np.int64),
                                            "t": np.asarray(ts_ms, np.int64)}))
    con.execute("CREATE OR REPLACE TEMP TABLE queries AS SELECT * FROM queries_arrow")
    con.unregister("queries_arrow")
    con.execute(f"""CREATE OR REPLACE TEMP TABLE rows AS SELECT {key} AS k, asof_ms, stats FROM delta_scan('{table}')
                    WHERE asof_ms BETWEEN ? AND ?""", [int(ts_ms.min()) - spec.ttl_ms, int(ts_ms.max())])
    got = con.execute("""
        SELECT q.q, CASE WHEN r.asof_ms >= q.t - ? THEN r.stats END AS stats,
               CASE WHEN r.asof_ms >= q.t - ? THEN r.asof_ms ELSE 0 END AS asof_ms
        FROM queries q ASOF LEFT JOIN rows r ON q.k = r.k AND q.t >= r.asof_ms
        ORDER BY q.q""", [spec.ttl_ms, spec.ttl_ms]).fetch_arrow_table()
    return _AsOf(got["stats"], got["asof_ms"].to_numpy())


def _vectors(stats: pa.ChunkedArray | list, empty: np.ndarray) -> pa.Array:
    """Per row a stats vector (float32), the empty-entity stats where there was no row."""
    width = len(empty)
    n = len(stats)
    flat = np.tile(empty, (n, 1))
    if n:
        stats = pa.chunked_array(stats).combine_chunks() if isinstance(stats, pa.ChunkedArray) else stats
        present = np.asarray(stats.is_valid())
        flat[present] = pc.list_flatten(stats.filter(pa.array(present))).to_numpy().reshape(-1, width)
    offsets = pa.array(np.arange(0, (n + 1) * width, width, dtype=np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat.reshape(-1), pa.float32()))


def _prepare_with_request(batch: pa.Table) -> pa.Table:
    out = prepare_events(batch)
    for name in ("request_id", "source_file", "source_offset"):
        out = out.append_column(name, batch[name])
    return out


def _chain(first: pa.RecordBatch, rest: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
    yield first
    yield from rest

