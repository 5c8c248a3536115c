"""The online feature client serving uses: one call, a user's sequence and stats plus up to 500 candidates' stats.

Two ways to read, same answer (a test holds them equal):
- the fast path reads the online store in bulk, as Feast lays it out (`features.feast_layout`): one query
  per request on SQLite, one Lua call for all views on Redis;
- `fast=False` goes through Feast's `get_online_features`.
Both read only the packed values (`stats`, `item_author_id`, the sequence arrays), not the 42 named stats.

Unknown entities get defaults (zero stats, empty sequence) flagged as missing; a store that cannot be
read raises `FeatureStoreUnavailable`, the one exception serving catches to fall back.

Two processes write the store: the batch job (Feast's materialize) and the real-time updater (Feast's push);
a write older than the stored row is a no-op on both backends (`feast_layout.guard_online_store` for SQLite,
`features.redis_store` for Redis), so a materialisation never rolls back the updater's fresher rows.

`item_ttl_s > 0` keeps item and author rows that long (never the user's: its history must be fresh), so a
ranker scoring the same popular candidates request after request reads them about once per TTL; their stats
may then lag the store by up to the TTL (the real-time path itself takes up to a second, BENCHMARKS.md).

    client = OnlineFeatureClient(config.load()); f = client.get(7, [1, 2, 3]); f.item_stats.shape  # (3, 42)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from config.schema import PlatformConfig
from features.feast_layout import (
    EntityKeys,
    FeatureStoreUnavailable,
    PackedDoubles,
    RedisReader,
    SqliteReader,
    decode_value,
)
from features.repo import absolute_paths
from features.spec import ENTITY_KEYS, SEQUENCE_FIELDS, SEQUENCE_VIEW, FeatureStoreSpec, stats_view

MAX_CANDIDATES = 500
SEQUENCE_FEATURES = ("asof_ms", *SEQUENCE_FIELDS)


@dataclass
class OnlineFeatures:
    """Everything one ranking request needs from the store; missing entities hold defaults, flagged."""

    user_id: int
    stat_names: tuple[str, ...]
    user_stats: np.ndarray  # [F] float64
    user_stats_asof_ms: int  # the user's stats hold the events before this time (0 when missing)
    user_missing: bool
    sequence: dict[str, np.ndarray]  # SEQUENCE_FIELDS -> [L] int64, oldest first (ts in epoch ms)
    sequence_asof_ms: int  # the sequence holds the engagements before this time (0 when missing)
    sequence_missing: bool
    item_ids: np.ndarray  # [C] int64
    item_stats: np.ndarray  # [C, F] float64
    item_missing: np.ndarray  # [C] bool
    item_author_ids: np.ndarray  # [C] int64, 0 when unknown
    author_stats: np.ndarray  # [C, F] the stats of each candidate's author
    author_missing: np.ndarray  # [C] bool


class OnlineFeatureClient:
    """Reads what serving needs for one request. Thread-safe; create one per process and reuse it."""

    def __init__(self, cfg: PlatformConfig, fast: bool = True, store=None, item_ttl_s: float = 0.0):
        self.cfg = absolute_paths(cfg)
        self.item_ttl_s = item_ttl_s
        self._cached: dict[str, dict[int, tuple[float, list | None]]] = {"item": {}, "author": {}}
        self.spec = FeatureStoreSpec.from_config(self.cfg.features)
        self.stat_names = self.spec.stat_names
        self.empty_stats = self.spec.empty_stats()
        self._packed = PackedDoubles(len(self.stat_names))
        self.fast = fast
        self._store = store
        self._keys = {entity: EntityKeys(key) for entity, key in ENTITY_KEYS.items()}
        online = self.cfg.features.online_store
        timeout_s = online.timeout_ms / 1000
        if not fast:
            self._reader = None
        elif online.type == "redis":
            self._reader = RedisReader(online.connection_string or "", self.cfg.features.project, timeout_s)
        else:
            self._reader = SqliteReader(online.path, self.cfg.features.project, timeout_s)

    @property
    def store(self):
        if self._store is None:
            from features.repo import open_store

            self._store = open_store(self.cfg)
        return self._store

    def _read(self, requests: list[tuple[str, str, list[str], list[int]]]) -> list[list[list | None]]:
        """(view, entity, features, ids) -> per request, per id, the values (None: entity missing); serialized
        on the fast path, Python values through Feast: `_decode` and `PackedDoubles` take either."""
        if self._reader is None:
            return self._read_feast(requests)
        raw = self._reader.read([(view, features, [self._keys[entity].key(int(i)) for i in ids])
                                 for view, entity, features, ids in requests])
        return [[None if all(v is None for v in row) else row for row in rows] for rows in raw]

    def _read_feast(self, requests: list[tuple[str, str, list[str], list[int]]]) -> list[list[list | None]]:
        """Feast's path with its calls combined where Feast allows it without waste (the fair baseline): the
        requests for the same entities share one `get_online_features` call (the user's stats and sequence: one
        call; the candidates: one; their authors: one). Putting the user's id on every candidate row would make
        it one call fewer, but Feast then returns the user's sequence once per candidate: 2x slower here."""
        calls: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for n, (_, entity, _, ids) in enumerate(requests):
            if ids:
                calls.setdefault((entity, tuple(ids)), []).append(n)
        out: list[list[list | None]] = [[] for _ in requests]
        for (entity, ids), members in calls.items():
            names = [f"{requests[n][0]}:{f}" for n in members for f in requests[n][2]]
            try:
                got = self.store.get_online_features(features=names, entity_rows=[{ENTITY_KEYS[entity]: int(i)}
                                                                                  for i in ids],
                                                     full_feature_names=True).to_dict()
            except Exception as err:  # any failure of the store is the same signal to serving
                raise FeatureStoreUnavailable(f"Feast online read failed: {err}") from err
            for n in members:
                view, _, features, _ = requests[n]
                out[n] = [None if all(v is None for v in row) else list(row)
                          for row in zip(*(got[f"{view}__{f}"] for f in features))]
        return out

    def _stats(self, rows: list[list | None]) -> tuple[np.ndarray, np.ndarray]:
        return self._packed.matrix([row[0] if row else None for row in rows], self.empty_stats)

    def get(self, user_id: int, item_ids: list[int] | np.ndarray) -> OnlineFeatures:
        """The user's stats and sequence and the candidates' (and their authors') stats, as of now."""
        items = np.asarray(item_ids, np.int64).reshape(-1)
        if len(items) > MAX_CANDIDATES:
            raise ValueError(f"at most {MAX_CANDIDATES} candidates per call, got {len(items)}")
        now = time.monotonic()
        item_ids = items.tolist()
        item_read = self._stale("item", item_ids, now)
        user_rows, seq_rows, fetched = self._read([
            (stats_view("user"), "user", ["stats", "asof_ms"], [user_id]),
            (SEQUENCE_VIEW, "user", list(SEQUENCE_FEATURES), [user_id]),
            (stats_view("item"), "item", ["stats", "item_author_id"], item_read),
        ])
        item_rows = self._merge("item", item_ids, item_read, fetched, now)
        item_stats, item_missing = self._stats(item_rows)
        authors = np.array([(decode_value(row[1]) or 0) if row else 0 for row in item_rows], np.int64)
        unique_authors = sorted(set(authors[authors > 0].tolist()))
        author_read = self._stale("author", unique_authors, now)
        (fetched,) = self._read([(stats_view("author"), "author", ["stats"], author_read)])
        by_author = dict(zip(unique_authors, self._merge("author", unique_authors, author_read, fetched, now)))
        author_stats, author_missing = self._stats([by_author.get(a) for a in authors.tolist()])
        user_stats, user_missing = self._stats(user_rows)
        user_asof = int(decode_value(user_rows[0][1]) or 0) if user_rows[0] else 0
        sequence, asof, seq_missing = self._sequence(seq_rows[0])
        return OnlineFeatures(
            user_id=int(user_id), stat_names=self.stat_names, user_stats=user_stats[0], user_stats_asof_ms=user_asof,
            user_missing=bool(user_missing[0]), sequence=sequence, sequence_asof_ms=asof, sequence_missing=seq_missing,
            item_ids=items, item_stats=item_stats, item_missing=item_missing, item_author_ids=authors,
            author_stats=author_stats, author_missing=author_missing,
        )

    def _stale(self, entity: str, ids: list[int], now: float) -> list[int]:
        """The ids to read from the store: all of them, or those not cached within the TTL."""
        if self.item_ttl_s <= 0:
            return ids
        cached = self._cached[entity]
        return [i for i in ids if (hit := cached.get(i)) is None or now - hit[0] > self.item_ttl_s]

    def _merge(self, entity: str, ids: list[int], read: list[int], rows: list, now: float) -> list:
        """Rows for `ids` in order: the ones just read (cached when a TTL is set), the rest from the cache."""
        if self.item_ttl_s <= 0:
            return rows
        cached = self._cached[entity]
        if len(cached) > 200_000:  # a bound for huge catalogues: start over rather than grow without limit
            cached.clear()
        for i, row in zip(read, rows):
            cached[i] = (now, row)
        return [cached[i][1] for i in ids]

    @staticmethod
    def _sequence(row: list | None) -> tuple[dict[str, np.ndarray], int, bool]:
        if row is None or row[1] is None:
            return {f: np.zeros(0, np.int64) for f in SEQUENCE_FIELDS}, 0, True
        values = [decode_value(v) for v in row]
        return {f: np.asarray(v, np.int64) for f, v in zip(SEQUENCE_FIELDS, values[1:])}, int(values[0] or 0), False

    def sequences(self, user_ids: list[int]) -> dict[int, tuple[dict[str, np.ndarray], int]]:
        """The stored sequence and its asof_ms of each user that has one (for the real-time updater)."""
        (rows,) = self._read([(SEQUENCE_VIEW, "user", list(SEQUENCE_FEATURES), list(user_ids))])
        out = {}
        for user, row in zip(user_ids, rows):
            sequence, asof, missing = self._sequence(row)
            if not missing:
                out[int(user)] = (sequence, asof)
        return out


