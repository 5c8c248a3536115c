"""The real-time path: validated events -> the online store, within a second (ingest --follow, serving /events).

`RealtimeFeatureUpdater.update(events)` appends engagements to the users' sequence tokens, adds every
event to per-hop buckets of its user, item and author, expires the buckets that left each window as
event time moves on (also for entities that got no new event: a heap holds each entity's next change),
and pushes the changed entities' rows through Feast's push sources.

Windows are the batch job's (features.spec), anchored at the hop boundary after the newest event: the
row written at event time `now` sums buckets (k_now - window, k_now] with k_now = now // hop + 1. Once
`now` reaches that boundary this equals the batch row there, which the tests check.

The updater is the single writer of the entities it serves and keeps their buckets in memory: run one
per process that takes events (or partition entities between them). `start_from_lake` rebuilds its
state from the lake's most recent events, so a restart loses nothing that was ingested.

Its clock is event time, so one event from a skewed producer would otherwise move it (and the store's
write times) into the future: windows would expire early and every correct write after it would lose
to the future-dated row. Events later than wall-clock + `ingest.max_future_s` (the contract's bound, a
few minutes) are therefore skipped (ingestion quarantines them too), and so are event_ids already
applied within the longest window, or older than it (too late to tell from a duplicate: the batch job
counts them). `UpdateReport.skipped` says how many of each. The batch job's writes never replace a
fresher real-time row (`features.feast_layout.guard_online_store`).

    updater = start_from_lake(cfg)          # after the feature job has run
    updater.update([{"event_id": "x", "ts": 1767571200000, "user_id": 1, "item_id": 2, "action": "click"}])
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from config.schema import PlatformConfig
from features.feast_layout import guard_online_store
from features.offline import duckdb_connection, open_table
from features.online import OnlineFeatureClient
from features.partitions import stats_table
from features.repo import absolute_paths
from features.spec import (
    ENTITY_KEYS,
    N_METRICS,
    SEQUENCE_FIELDS,
    SEQUENCE_VIEW,
    STATS_ENTITIES,
    FeatureStoreSpec,
    event_metrics,
    stats_view,
)
from ingestion.contract import ACTION_INDEX, TS_TYPE

log = logging.getLogger(__name__)


@dataclass
class UpdateReport:
    """One `update` call: events applied, entities written per view, time taken."""

    events: int
    written: dict[str, int] = field(default_factory=dict)  # view -> entities written
    skipped: dict[str, int] = field(default_factory=dict)  # "future" / "duplicate" / "late" -> events
    seconds: float = 0.0


class _Buckets:
    """One entity's per-hop sums: sorted boundary indices and their [n, N_METRICS] sums."""

    __slots__ = ("ks", "sums")

    def __init__(self, ks: np.ndarray, sums: np.ndarray):
        self.ks, self.sums = ks, sums

    def add(self, k: int, metrics: np.ndarray) -> None:
        i = int(np.searchsorted(self.ks, k))
        if i < len(self.ks) and self.ks[i] == k:
            self.sums[i] += metrics
        else:
            self.ks = np.insert(self.ks, i, k)
            self.sums = np.insert(self.sums, i, metrics, axis=0)

    def windows(self, k_now: int, shifts: tuple[int, ...]) -> tuple[np.ndarray, int | None]:
        """Sums over each window ending at k_now, and the next boundary where one of them changes."""
        keep = self.ks > k_now - max(shifts)
        self.ks, self.sums = self.ks[keep], self.sums[keep]
        out = np.stack([self.sums[self.ks > k_now - s].sum(axis=0) for s in shifts])
        changes = np.concatenate([self.ks + s for s in shifts])
        later = changes[changes > k_now]
        return out, (int(later.min()) if len(later) else None)


def event_columns(events: pa.Table | list[dict]) -> dict[str, np.ndarray]:
    """Contract events (dicts with ts in ms, or an `events`-table-like Arrow table) -> numpy columns."""
    table = pa.Table.from_pylist(events) if isinstance(events, list) else events
    ts = table["ts"]
    if pa.types.is_timestamp(ts.type):
        ts = pc.divide(pc.cast(ts.cast(TS_TYPE), pa.int64()), 1000)

    def ints(name: str) -> np.ndarray:
        if name not in table.column_names:
            return np.zeros(table.num_rows, np.int64)
        return table[name].cast(pa.int64()).fill_null(0).to_numpy()

    values = (table["value"].cast(pa.float64()).to_numpy(zero_copy_only=False) if "value" in table.column_names
              else np.full(table.num_rows, np.nan))
    ids = (table["event_id"].to_numpy(zero_copy_only=False) if "event_id" in table.column_names
           else np.full(table.num_rows, None))
    return {"event_id": ids, "user_id": ints("user_id"), "item_id": ints("item_id"), "author_id": ints("author_id"),
            "ts": ts.cast(pa.int64()).to_numpy(zero_copy_only=False),
            "action": np.array([ACTION_INDEX[a] for a in table["action"].to_pylist()], np.int64),
            "value": np.asarray(values, np.float64)}


