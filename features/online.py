"""The online feature client serving uses: one call, a user's sequence and stats plus up to 500 candidates' stats.

Two ways to read, same answer (a test holds them equal):
- the fast path reads the online store in bulk, as Feast lays it out (SQLite: one row per entity and
  feature, `<project>_<view>` tables; Redis: one hash per entity, fields named by murmur3 of
  `<view>:<feature>`): one query per view on SQLite, one Lua call for all views on Redis;
- `fast=False` goes through Feast's `get_online_features`.
Both read only the packed values (`stats`, `item_author_id`, the sequence arrays), not the 42 named stats.

Unknown entities get defaults (zero stats, empty sequence) flagged as missing; a store that cannot be
read raises `FeatureStoreUnavailable`, the one exception serving catches to fall back.

Two processes write the store: the batch job (Feast's materialize) and the real-time updater (Feast's push).
`guard_online_store`, run when an updater starts, makes a write that is older than the stored row a no-op, so
materialising a range that ends before the updater's clock never replaces its fresher rows. SQLite gets a
trigger per table; on Redis the repo uses `features.redis_store.GuardedRedisOnlineStore`, whose every write
is one compare-and-set on the server (Feast's own store reads and writes in two round trips, so a push
landing between them was rolled back). It also
puts SQLite in WAL mode, where a writer's transaction never blocks readers (a batch materialisation holds
its write lock for the whole view).

`item_ttl_s > 0` keeps item and author rows that long (never the user's: its history must be fresh), so a
ranker scoring the same popular candidates request after request reads them about once per TTL; their stats
may then lag the store by up to the TTL (the real-time path itself takes up to a second, BENCHMARKS.md).

    client = OnlineFeatureClient(config.load()); f = client.get(7, [1, 2, 3]); f.item_stats.shape  # (3, 42)
"""

from __future__ import annotations

import sqlite3
import struct
import threading
import time
from dataclasses import dataclass

import numpy as np

from config.schema import PlatformConfig
from features.repo import absolute_paths
from features.spec import ENTITY_KEYS, SEQUENCE_FIELDS, SEQUENCE_VIEW, STATS_ENTITIES, FeatureSpec, stats_view

MAX_CANDIDATES = 500
SEQUENCE_FEATURES = ("asof_ms", *SEQUENCE_FIELDS)


class FeatureStoreUnavailable(RuntimeError):
    """The online store cannot be read (unreachable, not set up, timed out): serving should fall back."""


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


class _EntityKeys:
    """Feast's serialized entity keys (version 3) for a single int64 join key, without a protobuf per id."""

    def __init__(self, join_key: str):
        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value

        def feast_key(value: int) -> bytes:
            return serialize_entity_key(EntityKey(join_keys=[join_key], entity_values=[Value(int64_val=value)]), 3)

        self.prefix = feast_key(0)[:-8]
        # Self-check against Feast's own serialisation: a layout change fails loudly, not silently.
        for probe in (1, 2**40 + 7, -3):
            if self.key(probe) != feast_key(probe):
                raise RuntimeError(f"entity key layout differs from Feast's for {join_key}")

    def key(self, value: int) -> bytes:
        return self.prefix + struct.pack("<q", value)


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _decode(raw):
    """One stored value -> what Feast's `to_dict` gives (int, float or list). The fast path hands over the
    serialized ValueProto (bytes); Feast's path already holds Python values, which pass through."""
    if not isinstance(raw, bytes):
        return raw
    if len(raw) > 1 and raw[0] == 0x20:  # int64_val (field 4, varint): the ids and times read per request
        value, end = _varint(raw, 1)
        if end == len(raw):
            return value - (1 << 64) if value >= 1 << 63 else value
    from feast.protos.feast.types.Value_pb2 import Value

    proto = Value()
    proto.ParseFromString(raw)
    kind = proto.WhichOneof("val")
    if kind is None:
        return None
    value = getattr(proto, kind)
    return list(value.val) if kind.endswith("_list_val") else value


