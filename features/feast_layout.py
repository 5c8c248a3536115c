"""Feast's online storage layout, read and guarded without Feast in the request path.

Feast 0.67 lays the online store out as: SQLite, one row per entity and feature in `<project>_<view>` tables
(`entity_key`, `feature_name`, serialized ValueProto `value`, ISO `event_ts`); Redis, one hash per entity
(key = serialized entity key + project), fields named by murmur3 of `<view>:<feature>`. This module holds
that knowledge in one place: entity keys (`EntityKeys`, self-checked against Feast's own serialisation),
value decoding (`decode_value`; `PackedDoubles` and `StoredValues` for many values at once) and
`guard_online_store`, which makes SQLite keep the fresher of two writes and readers run beside writers (Redis
gets the same through `features.redis_store`). The bulk readers of this layout are in `features.online_readers`;
`features.online.OnlineFeatureClient` is the client serving uses.

>>> varint(varint_bytes(300), 0)
(300, 2)
>>> decode_value(b"\x20" + varint_bytes(7))
7
"""

from __future__ import annotations

import sqlite3

import numpy as np

from config.schema import PlatformConfig
from features.repo import absolute_paths
from features.spec import SEQUENCE_VIEW, STATS_ENTITIES, stats_view


class FeatureStoreUnavailable(RuntimeError):
    """The online store cannot be read (unreachable, not set up, timed out): serving should fall back."""


class EntityKeys:
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
            if self.keys([probe])[0] != feast_key(probe):
                raise RuntimeError(f"entity key layout differs from Feast's for {join_key}")

    def keys(self, values) -> tuple[bytes, int]:
        """Many keys back to back (what the bulk readers take) and the length of one."""
        ids = np.asarray(values, "<i8").reshape(-1, 1)
        width = len(self.prefix) + 8
        out = np.empty((len(ids), width), np.uint8)
        out[:, :len(self.prefix)] = np.frombuffer(self.prefix, np.uint8)
        out[:, len(self.prefix):] = ids.view(np.uint8)
        return out.tobytes(), width


def varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos += 1
        if byte < 0x80:
            return value, pos
        shift += 7


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def decode_value(raw):
    """One stored value -> what Feast's `to_dict` gives (int, float or list). The fast path hands over the
    serialized ValueProto (bytes); Feast's path already holds Python values, which pass through."""
    if not isinstance(raw, bytes):
        return raw
    if len(raw) > 1 and raw[0] == 0x20:  # int64_val (field 4, varint): the ids and times read per request
        value, end = varint(raw, 1)
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


class PackedDoubles:
    """Reads many serialized `double_list_val` ValueProtos of one length at once, without parsing them.

    On the wire such a value is a fixed header (field 15, length; DoubleList field 1, length) followed by the
    little-endian float64s, so the 200 stats vectors of a request are one `frombuffer` of their tails."""

    def __init__(self, width: int):
        payload = 8 * width
        inner = b"\x0a" + varint_bytes(payload)
        self.header = b"\x7a" + varint_bytes(len(inner) + payload) + inner
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
                out[i] = decode_value(value)
        if rows:
            out[rows] = np.frombuffer(b"".join(tails), "<f8").reshape(len(rows), self.width)
        return out, missing


