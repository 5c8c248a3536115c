"""Feature lookup for serving: the trending fallback list and `ranking_rows`, the one
conversion of online features into ranking sample rows.

`ranking_rows` builds exactly the columns of the `samples_ranking` table (features/samples.py) from an
`OnlineFeatures`; the ranker feeds them to `training.ranking_batch.encode`, the function training uses, so a
model sees the same tensors offline and online (train/serve consistency by construction). The online
sequence carries no event values, so `hist_values` is absent (encode then keeps `rate` as one action token).

Trending = the items with the most engagements (every action but impressions) over one window, read from
the newest row per item of the offline `features_item_stats` table; refreshed every serving.trending_refresh_s.

>>> import numpy as np
>>> from features.online import OnlineFeatures
>>> f = default_features(("n",), user_id=3, item_ids=[5, 6])
>>> rows = ranking_rows(f, request_ts_ms=1_767_571_200_000)
>>> rows["cand_item_ids"].to_pylist(), rows["hist_item_ids"].to_pylist(), rows["user_stats"].to_pylist()
([[5, 6]], [[]], [[0.0]])
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
from ray import serve

from features.online import OnlineFeatures
from features.spec import SEQUENCE_FIELDS, FeatureStoreSpec
from ingestion.contract import ACTIONS, TS_TYPE
from serving.common import platform_config

log = logging.getLogger("ray.serve")


def default_features(stat_names: tuple[str, ...], user_id: int, item_ids) -> OnlineFeatures:
    """What the store returns for entities it does not know: empty history, zero stats, all flagged missing."""
    items = np.asarray(item_ids, np.int64).reshape(-1)
    zeros = np.zeros(len(stat_names))
    return OnlineFeatures(
        user_id=int(user_id), stat_names=tuple(stat_names), user_stats=zeros, user_stats_asof_ms=0,
        user_missing=True, sequence={f: np.zeros(0, np.int64) for f in SEQUENCE_FIELDS}, sequence_asof_ms=0,
        sequence_missing=True, item_ids=items, item_stats=np.tile(zeros, (len(items), 1)),
        item_missing=np.ones(len(items), bool), item_author_ids=np.zeros(len(items), np.int64),
        author_stats=np.tile(zeros, (len(items), 1)), author_missing=np.ones(len(items), bool))


def ranking_rows(f: OnlineFeatures, request_ts_ms: int) -> pa.Table:
    """One `samples_ranking`-shaped row (without labels) for one request."""
    seq = f.sequence
    ints, floats = _INTS, _FLOATS
    return pa.table({
        "user_id": pa.array([f.user_id], pa.int64()),
        "request_ts": pa.array([request_ts_ms * 1000], pa.int64()).cast(TS_TYPE),
        "hist_item_ids": pa.array([seq["item_ids"]], ints),
        "hist_author_ids": pa.array([seq["author_ids"]], ints),
        "hist_actions": pa.array([seq["actions"]], ints),
        "hist_ts": pa.array([seq["ts"]], ints),
        "cand_item_ids": pa.array([f.item_ids], ints),
        "cand_author_ids": pa.array([f.item_author_ids], ints),
        "user_stats": pa.array([f.user_stats], floats),
        "cand_item_stats": pa.array([list(f.item_stats)], pa.list_(floats)),
        "cand_author_stats": pa.array([list(f.author_stats)], pa.list_(floats)),
    })


# User ids are > 0 (the event contract): reading this one reads candidates alongside no one's history.
NO_USER = 0
_INTS, _FLOATS = pa.list_(pa.int64()), pa.list_(pa.float64())


@dataclass
class UserFeatures:
    """The user's part of a ranking row, read once per request: stats and history (SEQUENCE_FIELDS, oldest first).
    `unknown`: the store has neither stats nor a history for the user."""

    user_id: int
    stats: np.ndarray
    sequence: dict[str, np.ndarray]
    unknown: bool

    @classmethod
    def of(cls, f: OnlineFeatures) -> UserFeatures:
        return cls(f.user_id, f.user_stats, f.sequence, bool(f.sequence_missing and f.user_missing))

    @classmethod
    def read(cls, client, user_id: int) -> UserFeatures:
        return cls.of(client.get(int(user_id), []))

    @classmethod
    def default(cls, stat_names: tuple[str, ...], user_id: int) -> UserFeatures:
        return cls.of(default_features(stat_names, user_id, []))


@dataclass
class Candidates:
    """The candidates' part of ranking rows: [C] ids and author ids, [C, F] item and author stats."""

    item_ids: np.ndarray
    author_ids: np.ndarray
    item_stats: np.ndarray
    author_stats: np.ndarray

    @classmethod
    def of(cls, f: OnlineFeatures) -> Candidates:
        return cls(f.item_ids, f.item_author_ids, f.item_stats, f.author_stats)


