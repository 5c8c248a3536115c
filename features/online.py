"""The online feature client serving uses: one call, a user's sequence and stats plus up to 500 candidates' stats.

Two ways to read, same answer (a test holds them equal):
- the fast path reads the online store in bulk, as Feast lays it out (`features.online_readers`): on SQLite
  two queries per request (the candidates' authors are known after the first), each answering one row per
  feature, a large read in `features.online_store.threads_per_read` slices at once; on Redis two round trips
  of pipelined HMGETs; decoding is numpy. Requests from concurrent threads are merged into one such read, made
  by the client's reader thread (`features.merged_reads`, `features.online_store.requests_per_read`), which keeps
  up to `reads_in_flight` Redis reads on the wire and decodes one while the server answers another;
- `fast=False` goes through Feast's `get_online_features`.
Both read only the packed values (`stats`, `item_author_id`, the sequence arrays), not the 42 named stats.

Unknown entities get defaults (zero stats, empty sequence) flagged as missing; a store that cannot be
read raises `FeatureStoreUnavailable`, the one exception serving catches to fall back.

Two processes write the store: the batch job (Feast's materialize) and the real-time updater (Feast's push);
a write older than the stored row is a no-op on both backends (`feast_layout.guard_online_store` for SQLite,
`features.redis_store` for Redis), so a materialisation never rolls back the updater's fresher rows.

Serving keeps candidates' rows for a configured TTL in `serving.lookup.CandidateCache`; this client reads
the store on every call.

    client = OnlineFeatureClient(config.load()); f = client.get(7, [1, 2, 3]); f.item_stats.shape  # (3, 42)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from config.schema import PlatformConfig
from features.feast_layout import (
    EntityKeys,
    FeatureStoreUnavailable,
    PackedDoubles,
    PythonValues,
    StoredValues,
    decode_value,
)
from features.merged_reads import MergedCalls, Steps, run_steps
from features.online_readers import Answered, RedisReader, SentRead, SqliteReader
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

    def __init__(self, cfg: PlatformConfig, fast: bool = True, store=None):
        self.cfg = absolute_paths(cfg)
        self.spec = FeatureStoreSpec.from_config(self.cfg.features)
        self.stat_names = self.spec.stat_names
        self.empty_stats = self.spec.empty_stats()
        self._packed = PackedDoubles(len(self.stat_names))
        self.fast = fast
        self._store = store
        self._keys = {entity: EntityKeys(key) for entity, key in ENTITY_KEYS.items()}
        online = self.cfg.features.online_store
        # Concurrent requests become one read (`features.merged_reads`). Feast's own path (the benchmarks'
        # baseline) is called as Feast's users call it: one request per call, not merged. SQLite reads are made
        # in-process, so there is no server time to overlap: one read at a time per reader thread.
        depth = online.reads_in_flight if online.type == "redis" else 1
        self._merged = MergedCalls(self._get_many, online.concurrent_reads, online.requests_per_read, depth) \
            if fast else None
        timeout_s = online.timeout_ms / 1000
        if not fast:
            self._reader = None
        elif online.type == "redis":
            self._reader = RedisReader(online.connection_string or "", self.cfg.features.project, timeout_s)
        else:
            self._reader = SqliteReader(online.path, self.cfg.features.project, timeout_s, online.threads_per_read,
                                        helpers=online.concurrent_reads)

    @property
    def store(self):
        if self._store is None:
            from features.repo import open_store

            self._store = open_store(self.cfg)
        return self._store

    def _send(self, requests: list[tuple[str, str, list[str], np.ndarray]]) -> SentRead | Answered:
        """(view, entity, features, ids) -> its `receive()` gives, per request, feature -> its values for those ids
        (`StoredValues`: serialized on the fast path, Python values through Feast; both decode through the same
        methods). Redis reads are only sent here; the others are made at once."""
        if self._reader is None:
            return Answered(self._read_feast(requests))
        return self._reader.send([(view, features, *self._keys[entity].keys(ids))
                                  for view, entity, features, ids in requests])

    def _read_feast(self, requests: list[tuple[str, str, list[str], np.ndarray]]) -> list[dict[str, StoredValues]]:
        """Feast's path with its calls combined where Feast allows it without waste (the fair baseline): the
        requests for the same entities share one `get_online_features` call (the user's stats and sequence: one
        call; the candidates: one; their authors: one). Putting the user's id on every candidate row would make
        it one call fewer, but Feast then returns the user's sequence once per candidate: 2x slower here."""
        calls: dict[tuple[str, tuple[int, ...]], list[int]] = {}
        for n, (_, entity, _, ids) in enumerate(requests):
            calls.setdefault((entity, tuple(np.asarray(ids).tolist())), []).append(n)
        out: list[dict[str, StoredValues]] = [{} for _ in requests]
        for (entity, ids), members in calls.items():
            if not ids:
                for n in members:
                    out[n] = {f: PythonValues([]) for f in requests[n][2]}
                continue
            names = [f"{requests[n][0]}:{f}" for n in members for f in requests[n][2]]
            try:
                got = self.store.get_online_features(features=names, entity_rows=[{ENTITY_KEYS[entity]: i}
                                                                                  for i in ids],
                                                     full_feature_names=True).to_dict()
            except Exception as err:  # any failure of the store is the same signal to serving
                raise FeatureStoreUnavailable(f"Feast online read failed: {err}") from err
            for n in members:
                view, _, features, _ = requests[n]
                out[n] = {f: PythonValues(list(got[f"{view}__{f}"])) for f in features}
        return out

    def get(self, user_id: int, item_ids: list[int] | np.ndarray) -> OnlineFeatures:
        """The user's stats and sequence and the candidates' (and their authors') stats, as of now."""
        items = np.asarray(item_ids, np.int64).reshape(-1)
        if len(items) > MAX_CANDIDATES:
            raise ValueError(f"at most {MAX_CANDIDATES} candidates per call, got {len(items)}")
        if self._merged is None:
            return run_steps(self._get_many([(int(user_id), items)]))[0]
        return self._merged((int(user_id), items))

    def _get_many(self, asks: list[tuple[int, np.ndarray]]) -> Steps:
        """`get` for several (user, candidates) at once: two store reads in all, each user, candidate and author
        read once however many requests name it. A generator (`features.merged_reads`) that yields while the
        store answers, and returns the answers."""
        users = np.unique(np.array([user for user, _ in asks], np.int64))
        items = np.unique(np.concatenate([candidates for _, candidates in asks]))
        sent = self._send([
            (stats_view("user"), "user", ["stats", "asof_ms"], users),
            (SEQUENCE_VIEW, "user", list(SEQUENCE_FEATURES), users),
            (stats_view("item"), "item", ["stats", "item_author_id"], items),
        ])
        yield
        user_values, seq_values, item_values = sent.receive()
        item_stats, item_missing = item_values["stats"].doubles(self._packed, self.empty_stats)
        authors = item_values["item_author_id"].int64s(0)
        unique_authors, author_of = np.unique(authors[authors > 0], return_inverse=True)
        sent = self._send([(stats_view("author"), "author", ["stats"], unique_authors)])
        yield
        (author_values,) = sent.receive()
        by_author, missing_by_author = author_values["stats"].doubles(self._packed, self.empty_stats)
        author_stats = np.tile(self.empty_stats, (len(items), 1))
        author_missing = np.ones(len(items), bool)
        author_stats[authors > 0], author_missing[authors > 0] = by_author[author_of], missing_by_author[author_of]
        user_stats, user_missing = user_values["stats"].doubles(self._packed, self.empty_stats)
        user_asof = user_values["asof_ms"].int64s(0)
        sequences = self._sequences(seq_values)
        out = []
        for user_id, candidates in asks:
            u, c = int(np.searchsorted(users, user_id)), np.searchsorted(items, candidates)
            sequence, asof, seq_missing = sequences[u]
            out.append(OnlineFeatures(
                user_id=user_id, stat_names=self.stat_names, user_stats=user_stats[u],
                user_stats_asof_ms=int(user_asof[u]), user_missing=bool(user_missing[u]),
                sequence=sequence, sequence_asof_ms=asof, sequence_missing=seq_missing,
                item_ids=candidates, item_stats=item_stats[c], item_missing=item_missing[c],
                item_author_ids=authors[c], author_stats=author_stats[c], author_missing=author_missing[c],
            ))
        return out

    @staticmethod
    def _sequences(values: dict[str, StoredValues]) -> list[tuple[dict[str, np.ndarray], int, bool]]:
        """Per user: (SEQUENCE_FIELDS -> [L] int64, asof_ms, missing); missing users get empty arrays."""
        asof = values["asof_ms"].int64s(0).tolist()
        fields = [values[f].values() for f in SEQUENCE_FIELDS]
        out = []
        for u, first in enumerate(fields[0]):
            if first is None:
                out.append(({f: np.zeros(0, np.int64) for f in SEQUENCE_FIELDS}, 0, True))
            else:
                arrays = [np.asarray(decode_value(column[u]), np.int64) for column in fields]
                out.append((dict(zip(SEQUENCE_FIELDS, arrays)), int(asof[u]), False))
        return out

    def sequences(self, user_ids: list[int]) -> dict[int, tuple[dict[str, np.ndarray], int]]:
        """The stored sequence and its asof_ms of each user that has one (for the real-time updater)."""
        ids = np.asarray(user_ids, np.int64)
        (values,) = self._send([(SEQUENCE_VIEW, "user", list(SEQUENCE_FEATURES), ids)]).receive()
        return {int(user): (sequence, asof) for user, (sequence, asof, missing)
                in zip(user_ids, self._sequences(values)) if not missing}


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