class StoredValues:
    """One feature of n requested entities as the bulk readers return it: the positions (into the request) of
    the entities that have a stored value, each value's length, and the values back to back.

    A read of 200 candidates is then a handful of rows from SQLite (a row per feature, not per entity): per
    fetched row the sqlite3 module gives up and re-takes the GIL, which with 16 reading threads costs more than
    the read itself. Redis answers one value per entity and feature (`of`). Decoding is numpy over the buffer.

    >>> v = StoredValues(3, b"0,2", b"2,3", bytes.fromhex("2005" "208001"))  # int64_val 5 and 128
    >>> v.present().tolist(), v.int64s().tolist(), v.values()[1]
    ([True, False, True], [5, 0, 128], None)
    """

    def __init__(self, n: int, positions: bytes | str = b"", lengths: bytes | str = b"", data: bytes = b""):
        self.n, self.data = n, data
        self.positions = _ints(positions)
        self.offsets = np.concatenate([[0], np.cumsum(_ints(lengths))])
        if len(self.offsets) != len(self.positions) + 1 or self.offsets[-1] != len(data) or \
                (len(self.positions) and (self.positions.min() < 0 or self.positions.max() >= n)):
            raise FeatureStoreUnavailable("the online store returned a malformed bulk read")

    @classmethod
    def of(cls, values: list | tuple) -> StoredValues:
        """From one serialized value (or None) per requested entity, as the Redis reader gets them."""
        got = cls(len(values))
        if None in values:  # some entities unknown; usually every one is stored and no Python loop runs
            present = [i for i, v in enumerate(values) if v is not None]
            values = [values[i] for i in present]
            got.positions = np.array(present, np.int64)
        else:
            got.positions = np.arange(len(values))
        if values:
            try:
                got.data = b"".join(values)
            except TypeError as err:
                raise FeatureStoreUnavailable("the online store returned a malformed bulk read") from err
            got.offsets = np.zeros(len(values) + 1, np.int64)
            np.cumsum(np.fromiter(map(len, values), np.int64, len(values)), out=got.offsets[1:])
        return got

    def present(self) -> np.ndarray:
        mask = np.zeros(self.n, bool)
        mask[self.positions] = True
        return mask

    def values(self) -> list:
        """Per requested entity, its stored (serialized) value, or None."""
        out: list = [None] * self.n
        offsets = self.offsets.tolist()
        for j, pos in enumerate(self.positions.tolist()):
            out[pos] = self.data[offsets[j]:offsets[j + 1]]
        return out

    def doubles(self, packed: PackedDoubles, default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """([n, width] float64, missing mask), like `PackedDoubles.matrix`, in one `frombuffer` when every value
        has the packed layout (it does for the stats this project writes)."""
        size, head = packed.size, len(packed.header)
        rows = np.frombuffer(self.data, np.uint8)
        if len(rows) != size * len(self.positions):
            return packed.matrix(self.values(), default)
        rows = rows.reshape(-1, size)
        if not (rows[:, :head] == np.frombuffer(packed.header, np.uint8)).all():
            return packed.matrix(self.values(), default)
        out = np.tile(default, (self.n, 1))
        out[self.positions] = rows[:, head:].copy().view("<f8")
        return out, ~self.present()

    def int64s(self, default: int = 0) -> np.ndarray:
        """[n] int64 of `int64_val` ValueProtos (tag 0x20 + one varint), vectorised; `default` where absent."""
        out = np.full(self.n, default, np.int64)
        if len(self.positions) <= 4:  # a user's one timestamp: a dozen numpy calls cost more than Python here
            return self._int64s_one_by_one(out, default)
        buf = np.frombuffer(self.data, np.uint8)
        starts, lengths = self.offsets[:-1], np.diff(self.offsets)
        digits = np.arange(1, max(int(lengths.max()), 2))
        inside = digits < lengths[:, None]
        raw = buf[np.minimum(starts[:, None] + digits, len(buf) - 1)]
        last = raw[np.arange(len(starts)), np.maximum(lengths - 2, 0)]
        well_formed = ((lengths >= 2) & (lengths <= 11) & (buf[starts] == 0x20) & (last < 0x80)
                       & (((raw < 0x80) & inside).sum(axis=1) == 1))  # one varint, ending at the end
        if not well_formed.all():  # another value type: Feast's own decoding, one value at a time
            return self._int64s_one_by_one(out, default)
        shifts = (7 * (digits - 1)).astype(np.uint64)
        parts = ((raw & 0x7F).astype(np.uint64) << shifts) * inside
        out[self.positions] = np.bitwise_or.reduce(parts, axis=1).view(np.int64)
        return out

    def _int64s_one_by_one(self, out: np.ndarray, default: int) -> np.ndarray:
        values = self.values()
        for pos in self.positions.tolist():
            value = decode_value(values[pos])
            out[pos] = default if value is None else value
        return out


def _ints(text: bytes | str) -> np.ndarray:
    """b"3,0,17" -> int64 array (the readers' comma-separated positions and lengths)."""
    # fromstring's text mode parses in C, ~5x faster than split + array for a 200-candidate read.
    try:
        return np.fromstring(text, np.int64, sep=",") if text else np.zeros(0, np.int64)
    except ValueError as err:
        raise FeatureStoreUnavailable(f"the online store returned a malformed bulk read: {err}") from err


class PythonValues(StoredValues):
    """Feast's `get_online_features` answer for one feature (Python values, None where absent), read through
    the same methods as the bulk readers' `StoredValues`."""

    def __init__(self, values: list):
        self._values = values
        self.n = len(values)

    def present(self) -> np.ndarray:
        return np.array([v is not None for v in self._values], bool)

    def values(self) -> list:
        return self._values

    def doubles(self, packed: PackedDoubles, default: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return packed.matrix(self._values, default)

    def int64s(self, default: int = 0) -> np.ndarray:
        return np.array([default if v is None else v for v in self._values], np.int64)


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