def default_candidates(stat_names: tuple[str, ...], item_ids) -> Candidates:
    return Candidates.of(default_features(stat_names, NO_USER, item_ids))


class CandidateCache:
    """Candidates' features by item id, kept `ttl_s` (popular candidates recur request after request; the
    real-time path itself takes up to a second) and decoded once per read: a request's rows are numpy takes
    from sorted arrays, no Python per candidate. ttl_s 0 reads every candidate on every call. Reads go through
    the online client (its bulk path) for the stale ids of a call only; a table past `max_items` starts over.
    Safe from several threads: a refresh builds new arrays and swaps them in at once."""

    def __init__(self, client, ttl_s: float, max_items: int = 200_000):
        self.client, self.ttl_s, self.max_items = client, float(ttl_s), max_items
        width = len(client.stat_names)
        self._table = (np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64), np.zeros((0, width)),
                       np.zeros((0, width)))  # ids (sorted), read at, author ids, item stats, author stats

    def get(self, item_ids) -> Candidates:
        ids = np.asarray(item_ids, np.int64).reshape(-1)
        if self.ttl_s <= 0:
            return Candidates.of(self.client.get(NO_USER, ids))
        now = time.monotonic()
        table = self._table
        pos, hit = self._find(table, ids, now)
        if not hit.all():
            table = self._refresh(table, np.unique(ids[~hit]), now)
            pos, hit = self._find(table, ids, now)
        _, _, authors, item_stats, author_stats = table
        return Candidates(ids, authors[pos], item_stats[pos], author_stats[pos])

    def _find(self, table, ids: np.ndarray, now: float) -> tuple[np.ndarray, np.ndarray]:
        known, read_at = table[0], table[1]
        pos = np.minimum(np.searchsorted(known, ids), max(len(known) - 1, 0))
        if not len(known):
            return pos, np.zeros(len(ids), bool)
        return pos, (known[pos] == ids) & (now - read_at[pos] <= self.ttl_s)

    def _refresh(self, table, stale: np.ndarray, now: float):
        fresh = self.client.get(NO_USER, stale)
        keep = ~np.isin(table[0], stale)
        if keep.sum() + len(stale) > self.max_items:
            keep[:] = False
        parts = [(t[keep], new) for t, new in zip(table, (stale, np.full(len(stale), now), fresh.item_author_ids,
                                                          fresh.item_stats, fresh.author_stats))]
        merged = [np.concatenate(p) for p in parts]
        order = np.argsort(merged[0], kind="stable")
        self._table = table = tuple(m[order] for m in merged)
        return table


def _lists(values: list[np.ndarray], dtype, type_: pa.DataType) -> pa.Array:
    offsets = np.zeros(len(values) + 1, np.int32)
    np.cumsum([len(v) for v in values], out=offsets[1:])
    flat = np.concatenate(values).astype(dtype, copy=False) if values else np.zeros(0, dtype)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type_))


