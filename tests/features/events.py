"""Helpers for feature tests: small synthetic event tables written straight to the `events` Delta table,
and brute-force references (one event at a time, no cleverness) for what the features must hold."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
from deltalake import write_deltalake

from features.spec import ENTITY_KEYS, FeatureStoreSpec, event_metrics
from ingestion.contract import ACTION_INDEX, EVENTS_PARTITION_BY, EVENTS_SCHEMA

START_MS = 1_767_571_200_000  # 2026-01-05T00:00:00Z
OUTCOMES = ("click", "view", "like", "follow", "gift", "comment", "share")


def synthetic_events(requests: int = 300, users: int = 12, items: int = 30, authors: int = 6, span_s: int = 4 * 3600,
                     seed: int = 0, prefix: str = "e", start_ms: int = START_MS) -> list[dict]:
    """Requests of 4 impressions each, with clicks, views, likes, follows and gifts after some of them,
    plus engagements without a request id; event times in [start_ms, start_ms + span_s)."""
    rng = np.random.default_rng(seed)
    out: list[dict] = []
    item_author = 1 + rng.integers(0, authors, items + 1)
    for r in range(requests):
        user = int(1 + rng.integers(users))
        t = int(start_ms + rng.integers(span_s * 1000))
        for item in rng.choice(np.arange(1, items + 1), 4, replace=False).tolist():
            base = {"user_id": user, "item_id": item, "author_id": int(item_author[item]),
                    "request_id": f"{prefix}r{r}"}
            out.append({**base, "ts": t, "action": "impression", "value": None})
            if rng.random() < 0.3:
                dt = int(rng.integers(500, 20_000))
                out.append({**base, "ts": t + dt, "action": "click", "value": None})
                out.append({**base, "ts": t + dt + 1000, "action": "view", "value": float(rng.integers(1, 1200)) / 10})
                for action in ("like", "follow", "gift", "comment", "share"):
                    if rng.random() < 0.3:
                        value = float(rng.choice([1.0, 5.0, 20.0])) if action == "gift" else None
                        out.append({**base, "ts": t + dt + int(rng.integers(1, 60_000)), "action": action,
                                    "value": value})
        if rng.random() < 0.2:  # an engagement outside any request (a share link, a notification)
            item = int(1 + rng.integers(items))
            out.append({"user_id": user, "item_id": item, "author_id": int(item_author[item]), "request_id": None,
                        "ts": int(start_ms + rng.integers(span_s * 1000)), "action": "like", "value": None})
    for i, e in enumerate(out):
        e["event_id"] = f"{prefix}{i}"
    return out


def events_table(events: list[dict], batch: int = 1) -> pa.Table:
    ts = np.array([e["ts"] for e in events], np.int64)
    days = np.datetime_as_string(ts.astype("datetime64[ms]"), unit="D")
    return pa.table({
        "event_id": [e["event_id"] for e in events],
        "ts": pa.array(ts * 1000, pa.int64()).cast(EVENTS_SCHEMA.field("ts").type),
        "user_id": [e["user_id"] for e in events], "item_id": [e["item_id"] for e in events],
        "author_id": [e.get("author_id") for e in events], "request_id": [e.get("request_id") for e in events],
        "action": [e["action"] for e in events], "value": [e.get("value") for e in events],
        "dt": days.tolist(), "ingest_batch": [batch] * len(events), "source_file": ["test"] * len(events),
        "source_offset": list(range(len(events))),
    }, schema=EVENTS_SCHEMA)


def write_events(path: str, events: list[dict], batch: int = 1) -> None:
    """Append events to the `events` Delta table as the ingestion job would (one commit)."""
    write_deltalake(path, events_table(events, batch), mode="append", partition_by=EVENTS_PARTITION_BY)


class Reference:
    """What the features must hold, computed the plain way: one mask over all events per question."""

    def __init__(self, spec: FeatureStoreSpec, events: list[dict]):
        self.spec, self.events = spec, events
        self.ts = np.array([e["ts"] for e in events], np.int64)
        self.keys = {field: np.array([e.get(field) or 0 for e in events], np.int64) for field in ENTITY_KEYS.values()}
        codes = np.array([ACTION_INDEX[e["action"]] for e in events], np.int64)
        values = np.array([np.nan if e.get("value") is None else e["value"] for e in events], np.float64)
        self.metrics = event_metrics(codes, values)
        self.codes = codes

    def stats(self, entity: str, key: int, t_ms: int, until_ms: int | None = None) -> np.ndarray:
        """Stats at boundary time t_ms: per window the events with t - w <= ts < t (or <= until_ms)."""
        mine = self.keys[ENTITY_KEYS[entity]] == key
        upper = self.ts < t_ms if until_ms is None else self.ts <= until_ms
        sums = np.stack([self.metrics[mine & upper & (self.ts >= t_ms - w)].sum(axis=0)
                         for w in self.spec.windows_ms])
        return self.spec.stats_vectors(sums[None])[0]

    def sequence(self, user: int, t_ms: int) -> list[tuple]:
        """The user's last N engagements strictly before t_ms as (item, author, action, ts), oldest first."""
        codes = set(self.spec.sequence_actions)
        mine = sorted((e["ts"], e["item_id"], ACTION_INDEX[e["action"]], e.get("author_id") or 0) for e in self.events
                      if e["user_id"] == user and ACTION_INDEX[e["action"]] in codes and e["ts"] < t_ms)
        return [(item, author, action, ts) for ts, item, action, author in mine[-self.spec.sequence_length:]]