def describe(features: OnlineFeatures, last: int = 5) -> str:
    """A few readable lines about one user's online features (for the demo and the stage's --show-user)."""
    from ingestion.contract import ACTIONS

    names = features.stat_names
    seq = features.sequence
    lines = [f"user {features.user_id}: {len(seq['item_ids'])} sequence tokens"
             + (" (missing)" if features.sequence_missing else f", as of {features.sequence_asof_ms}")]
    for item, action, ts in list(zip(seq["item_ids"], seq["actions"], seq["ts"]))[-last:]:
        lines.append(f"  ts={int(ts)} {ACTIONS[int(action) - 1]:<10} item {int(item)}")
    shown = [f"{n}={v:g}" for n, v in zip(names, features.user_stats) if v and not n.startswith(("ctr", "ltr"))]
    ctr = next(v for n, v in zip(names, features.user_stats) if n.startswith("ctr_"))
    lines.append(f"  user stats: {', '.join(shown[:8]) or 'none in any window'}; smoothed ctr {ctr:.3f}")
    for i, item in enumerate(features.item_ids[:last].tolist()):
        row = dict(zip(names, features.item_stats[i]))
        counts = ", ".join(f"{n}={row[n]:g}" for n in names if n.startswith(("impression_count", "click_count")))
        lines.append(f"  item {item} (author {features.item_author_ids[i]}"
                     f"{', missing' if features.item_missing[i] else ''}): {counts}")
    return "\n".join(lines)
