"""The feature job: Delta `events` -> Ray tasks -> windowed stats and sequence snapshots (Delta) -> Feast.

One run:
1. Plans from the Delta log alone (file statistics, no data read): the last closed boundary is the one
   at or before the newest event; the first boundary to (re)compute is the one after the previous run's
   last, or earlier when new files hold late events. Nothing new in the log: nothing to do.
2. Reads only the events that can reach those boundaries (the new range plus the longest window before
   it) once, cuts them by entity hash and computes every row where a window changes, a Ray task per
   (table, partition) (`features.shuffle`, `features.partitions`). Sequences start from each user's last
   snapshot instead of older events.
3. Replaces the feature tables' rows from the first recomputed boundary on (one Delta commit per table, the
   four written side by side as their partitions finish), records the run in `_features_state`, then
   materialises the new range into Feast's online store.
A crash before step 3's state row just makes the next run redo the same range; the predicate overwrite
makes that idempotent.

    job = FeatureJob(config.load()); report = job.run()     # see ray_jobs.features
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
from deltalake import DeltaTable, write_deltalake

from config.schema import PlatformConfig
from features import shuffle
from features.offline import (
    FEATURE_TABLES,
    PARTITION_BY,
    duckdb_connection,
    ms_to_datetime,
    open_table,
    replace_from,
    table_schema,
    writer_properties,
)
from features.partitions import TOKEN_SCHEMA, engagement_filter
from features.repo import absolute_paths
from features.spec import SEQUENCE_VIEW, STATS_ENTITIES, FeatureStoreSpec, stats_view
from ingestion.contract import TS_TYPE

log = logging.getLogger("features")

STATE_SCHEMA = pa.schema([
    pa.field("run", pa.int64(), nullable=False),
    pa.field("events_version", pa.int64(), nullable=False),
    pa.field("stats_k_hi", pa.int64(), nullable=False),
    pa.field("sequence_k_hi", pa.int64(), nullable=False),
    pa.field("finished_at", TS_TYPE, nullable=False),
])


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


class FeatureJob:
    """Incremental feature computation for one lake. Ray must already be initialised."""

    def __init__(self, cfg: PlatformConfig):
        self.cfg = absolute_paths(cfg)
        self.spec = FeatureStoreSpec.from_config(self.cfg.features)
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
        log.info("phase plan")  # phase lines: where a kill landed, for bench.crash
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
        stats = (s_lo, s_hi) if s_lo <= s_hi else None
        sequences = (q_lo, q_hi) if q_lo <= q_hi else None
        if stats or sequences:
            log.info("phase compute")
            report.events_read = self._compute(events, stats, sequences, report)
        if stats:
            report.stats_range = (ms_to_datetime(s_lo * spec.hop_ms), ms_to_datetime(s_hi * spec.hop_ms))
        if sequences:
            report.sequence_range = (ms_to_datetime(q_lo * spec.sequence_hop_ms),
                                     ms_to_datetime(q_hi * spec.sequence_hop_ms))
        run_no = (state.run + 1) if state else 1
        log.info("phase record_state")
        self._record(JobState(run_no, report.events_version, max(s_hi, state.stats_k_hi if state else s_hi),
                              max(q_hi, state.sequence_k_hi if state else q_hi)))
        report.seconds["compute"] = round(time.perf_counter() - started, 3)
        log.info("phase recorded")
        if materialize and not report.noop:
            log.info("phase materialize")
            t = time.perf_counter()
            self.materialize(report, store)
            report.seconds["materialize"] = round(time.perf_counter() - t, 3)
        return report

    # -- computation ----------------------------------------------------------------------------
    def _compute(self, events: DeltaTable, stats: tuple[int, int] | None, sequences: tuple[int, int] | None,
                 report: FeatureJobReport) -> int:
        """Write the stats rows at boundaries `stats` and the snapshots at `sequences` (either may be None)
        from one read of the events; returns the number of events read."""
        spec = self.spec
        ranges = []
        if stats:
            # From the events that leave the longest window at the first boundary: that boundary gets its row.
            ranges.append(((stats[0] - max(spec.window_hops) - 1) * spec.hop_ms, stats[1] * spec.hop_ms))
        if sequences:
            ranges.append(((sequences[0] - 1) * spec.sequence_hop_ms, sequences[1] * spec.sequence_hop_ms))
        lo_ms, hi_ms = min(r[0] for r in ranges), max(r[1] for r in ranges)
        parts = shuffle.partition_count(self.cfg.features.partitions, self._events_between(events, lo_ms, hi_ms))
        split = shuffle.EventSplit(events.to_pyarrow_dataset(), lo_ms, hi_ms, STATS_ENTITIES if stats else ("user",),
                                   parts)
        writes: dict[str, tuple[list[shuffle.Task], int]] = {}
        if stats:
            for entity in STATS_ENTITIES:
                writes[entity] = ([shuffle.stats_task(split, entity, p, spec, *stats) for p in range(parts)],
                                  stats[0] * spec.hop_ms)
        if sequences:
            prior = self._prior_tokens(sequences[0], (sequences[0] - 1) * spec.sequence_hop_ms,
                                       sequences[1] * spec.sequence_hop_ms)
            writes["sequence"] = (shuffle.sequence_tasks(split, prior, spec, *sequences),
                                  sequences[0] * spec.sequence_hop_ms)
        started = time.perf_counter()
        with ThreadPoolExecutor(len(writes)) as pool:
            written = {kind: pool.submit(self._replace, kind, tasks, from_ms)
                       for kind, (tasks, from_ms) in writes.items()}
            for kind, future in written.items():
                view = SEQUENCE_VIEW if kind == "sequence" else stats_view(kind)
                report.rows[view], done = future.result()
                report.seconds[view] = round(done - started, 3)
        return split.events_read()

    def _events_between(self, events: DeltaTable, lo_ms: int, hi_ms: int) -> int:
        """How many events the files overlapping [lo_ms, hi_ms) hold, from the log (an upper bound)."""
        adds = pa.table(events.get_add_actions(flatten=True))
        if adds.num_rows == 0:
            return 0
        overlap = pc.and_(pc.greater_equal(pc.cast(adds["max.ts"], pa.int64()), lo_ms * 1000),
                          pc.less(pc.cast(adds["min.ts"], pa.int64()), hi_ms * 1000))
        return pc.sum(adds["num_records"].filter(overlap)).as_py() or 0

    def _replace(self, kind: str, tasks: list[shuffle.Task], from_ms: int) -> tuple[int, float]:
        """Replace the table's rows from `from_ms` on by the tasks' outputs (one commit); rows and finish time."""
        written = 0

        def batches() -> Iterable[pa.RecordBatch]:
            nonlocal written
            for output in shuffle.finished(tasks):
                # Stats tables are built here from the tasks' sums: the sums cross the object store in under
                # half the bytes, and that copy, not the building, was the larger cost.
                table = output if kind == "sequence" else output.table(self.spec, kind)
                written += table.num_rows
                yield from table.to_batches()

        replace_from(self.table(kind), batches(), table_schema(self.spec, kind), from_ms, self.opts,
                     {"features_from_ms": str(from_ms)}, writer_properties(self.spec, kind))
        log.info("phase committed_%s", kind)
        return written, time.perf_counter()

    def _prior_tokens(self, k_lo: int, lo_ms: int, hi_ms: int) -> pa.Table:
        """Tokens of each active user's last snapshot before boundary k_lo, one row per token."""
        if not self._snapshots_before(k_lo * self.spec.sequence_hop_ms):
            return TOKEN_SCHEMA.empty_table()
        names = ", ".join(f"'{a}'" for a in engagement_filter(self.spec).to_pylist())
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
                  ms_to_datetime(k_lo * self.spec.sequence_hop_ms)]).fetch_arrow_table().cast(TOKEN_SCHEMA)
        finally:
            con.close()

    def _snapshots_before(self, ms: int) -> bool:
        """Whether the sequence table may hold a snapshot dated before `ms`, from its log's file statistics
        (the query for the last snapshots scans both tables: a first run skips it)."""
        adds = pa.table(DeltaTable(self.table("sequence"), storage_options=self.opts).get_add_actions(flatten=True))
        if adds.num_rows == 0:
            return False
        if "min.event_timestamp" not in adds.column_names:
            return True
        oldest = pc.cast(adds["min.event_timestamp"], pa.int64())
        return oldest.null_count > 0 or pc.min(oldest).as_py() < ms * 1000

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

