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
    ints = pa.list_(pa.int64())
    floats = pa.list_(pa.float64())
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