def _vector_lists(blocks: list[np.ndarray], width: int) -> pa.Array:
    """[n_i, width] float blocks -> list<list<double>>, one outer list per block."""
    flat = np.concatenate([b.reshape(-1, width) for b in blocks]) if blocks else np.zeros((0, width))
    inner = pa.ListArray.from_arrays(pa.array(np.arange(0, flat.size + 1, width, dtype=np.int32)),
                                     pa.array(flat.reshape(-1), pa.float64()))
    offsets = np.zeros(len(blocks) + 1, np.int32)
    np.cumsum([len(b) for b in blocks], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def batch_rows(users: list[UserFeatures], cands: list[Candidates], request_ts_ms: list[int]) -> pa.Table:
    """The `samples_ranking`-shaped rows of several requests at once: the table `ranking_rows` builds per request,
    concatenated (tests hold them equal), from whole arrays rather than per-candidate Python lists."""
    width = len(users[0].stats) if users else 0
    return pa.table({
        "user_id": pa.array([u.user_id for u in users], pa.int64()),
        "request_ts": pa.array([t * 1000 for t in request_ts_ms], pa.int64()).cast(TS_TYPE),
        **{f"hist_{f}": _lists([u.sequence[f] for u in users], np.int64, pa.int64())
           for f in ("item_ids", "author_ids", "actions", "ts")},
        "cand_item_ids": _lists([c.item_ids for c in cands], np.int64, pa.int64()),
        "cand_author_ids": _lists([c.author_ids for c in cands], np.int64, pa.int64()),
        "user_stats": _vector_lists([u.stats.reshape(1, -1) for u in users], width).flatten(),
        "cand_item_stats": _vector_lists([c.item_stats for c in cands], width),
        "cand_author_stats": _vector_lists([c.author_stats for c in cands], width),
    })


def trending_items(cfg, size: int, window_s: int | None = None) -> list[tuple[int, float]]:
    """(item_id, engagements in the window) of the `size` most engaged items, newest stats row per item."""
    from features.offline import FEATURE_TABLES, duckdb_connection

    spec = FeatureStoreSpec.from_config(cfg.features)
    window_s = window_s or max(cfg.features.windows_s)
    if window_s not in cfg.features.windows_s:
        raise ValueError(f"serving.trending_window_s={window_s} is not one of features.windows_s")
    label = spec.window_labels[cfg.features.windows_s.index(window_s)]
    engaged = " + ".join(f'coalesce("{a}_count_{label}", 0)' for a in ACTIONS if a != "impression")
    con = duckdb_connection()
    try:
        rows = con.execute(f"""
            SELECT item_id, arg_max({engaged}, event_timestamp) AS score,
                   arg_max(coalesce("impression_count_{label}", 0), event_timestamp) AS shown
            FROM delta_scan('{cfg.lake.table(FEATURE_TABLES["item"])}') GROUP BY item_id
            ORDER BY score DESC, shown DESC, item_id LIMIT ?""", [size]).fetchall()
    finally:
        con.close()
    return [(int(item), float(score)) for item, score, _ in rows]


@serve.deployment
class FeatureLookup:
    """The trending list (the fallback candidates), read from the lake's item stats and refreshed every
    serving.trending_refresh_s. user_config: {"overrides": [...]} (config overrides) re-reads it in place.
    The per-request reads (user history, candidate stats) happen in the Ingress and the Ranker, in process."""

    def __init__(self, args: dict[str, Any] | None = None):
        self.args = args or {}
        self.error: str | None = None
        self.trending_list: list[tuple[int, float]] = []
        self.trending_at = 0.0
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        self.cfg = platform_config(self.args, (user_config or {}).get("overrides"))
        self.trending_at = 0.0
        self._refresh_trending()

    def _refresh_trending(self) -> None:
        serving = self.cfg.serving
        if time.monotonic() - self.trending_at < serving.trending_refresh_s:
            return
        self.trending_at = time.monotonic()
        try:
            self.trending_list = trending_items(self.cfg, serving.trending_size, serving.trending_window_s)
            self.error = None
        except Exception as err:  # the lake may be unreachable: keep the last list rather than none
            self.error = f"trending refresh failed, keeping {len(self.trending_list)} items ({type(err).__name__})"
            log.warning("%s: %s", self.error, err)

    async def trending(self) -> list[tuple[int, float]]:
        # The query scans the item stats table: off the event loop.
        await asyncio.to_thread(self._refresh_trending)
        return self.trending_list

    async def check(self) -> str | None:
        """None when healthy, else what is wrong (for /healthz)."""
        return f"trending: {self.error}" if self.error else None
