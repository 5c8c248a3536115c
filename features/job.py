"""The feature job: Delta `events` -> Ray Data -> windowed stats and sequence snapshots (Delta) -> Feast.

One run:
1. Plans from the Delta log alone (file statistics, no data read): the last closed boundary is the one
   at or before the newest event; the first boundary to (re)compute is the one after the previous run's
   last, or earlier when new files hold late events. Nothing new in the log: nothing to do.
2. Reads only the events that can reach those boundaries (the new range plus the longest window before
   it), hash-partitions them by entity with Ray Data and computes every row where a window changes
   (`features.partitions`). Sequences start from each user's last snapshot instead of older events.
3. Replaces the feature tables' rows from the first recomputed boundary on (one Delta commit per table),
   records the run in `_features_state`, then materialises the new range into Feast's online store.
A crash before step 3's state row just makes the next run redo the same range; the predicate overwrite
makes that idempotent.

    job = FeatureJob(config.load()); report = job.run()     # see ray_jobs.features
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import ray
from deltalake import DeltaTable, write_deltalake

from config.schema import PlatformConfig
from features import partitions
from features.offline import (
    FEATURE_TABLES,
    PARTITION_BY,
    duckdb_connection,
    ms_to_datetime,
    open_table,
    replace_from,
    table_schema,
)
from features.repo import absolute_paths
from features.spec import ENTITY_KEYS, SEQUENCE_VIEW, STATS_ENTITIES, FeatureSpec, stats_view
from ingestion.contract import TS_TYPE

STATE_SCHEMA = pa.schema([
    pa.field("run", pa.int64(), nullable=False),
    pa.field("events_version", pa.int64(), nullable=False),
    pa.field("stats_k_hi", pa.int64(), nullable=False),
    pa.field("sequence_k_hi", pa.int64(), nullable=False),
    pa.field("finished_at", TS_TYPE, nullable=False),
])


# Rows of the sequence computation's input: one engagement (or earlier token) each.
TOKEN_SCHEMA = pa.schema([pa.field(n, pa.int64()) for n in ("user_id", "item_id", "author_id", "ts_ms")]
                         + [pa.field("action", pa.int8())])


@dataclass
class JobState:
    """What a finished run covered: the events version it saw and the last boundary of each table."""

    run: int
    events_version: int
    stats_k_hi: int
    sequence_k_hi: int


@dataclass
class FeatureJobReport:
    """What one run read and wrote (ranges are None when that table had nothing new)."""

    events_version: int
    events_read: int = 0
    stats_range: tuple[datetime, datetime] | None = None  # first and last boundary written
    sequence_range: tuple[datetime, datetime] | None = None
    rows: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def noop(self) -> bool:
        return self.stats_range is None and self.sequence_range is None


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


class FeatureJob:
    """Incremental feature computation for one lake. Ray must already be initialised."""

    def __init__(self, cfg: PlatformConfig):
        self.cfg = absolute_paths(cfg)
        self.spec = FeatureSpec.from_config(self.cfg.features)
        self.opts = self.cfg.lake.storage_options or None
        self.state_path = self.cfg.lake.table("_features_state")

    def table(self, kind: str) -> str:
        return self.cfg.lake.table(FEATURE_TABLES[kind])

    def ensure_tables(self) -> None:
        """Create the empty feature tables (Feast validates its sources when applying)."""
        for kind in FEATURE_TABLES:
            if open_table(self.table(kind), self.opts) is None:
                DeltaTable.create(self.table(kind), table_schema(self.spec, kind), partition_by=PARTITION_BY,
                                  mode="ignore", storage_options=self.opts)

    def last_state(self) -> JobState | None:
        """The last finished run, or None before the first."""
        table = open_table(self.state_path, self.opts)
        if table is None:
            return None
        rows = table.to_pyarrow_table().sort_by("run").to_pylist()
        return JobState(**{k: rows[-1][k] for k in ("run", "events_version", "stats_k_hi", "sequence_k_hi")}) \
            if rows else None

    def _time_bounds(self, events: DeltaTable, state: JobState | None) -> tuple[int, int] | None:
        """(oldest new event, newest event) in epoch ms, from the log's file statistics."""
        adds = pa.table(events.get_add_actions(flatten=True))
        if adds.num_rows == 0:
            return None
        new = adds
        if state is not None:
            before = pa.table(DeltaTable(events.table_uri, version=state.events_version,
                                         storage_options=self.opts).get_add_actions(flatten=True))
            new = adds.filter(pc.invert(pc.is_in(adds["path"], value_set=before["path"])))
            if new.num_rows == 0:
                return None
        new_min = pc.min(pc.cast(new["min.ts"], pa.int64())).as_py() // 1000
        return new_min, pc.max(pc.cast(adds["max.ts"], pa.int64())).as_py() // 1000

    def run(self, materialize: bool = True, store=None) -> FeatureJobReport:
        """Compute what is new since the last run; `store` (a FeatureStore) is opened when not given."""
        started = time.perf_counter()
        self.ensure_tables()
        events = DeltaTable(self.cfg.lake.events, storage_options=self.opts)
        report = FeatureJobReport(events_version=events.version())
        state = self.last_state()
        if state is not None and state.events_version == report.events_version:
            return report
        bounds = self._time_bounds(events, state)
        if bounds is None:
            return report
        new_min, newest = bounds
        spec = self.spec
        s_hi = newest // spec.hop_ms
        s_lo = new_min // spec.hop_ms + 1 if state is None else min(state.stats_k_hi + 1, new_min // spec.hop_ms + 1)
        q_hi = newest // spec.sequence_hop_ms
        q_lo = (new_min // spec.sequence_hop_ms + 1 if state is None
                else min(state.sequence_k_hi + 1, new_min // spec.sequence_hop_ms + 1))
        with sort_shuffle():
            if s_lo <= s_hi:
                report.events_read = self._write_stats(s_lo, s_hi, report)
                report.stats_range = (ms_to_datetime(s_lo * spec.hop_ms), ms_to_datetime(s_hi * spec.hop_ms))
            if q_lo <= q_hi:
                self._write_sequences(q_lo, q_hi, report)
                report.sequence_range = (ms_to_datetime(q_lo * spec.sequence_hop_ms),
                                         ms_to_datetime(q_hi * spec.sequence_hop_ms))
        run_no = (state.run + 1) if state else 1
        self._record(JobState(run_no, report.events_version, max(s_hi, state.stats_k_hi if state else s_hi),
                              max(q_hi, state.sequence_k_hi if state else q_hi)))
        report.seconds["compute"] = round(time.perf_counter() - started, 3)
        if materialize and not report.noop:
            t = time.perf_counter()
            self.materialize(report, store)
            report.seconds["materialize"] = round(time.perf_counter() - t, 3)
        return report

    # -- stats --------------------------------------------------------------------------------
    def _read_events(self, lo_ms: int, hi_ms: int, columns: list[str], extra: pads.Expression | None = None):
        lo = pa.scalar(lo_ms * 1000, TS_TYPE)
        hi = pa.scalar(hi_ms * 1000, TS_TYPE)
        days = (pads.field("dt") >= ms_to_datetime(lo_ms).strftime("%Y-%m-%d")) & \
               (pads.field("dt") <= ms_to_datetime(hi_ms).strftime("%Y-%m-%d"))
        expr = days & (pads.field("ts") >= lo) & (pads.field("ts") < hi)
        if extra is not None:
            expr = expr & extra
        ds = ray.data.read_delta(self.cfg.lake.events, columns=columns, filter=expr, storage_options=self.opts)
        return ds.map_batches(partitions.prepare_events, batch_format="pyarrow", batch_size=None)

    def _write_stats(self, k_lo: int, k_hi: int, report: FeatureJobReport) -> int:
        spec, parts = self.spec, self.cfg.features.partitions
        lo_ms = (k_lo - max(spec.window_hops)) * spec.hop_ms
        # At least `parts` blocks: the sort shuffle behind groupby makes one partition per input block.
        base = self._read_events(lo_ms, k_hi * spec.hop_ms, ["user_id", "item_id", "author_id", "ts", "action",
                                                             "value"]).repartition(parts).materialize()
        events_read = base.count()
        for entity in STATS_ENTITIES:
            t = time.perf_counter()
            key = ENTITY_KEYS[entity]
            rows = (base.select_columns([key, "ts_ms", "action", "value", *(["author_id"] if entity == "item" else [])])
                    .map_batches(partitions.with_partition, batch_format="pyarrow", batch_size=None,
                                 fn_kwargs={"key": key, "partitions": parts})
                    .groupby("part", num_partitions=parts)
                    .map_groups(partitions.stats_partition, batch_format="pyarrow",
                                fn_kwargs={"entity": entity, "spec": spec, "k_lo": k_lo, "k_hi": k_hi}))
            report.rows[stats_view(entity)] = self._replace(entity, rows, k_lo * spec.hop_ms)
            report.seconds[stats_view(entity)] = round(time.perf_counter() - t, 3)
        return events_read

    def _replace(self, kind: str, ds, from_ms: int) -> int:
        written = 0

        def batches():
            nonlocal written
            for table in ds.iter_batches(batch_format="pyarrow", batch_size=None):
                written += table.num_rows
                yield from table.to_batches()

        replace_from(self.table(kind), batches(), table_schema(self.spec, kind), from_ms, self.opts,
                     {"features_from_ms": str(from_ms)})
        return written

    # -- sequences ----------------------------------------------------------------------------
    def _prior_tokens(self, k_lo: int, lo_ms: int, hi_ms: int) -> pa.Table:
        """Tokens of each active user's last snapshot before boundary k_lo, one row per token."""
        names = ", ".join(f"'{a}'" for a in partitions.engagement_filter(self.spec).to_pylist())
        con = duckdb_connection()
        try:
            return con.execute(f"""
                WITH active AS (
                    SELECT DISTINCT user_id FROM delta_scan('{self.cfg.lake.events}')
                    WHERE ts >= ? AND ts < ? AND action IN ({names})),
                last AS (
                    SELECT s.* FROM delta_scan('{self.table("sequence")}') s SEMI JOIN active USING (user_id)
                    WHERE s.event_timestamp < ?
                    QUALIFY row_number() OVER (PARTITION BY s.user_id ORDER BY s.event_timestamp DESC) = 1)
                SELECT user_id, unnest(item_ids) AS item_id, unnest(author_ids) AS author_id,
                       unnest(ts) AS ts_ms, CAST(unnest(actions) AS TINYINT) AS action
                FROM last
            """, [ms_to_datetime(lo_ms), ms_to_datetime(hi_ms),
                  ms_to_datetime(k_lo * self.spec.sequence_hop_ms)]).fetch_arrow_table()
        finally:
            con.close()

    def _write_sequences(self, k_lo: int, k_hi: int, report: FeatureJobReport) -> None:
        spec, parts = self.spec, self.cfg.features.partitions
        t = time.perf_counter()
        lo_ms, hi_ms = (k_lo - 1) * spec.sequence_hop_ms, k_hi * spec.sequence_hop_ms
        engaged = pads.field("action").isin(partitions.engagement_filter(spec))
        tokens = self._read_events(lo_ms, hi_ms, ["user_id", "item_id", "author_id", "ts", "action"], engaged)
        prior = self._prior_tokens(k_lo, lo_ms, hi_ms)
        if prior.num_rows:
            tokens = tokens.union(ray.data.from_arrow(prior.cast(TOKEN_SCHEMA)))
        rows = (tokens.repartition(parts)
                .map_batches(partitions.with_partition, batch_format="pyarrow", batch_size=None,
                             fn_kwargs={"key": "user_id", "partitions": parts})
                .groupby("part", num_partitions=parts)
                .map_groups(partitions.sequence_partition, batch_format="pyarrow",
                            fn_kwargs={"spec": spec, "k_lo": k_lo, "k_hi": k_hi}))
        report.rows[SEQUENCE_VIEW] = self._replace("sequence", rows, k_lo * spec.sequence_hop_ms)
        report.seconds[SEQUENCE_VIEW] = round(time.perf_counter() - t, 3)

    # -- bookkeeping and Feast ----------------------------------------------------------------
    def _record(self, state: JobState) -> None:
        row = pa.table({"run": [state.run], "events_version": [state.events_version],
                        "stats_k_hi": [state.stats_k_hi], "sequence_k_hi": [state.sequence_k_hi],
                        "finished_at": pa.array([datetime.now(UTC)], TS_TYPE)},
                       schema=STATE_SCHEMA)
        write_deltalake(self.state_path, row, mode="append", storage_options=self.opts)

    def materialize(self, report: FeatureJobReport, store=None) -> None:
        """Load the recomputed range's latest rows per entity into the online store (Feast's materialize)."""
        from features.repo import apply_definitions

        store = store or apply_definitions(self.cfg)
        if report.stats_range:
            store.materialize(report.stats_range[0], report.stats_range[1],
                              feature_views=[stats_view(e) for e in STATS_ENTITIES])
        if report.sequence_range:
            store.materialize(report.sequence_range[0], report.sequence_range[1], feature_views=[SEQUENCE_VIEW])