class RealtimeFeatureUpdater:
    """Applies events to the online store: sequences, window counters, expiry. See the module docstring."""

    def __init__(self, cfg: PlatformConfig, store=None, client: OnlineFeatureClient | None = None):
        from features.repo import open_store

        self.cfg = absolute_paths(cfg)
        self.spec = FeatureStoreSpec.from_config(self.cfg.features)
        self.store = store or open_store(self.cfg)
        self.client = client or OnlineFeatureClient(self.cfg, store=self.store)
        self.buckets: dict[str, dict[int, _Buckets]] = {e: {} for e in STATS_ENTITIES}
        self.item_author: dict[int, int] = {}
        self.sequences: dict[int, tuple[list[tuple[int, int, int, int]], int]] = {}  # user -> (tokens, base asof)
        self.watermark_ms: int | None = None
        self._heap: list[tuple[int, str, int]] = []
        self._scheduled: dict[tuple[str, int], int] = {}
        self._last_write_us = 0
        self.max_future_ms = self.cfg.ingest.max_future_s * 1000
        self._seen: dict[str, int] = {}  # event_id -> ts of the events applied within the longest window
        self._seen_after_prune = 0
        guard_online_store(self.cfg)

    def update(self, events: pa.Table | list[dict], write: bool = True) -> UpdateReport:
        """Apply validated events; with `write`, push every entity whose features changed."""
        started = time.perf_counter()
        report = UpdateReport(events=0)
        cols = self._admit(event_columns(events), report)
        n = report.events = len(cols["ts"])
        if n:
            self.watermark_ms = max(self.watermark_ms or 0, int(cols["ts"].max()))
        dirty = {e: set() for e in STATS_ENTITIES}
        self._add_to_buckets(cols, dirty)
        changed_users = self._add_to_sequences(cols)
        if self.watermark_ms is None:
            return report
        k_now = self.watermark_ms // self.spec.hop_ms + 1
        while self._heap and self._heap[0][0] <= k_now:
            k, entity, key = heapq.heappop(self._heap)
            if self._scheduled.get((entity, key)) == k:
                dirty[entity].add(key)
        asof_ms = self.watermark_ms + 1
        write_us = max(asof_ms * 1000, self._last_write_us + 1)  # Redis keeps a value only if its time is newer
        self._last_write_us = write_us
        for entity in STATS_ENTITIES:
            rows = self._stats_rows(entity, sorted(dirty[entity]), k_now, asof_ms, write_us)
            if write and rows is not None:
                self._write(stats_view(entity), rows)
                report.written[stats_view(entity)] = len(rows)
        if write and changed_users:
            self._write(SEQUENCE_VIEW, self._sequence_rows(sorted(changed_users), asof_ms, write_us))
            report.written[SEQUENCE_VIEW] = len(changed_users)
        report.seconds = time.perf_counter() - started
        return report

    def _write(self, view: str, rows) -> None:
        """Write `view`'s rows online: what `store.push(push_source(view), rows)` does (each push source feeds its one
        view, features/definitions.py), without the registry re-read Feast 0.67's push makes per call (its
        `_precompute_for_push` lists feature services with the cache off: ~40 ms per view on this machine)."""
        self.store.write_to_online_store(view, rows, allow_registry_cache=True)

    def _admit(self, cols: dict[str, np.ndarray], report: UpdateReport) -> dict[str, np.ndarray]:
        """The events to apply: none later than wall-clock + the allowed skew, no event_id twice."""
        ts = cols["ts"]
        keep = ts <= int(time.time() * 1000) + self.max_future_ms
        if not keep.all():
            report.skipped["future"] = int((~keep).sum())
            log.warning("skipped %d events dated more than %d s ahead of this clock (newest ts %d)",
                        report.skipped["future"], self.max_future_ms // 1000, int(ts.max()))
        newest = max(self.watermark_ms or 0, int(ts[keep].max()) if keep.any() else 0)
        horizon = newest - max(self.spec.windows_ms)
        for i in np.flatnonzero(keep & np.not_equal(cols["event_id"], None)).tolist():
            event_id, t = cols["event_id"][i], int(ts[i])
            reason = "late" if t < horizon else "duplicate" if event_id in self._seen else None
            if reason:
                keep[i] = False
                report.skipped[reason] = report.skipped.get(reason, 0) + 1
            else:
                self._seen[event_id] = t
        if len(self._seen) > 2 * self._seen_after_prune + 1024:  # amortised: prune once the map has doubled
            self._seen = {e: t for e, t in self._seen.items() if t >= horizon}
            self._seen_after_prune = len(self._seen)
        return cols if keep.all() else {name: column[keep] for name, column in cols.items()}

    def _add_to_buckets(self, cols: dict[str, np.ndarray], dirty: dict[str, set]) -> None:
        metrics = event_metrics(cols["action"], cols["value"])
        k = cols["ts"] // self.spec.hop_ms + 1
        has_author = cols["author_id"] > 0
        self.item_author.update(zip(cols["item_id"][has_author].tolist(), cols["author_id"][has_author].tolist()))
        for entity in STATS_ENTITIES:
            keys = cols[ENTITY_KEYS[entity]]
            present = keys > 0
            keys_e, k_e, m_e = keys[present], k[present], metrics[present]
            if len(keys_e) == 0:
                continue
            order = np.lexsort((k_e, keys_e))
            keys_e, k_e, m_e = keys_e[order], k_e[order], m_e[order]
            first = np.flatnonzero(np.r_[True, (keys_e[1:] != keys_e[:-1]) | (k_e[1:] != k_e[:-1])])
            sums = np.add.reduceat(m_e, first, axis=0)
            g_keys, g_k = keys_e[first], k_e[first]
            starts = np.flatnonzero(np.r_[True, g_keys[1:] != g_keys[:-1]])
            ends = np.r_[starts[1:], len(g_keys)]
            table = self.buckets[entity]
            for s, e in zip(starts.tolist(), ends.tolist()):
                key = int(g_keys[s])
                dirty[entity].add(key)
                buckets = table.get(key)
                if buckets is None:
                    table[key] = _Buckets(g_k[s:e].copy(), sums[s:e].copy())
                    continue
                for j in range(s, e):
                    buckets.add(int(g_k[j]), sums[j])

    def _stats_rows(self, entity: str, keys: list[int], k_now: int, asof_ms: int, write_us: int) -> pd.DataFrame | None:
        if not keys:
            return None
        shifts = self.spec.window_hops
        sums = np.zeros((len(keys), len(shifts), N_METRICS), np.int64)
        table = self.buckets[entity]
        for i, key in enumerate(keys):
            sums[i], next_change = table[key].windows(k_now, shifts)
            if next_change is None:
                del table[key]  # every window is empty: the row written now says so
                self._scheduled.pop((entity, key), None)
            elif self._scheduled.get((entity, key)) != next_change:
                self._scheduled[(entity, key)] = next_change
                heapq.heappush(self._heap, (next_change, entity, key))
        authors = np.array([self.item_author.get(k, 0) for k in keys]) if entity == "item" else None
        rows = stats_table(self.spec, entity, np.array(keys), np.full(len(keys), asof_ms), sums, authors)
        return _for_push(rows, write_us)

    def _add_to_sequences(self, cols: dict[str, np.ndarray]) -> set[int]:
        engaged = np.isin(cols["action"], self.spec.sequence_actions)
        if not engaged.any():
            return set()
        users = cols["user_id"][engaged]
        unknown = sorted(set(users.tolist()) - self.sequences.keys())
        stored = self.client.sequences(unknown) if unknown else {}
        for user in unknown:
            seq, asof = stored.get(user, ({f: np.zeros(0, np.int64) for f in SEQUENCE_FIELDS}, 0))
            tokens = list(zip(seq["ts"].tolist(), seq["item_ids"].tolist(), seq["actions"].tolist(),
                              seq["author_ids"].tolist()))
            self.sequences[user] = (tokens, asof)
        changed = set()
        n_max = self.spec.sequence_length
        rows = zip(users.tolist(), cols["ts"][engaged].tolist(), cols["item_id"][engaged].tolist(),
                   cols["action"][engaged].tolist(), cols["author_id"][engaged].tolist())
        for user, ts, item, action, author in rows:
            tokens, base_asof = self.sequences[user]
            if ts < base_asof:
                continue  # already in the stored snapshot this user's state started from
            bisect.insort(tokens, (ts, item, action, author))  # same order as the batch job: ts, item, action
            del tokens[:-n_max]
            changed.add(user)
        return changed

    def _sequence_rows(self, users: list[int], asof_ms: int, write_us: int) -> pd.DataFrame:
        columns = {f: [] for f in SEQUENCE_FIELDS}
        for user in users:
            tokens = self.sequences[user][0]
            columns["ts"].append([t[0] for t in tokens])
            columns["item_ids"].append([t[1] for t in tokens])
            columns["actions"].append([t[2] for t in tokens])
            columns["author_ids"].append([t[3] for t in tokens])
        return pd.DataFrame({"user_id": users, "event_timestamp": pd.Timestamp(write_us * 1000, tz="UTC"),
                             "asof_ms": asof_ms, **columns})


def _for_push(rows: pa.Table, write_us: int) -> pd.DataFrame:
    """The online view's columns only (the named stats are offline-only)."""
    keep = [c for c in rows.column_names if c in (*ENTITY_KEYS.values(), "asof_ms", "item_author_id", "stats")]
    df = rows.select(keep).to_pandas()
    df["event_timestamp"] = pd.Timestamp(write_us * 1000, tz="UTC")
    return df


def recent_events(cfg: PlatformConfig, since_ms: int) -> pa.Table:
    """Events with ts >= since_ms from the lake (the columns the updater reads), in event-time order."""
    con = duckdb_connection()
    try:
        return con.execute(f"""
            SELECT user_id, item_id, author_id, ts, action, value FROM delta_scan('{cfg.lake.events}')
            WHERE ts >= make_timestamp(? * 1000) ORDER BY ts""", [since_ms]).fetch_arrow_table()
    finally:
        con.close()


PUSHED_COLUMNS = ("user_id", "item_id", "author_id", "ts", "action", "value")  # what `update` reads of an event


def events_of_batch(cfg: PlatformConfig, batch_no: int) -> pa.Table:
    """The rows one ingestion batch appended to `events`, by time (what `ingest --follow --push-features` pushes
    after each batch: the job's driver never holds the rows, its parse tasks write them)."""
    con = duckdb_connection()
    try:
        return con.execute(f"""
            SELECT {", ".join(PUSHED_COLUMNS)} FROM delta_scan('{cfg.lake.events}')
            WHERE ingest_batch = ? ORDER BY ts""", [batch_no]).fetch_arrow_table()
    finally:
        con.close()


def start_from_lake(cfg: PlatformConfig, store=None) -> RealtimeFeatureUpdater:
    """An updater whose windows and sequences continue from the lake: it replays the events after the
    feature job's last rows (and the longest window before them) and writes the result online."""
    from features.job import FeatureJob
    from features.repo import apply_definitions

    cfg = absolute_paths(cfg)
    job = FeatureJob(cfg)
    if store is None:
        job.ensure_tables()
        store = apply_definitions(cfg)
    updater = RealtimeFeatureUpdater(cfg, store)
    spec = updater.spec
    state = job.last_state()
    events = open_table(cfg.lake.events, cfg.lake.storage_options)
    if events is None:
        return updater
    if state is not None:
        since = min(state.stats_k_hi * spec.hop_ms - max(spec.windows_ms), state.sequence_k_hi * spec.sequence_hop_ms)
    else:
        newest = pc.max(pc.cast(pa.table(events.get_add_actions(flatten=True))["max.ts"], pa.int64())).as_py()
        since = (newest or 0) // 1000 - spec.ttl_ms
    updater.update(recent_events(cfg, since))
    return updater



def time_to_visible(updater: RealtimeFeatureUpdater, client: OnlineFeatureClient, event: dict,
                    timeout_s: float = 5.0) -> float:
    """Freshness of one event: seconds from handing it to the updater until an online read of its user
    reflects it (the user's stats are as of a time after the event)."""
    started = time.perf_counter()
    updater.update([event])
    while client.get(event["user_id"], []).user_stats_asof_ms <= event["ts"]:
        if time.perf_counter() - started > timeout_s:
            raise TimeoutError(f"event {event.get('event_id')} not visible online after {timeout_s}s")
    return time.perf_counter() - started