class _PackedDoubles:
    """Reads many serialized `double_list_val` ValueProtos of one length at once, without parsing them.

    On the wire such a value is a fixed header (field 15, length; DoubleList field 1, length) followed by the
    little-endian float64s, so the 200 stats vectors of a request are one `frombuffer` of their tails."""

    def __init__(self, width: int):
        payload = 8 * width
        inner = b"\x0a" + _varint_bytes(payload)
        self.header = b"\x7a" + _varint_bytes(len(inner) + payload) + inner
        self.size = len(self.header) + payload
        self.width = width

    def matrix(self, values: list, default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """values (bytes, a list of floats, or None) -> ([n, width] float64 with `default` rows, missing mask)."""
        out = np.tile(default, (len(values), 1))
        missing = np.ones(len(values), bool)
        rows, tails = [], []
        for i, value in enumerate(values):
            if value is None:
                continue
            missing[i] = False
            if isinstance(value, bytes) and len(value) == self.size and value.startswith(self.header):
                rows.append(i)
                tails.append(value[len(self.header):])
            else:
                out[i] = _decode(value)
        if rows:
            out[rows] = np.frombuffer(b"".join(tails), "<f8").reshape(len(rows), self.width)
        return out, missing


def guard_online_store(cfg: PlatformConfig) -> None:
    """Make the SQLite online store keep the fresher row of every write and let readers run beside writers.

    Both settings live in the database file, so every later connection (Feast's writers, other processes)
    gets them. Feast names the row time `event_ts` and stores it as ISO text, whose order is time order."""
    online = absolute_paths(cfg).features.online_store
    if online.type != "sqlite":
        return
    views = [stats_view(entity) for entity in STATS_ENTITIES] + [SEQUENCE_VIEW]
    con = sqlite3.connect(online.path, timeout=online.timeout_ms / 1000 + 5)
    try:
        con.execute("PRAGMA journal_mode = WAL")
        tables = {row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        with con:
            for table in (f"{cfg.features.project}_{view}" for view in views):
                if table in tables:
                    con.execute(f'CREATE TRIGGER IF NOT EXISTS "{table}_keep_fresher" BEFORE UPDATE ON "{table}" '
                                "WHEN NEW.event_ts < OLD.event_ts BEGIN SELECT RAISE(IGNORE); END")
    finally:
        con.close()


class _SqliteReader:
    def __init__(self, path: str, project: str, timeout_s: float):
        self.project = project
        self.lock = threading.Lock()
        try:
            self.con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout_s, check_same_thread=False)
            # Memory-mapped reads: a 200-candidate lookup went from ~5 ms to ~1 ms here.
            self.con.execute("PRAGMA mmap_size = 268435456")
        except sqlite3.Error as err:
            raise FeatureStoreUnavailable(f"cannot open the SQLite online store {path}: {err}") from err

    def read(self, requests: list[tuple[str, list[str], list[bytes]]]) -> list[list[list]]:
        """(view, features, entity keys) -> per request, per key, the stored bytes of each feature (or None)."""
        parts, params = [], []
        for n, (view, features, keys) in enumerate(requests):
            if keys:
                parts.append(f'SELECT {n}, entity_key, feature_name, value FROM "{self.project}_{view}" '
                             f"WHERE entity_key IN ({','.join('?' * len(keys))}) "
                             f"AND feature_name IN ({','.join('?' * len(features))})")
                params += [*keys, *features]
        rows = []
        if parts:
            with self.lock:
                try:
                    rows = self.con.execute(" UNION ALL ".join(parts), params).fetchall()
                except sqlite3.Error as err:
                    raise FeatureStoreUnavailable(f"SQLite online store read failed: {err}") from err
        found = {(n, k, f): v for n, k, f, v in rows}
        return [[[found.get((n, k, f)) for f in features] for k in keys]
                for n, (_, features, keys) in enumerate(requests)]


# One round trip for every (key, fields) request: HMGET each hash, nil for what is absent.
_HMGET_ALL = """
local out, nk, group, fields = {}, 0, 1, {}
for i, key in ipairs(KEYS) do
  while i > nk do
    local nf = tonumber(ARGV[group + 1])
    nk = nk + tonumber(ARGV[group])
    fields = {unpack(ARGV, group + 2, group + 1 + nf)}
    group = group + 2 + nf
  end
  local vals = redis.call('HMGET', key, unpack(fields))
  for j = 1, #fields do out[#out + 1] = vals[j] or false end
end
return out
"""


class _RedisReader:
    def __init__(self, connection_string: str, project: str, timeout_s: float):
        import redis
        from feast.infra.online_stores.helpers import _mmh3

        host_port, *options = connection_string.split(",")
        host, _, port = host_port.partition(":")
        kwargs = dict(option.split("=", 1) for option in options)
        self.client = redis.Redis(host=host, port=int(port or 6379), db=int(kwargs.get("db", 0)),
                                  password=kwargs.get("password"), socket_timeout=timeout_s,
                                  socket_connect_timeout=timeout_s,
                                  ssl=kwargs.get("ssl", "false").lower() == "true")  # Feast's own `ssl=true` option
        self.script = self.client.register_script(_HMGET_ALL)
        self.project = project.encode()
        self.field = lambda view, feature: _mmh3(f"{view}:{feature}")
        self.errors = (redis.exceptions.RedisError, OSError)

    def read(self, requests: list[tuple[str, list[str], list[bytes]]]) -> list[list[list]]:
        keys, args = [], []
        for view, features, entity_keys in requests:
            keys += [k + self.project for k in entity_keys]
            args += [len(entity_keys), len(features), *(self.field(view, f) for f in features)]
        try:
            flat = self.script(keys=keys, args=args) if keys else []
        except self.errors as err:
            raise FeatureStoreUnavailable(f"Redis online store read failed: {err}") from err
        out, pos = [], 0
        for _, features, entity_keys in requests:
            nf = len(features)
            out.append([flat[pos + i * nf: pos + (i + 1) * nf] for i in range(len(entity_keys))])
            pos += nf * len(entity_keys)
        return out


class OnlineFeatureClient:
    """Reads what serving needs for one request. Thread-safe; create one per process and reuse it."""

    def __init__(self, cfg: PlatformConfig, fast: bool = True, store=None, item_ttl_s: float = 0.0):
        self.cfg = absolute_paths(cfg)
        self.item_ttl_s = item_ttl_s
        self._cached: dict[str, dict[int, tuple[float, list | None]]] = {"item": {}, "author": {}}
        self.spec = FeatureSpec.from_config(self.cfg.features)
        self.stat_names = self.spec.stat_names
        self.empty_stats = self.spec.empty_stats()
        self._packed = _PackedDoubles(len(self.stat_names))
        self.fast = fast
        self._store = store
        self._keys = {entity: _EntityKeys(key) for entity, key in ENTITY_KEYS.items()}
        online = self.cfg.features.online_store
        timeout_s = online.timeout_ms / 1000
        if not fast:
            self._reader = None
        elif online.type == "redis":
            self._reader = _RedisReader(online.connection_string or "", self.cfg.features.project, timeout_s)
        else:
            self._reader = _SqliteReader(online.path, self.cfg.features.project, timeout_s)

    @property
    def store(self):
        if self._store is None:
            from features.repo import open_store

            self._store = open_store(self.cfg)
        return self._store

    def _read(self, requests: list[tuple[str, str, list[str], list[int]]]) -> list[list[list | None]]:
        """(view, entity, features, ids) -> per request, per id, the values (None: entity missing); serialized
        on the fast path, Python values through Feast: `_decode` and `_PackedDoubles` take either."""
        if self._reader is None:
            return [self._read_feast(view, entity, features, ids) for view, entity, features, ids in requests]
        raw = self._reader.read([(view, features, [self._keys[entity].key(int(i)) for i in ids])
                                 for view, entity, features, ids in requests])
        return [[None if all(v is None for v in row) else row for row in rows] for rows in raw]

    def _read_feast(self, view: str, entity: str, features: list[str], ids: list[int]) -> list[list | None]:
        if not ids:
            return []
        key = ENTITY_KEYS[entity]
        try:
            got = self.store.get_online_features(features=[f"{view}:{f}" for f in features],
                                                 entity_rows=[{key: int(i)} for i in ids]).to_dict()
        except Exception as err:  # any failure of the store is the same signal to serving
            raise FeatureStoreUnavailable(f"Feast online read failed: {err}") from err
        rows = list(zip(*(got[f] for f in features)))
        return [None if all(v is None for v in row) else list(row) for row in rows]

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
        authors = np.array([(_decode(row[1]) or 0) if row else 0 for row in item_rows], np.int64)
        unique_authors = sorted(set(authors[authors > 0].tolist()))
        author_read = self._stale("author", unique_authors, now)
        (fetched,) = self._read([(stats_view("author"), "author", ["stats"], author_read)])
        by_author = dict(zip(unique_authors, self._merge("author", unique_authors, author_read, fetched, now)))
        author_stats, author_missing = self._stats([by_author.get(a) for a in authors.tolist()])
        user_stats, user_missing = self._stats(user_rows)
        user_asof = int(_decode(user_rows[0][1]) or 0) if user_rows[0] else 0
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
        values = [_decode(v) for v in row]
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
