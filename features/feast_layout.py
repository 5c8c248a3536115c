"""Feast's online storage layout, read and guarded without Feast in the request path.

Feast 0.67 lays the online store out as: SQLite, one row per entity and feature in `<project>_<view>` tables
(`entity_key`, `feature_name`, serialized ValueProto `value`, ISO `event_ts`); Redis, one hash per entity
(key = serialized entity key + project), fields named by murmur3 of `<view>:<feature>`. This module holds
that knowledge in one place: entity keys (`EntityKeys`, self-checked against Feast's own serialisation),
value decoding (`decode_value`; `PackedDoubles` and `StoredValues` for many values at once), the bulk readers
(`SqliteReader`: one aggregate row per feature; `RedisReader`: pipelined HMGETs; one round trip each) and
`guard_online_store`, which makes SQLite keep the fresher of two writes and readers run beside writers (Redis
gets the same through `features.redis_store`). `features.online.OnlineFeatureClient` is the client serving uses.

>>> varint(varint_bytes(300), 0)
(300, 2)
>>> decode_value(b"\x20" + varint_bytes(7))
7
"""

from __future__ import annotations

import sqlite3
import threading

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


# A SQLite read of this many keys or more runs in `threads_per_read` slices at once (fewer: one query, no hand-over).
SLICED_KEYS = 256

Request = tuple[str, list[str], bytes, int]  # (view, features, n entity keys back to back, key length)


class SqliteReader:
    """Bulk reads of Feast's SQLite tables: per request and feature one aggregated row (`StoredValues`).

    The keys of a request go in as one blob, split by `substr` over a per-connection temp table of positions
    (a recursive CTE split cost ~100 us per 200 keys, the positions table ~8 us), and every (request, feature)
    is one primary-key join with no GROUP BY, so no temp B-tree copies the values. The statement text depends
    only on the views and features asked for and stays in the connection's statement cache. One read-only
    connection per thread: sqlite3 releases the GIL while a query runs, so concurrent readers overlap.

    With `threads_per_read` > 1 a read of `SLICED_KEYS` or more runs as that many slices of every request's positions
    at once, the first on the calling thread and the others on `helpers` threads, each with its own connection;
    the slices' rows of one (request, feature) are joined (positions come back with the values)."""

    def __init__(self, path: str, project: str, timeout_s: float, threads_per_read: int = 1, helpers: int = 1):
        self.project, self.path, self.timeout_s = project, path, timeout_s
        self._local = threading.local()
        self._connection(1)  # fail at construction, not at the first request, when the store cannot be opened
        self.threads_per_read = threads_per_read
        self._helpers = None
        if threads_per_read > 1:
            from concurrent.futures import ThreadPoolExecutor

            self._helpers = ThreadPoolExecutor(helpers * (threads_per_read - 1), thread_name_prefix="sqlite-read")

    def _connection(self, keys: int) -> sqlite3.Connection:
        """This thread's connection, with positions 0..keys-1 in its temp table."""
        con = getattr(self._local, "con", None)
        if con is None:
            try:
                con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=self.timeout_s)
                # Memory-mapped reads: a 200-candidate lookup went from ~5 ms to ~1 ms here.
                con.execute("PRAGMA mmap_size = 268435456")
                con.execute("CREATE TEMP TABLE positions (pos INTEGER PRIMARY KEY)")  # temp: allowed read-only
            except sqlite3.Error as err:
                raise FeatureStoreUnavailable(f"cannot open the SQLite online store {self.path}: {err}") from err
            con.text_factory = bytes  # group_concat of blobs is text to SQLite; take its bytes as they are
            self._local.con, self._local.positions = con, 0
        if keys > self._local.positions:
            size = max(512, 1 << (keys - 1).bit_length())
            with con:
                con.executemany("INSERT INTO temp.positions VALUES (?)", ((i,) for i in range(self._local.positions,
                                                                                               size)))
            self._local.positions = size
        return con

    def read(self, requests: list[Request]) -> list[dict[str, StoredValues]]:
        """(view, features, keys, key length) -> per request, feature -> its `StoredValues`."""
        parts, params, counts = [], [], []
        for n, (view, features, keys, width) in enumerate(requests):
            if not keys:
                continue
            counts.append((len(params) + 1, len(keys) // width))
            params += [keys, 0, len(keys) // width]
            key, low, high = len(params) - 2, len(params) - 1, len(params)
            for feature in features:
                params.append(feature)
                # Positions come back beside the values, so the row order does not matter.
                parts.append(
                    f"SELECT {n}, ?{len(params)}, group_concat(pos), group_concat(length(coalesce(value, x''))), "
                    f"group_concat(coalesce(value, x''), '') FROM temp.positions CROSS JOIN "
                    f'"{self.project}_{view}" AS stored ON stored.entity_key = substr(?{key}, pos * {width} + 1, '
                    f"{width}) AND stored.feature_name = ?{len(params)} WHERE pos >= ?{low} AND pos < ?{high}")
        if not parts:
            return _columns(requests, [])
        sql, most = " UNION ALL ".join(parts), max(count for _, count in counts)
        shares = self.threads_per_read if self._helpers is not None and sum(c for _, c in counts) >= SLICED_KEYS \
            else 1
        slices = []
        for s in range(shares):
            sliced = list(params)
            for at, count in counts:
                sliced[at], sliced[at + 1] = count * s // shares, count * (s + 1) // shares
            slices.append(sliced)
        others = [self._helpers.submit(self._execute, sql, sliced, most) for sliced in slices[1:]]
        rows = self._execute(sql, slices[0], most)
        for other in others:
            rows += other.result()
        return _columns(requests, _joined(rows))

    def send(self, requests: list[Request]) -> Answered:
        """`read`, in `RedisReader.send`'s form (an in-process read has no server time to overlap)."""
        return Answered(self.read(requests))

    def _execute(self, sql: str, params: list, most: int) -> list:
        try:
            return self._connection(most).execute(sql, params).fetchall()
        except sqlite3.Error as err:
            raise FeatureStoreUnavailable(f"SQLite online store read failed: {err}") from err


def _joined(rows: list) -> list:
    """Rows of the same (request, feature) from several slices of its keys, as one row."""
    merged: dict = {}
    for n, feature, pos, lengths, data in rows:
        if pos is None:
            continue
        got = merged.get((n, feature))
        merged[(n, feature)] = (pos, lengths, data or b"") if got is None else \
            (got[0] + b"," + pos, got[1] + b"," + lengths, got[2] + (data or b""))
    return [(n, feature.decode(), *value) for (n, feature), value in merged.items()]


def _columns(requests: list[Request], found) -> list[dict[str, StoredValues]]:
    out: list[dict[str, StoredValues]] = [{} for _ in requests]
    for n, feature, positions, lengths, data in found:
        out[n][feature] = StoredValues(len(requests[n][2]) // requests[n][3], positions, lengths, data)
    for got, (_, features, keys, width) in zip(out, requests):
        for feature in features:
            if feature not in got:
                got[feature] = StoredValues(len(keys) // width)
    return out


class RedisReader:
    """Bulk reads of Feast's Redis hashes: one HMGET per entity, all of a read's HMGETs pipelined in one round trip
    (the command bytes built with numpy: every HMGET of a (view, features) has the same layout), the replies
    parsed by hiredis (a dependency) into one `StoredValues` per feature. `send` puts a read on the wire and its
    `receive()` reads the answer, so a reader can keep several reads in flight.

    Plain pipelined HMGETs, not one Lua script doing them: for 1,600 hashes the server spent 2.7 ms of CPU against
    6.6 ms for the script (each `redis.call` costs ~2.4 us of Lua), and the server is single-threaded, so that is
    what concurrent readers queue on; a script also holds the server for its whole run. Feast's own reads are
    pipelined HMGETs too."""

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
        self.project = project.encode()
        self.field = lambda view, feature: _mmh3(f"{view}:{feature}")
        self.errors = (redis.exceptions.RedisError, OSError)
        self._templates: dict[tuple, tuple[bytes, bytes]] = {}  # a few (view, features, width): one per read kind

    def _hmgets(self, view: str, features: list[str], entity_keys: bytes, width: int) -> bytes:
        """The RESP bytes of `HMGET <entity key + project> <field>...` for each entity, back to back."""
        shape = (view, tuple(features), width)
        if shape not in self._templates:  # the field hashes (murmur3 in Python) once per kind of read, not per read
            fields = [self.field(view, f) for f in features]
            self._templates[shape] = (
                b"*%d\r\n$5\r\nHMGET\r\n$%d\r\n" % (2 + len(fields), width + len(self.project)),
                self.project + b"\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(f), f) for f in fields))
        head, tail = self._templates[shape]
        n = len(entity_keys) // width
        rows = np.empty((n, len(head) + width + len(tail)), np.uint8)
        rows[:, :len(head)] = np.frombuffer(head, np.uint8)
        rows[:, len(head):len(head) + width] = np.frombuffer(entity_keys, np.uint8).reshape(n, width)
        rows[:, len(head) + width:] = np.frombuffer(tail, np.uint8)
        return rows.tobytes()

    def read(self, requests: list[Request]) -> list[dict[str, StoredValues]]:
        """(view, features, keys, key length) -> per request, feature -> its `StoredValues`."""
        return self.send(requests).receive()

    def send(self, requests: list[Request]) -> SentRead:
        """Send a read's HMGETs on a connection of its own; `receive()` on the answer reads the replies, so the
        caller can do other work while the server answers (`features.merged_reads`' depth)."""
        commands, shapes = [], []
        for view, features, entity_keys, width in requests:
            n = len(entity_keys) // width
            if n:
                commands.append(self._hmgets(view, features, entity_keys, width))
            shapes.append((n, features))
        if not commands:
            return SentRead(self, None, shapes)
        pool = self.client.connection_pool
        try:
            conn = pool.get_connection()
        except self.errors as err:
            raise FeatureStoreUnavailable(f"Redis online store read failed: {err}") from err
        try:
            conn.send_packed_command(commands)
        except self.errors as err:
            conn.disconnect()
            pool.release(conn)
            raise FeatureStoreUnavailable(f"Redis online store read failed: {err}") from err
        return SentRead(self, conn, shapes)


class SentRead:
    """A Redis read whose commands are on the wire: `receive()` parses the replies and frees the connection."""

    def __init__(self, reader: RedisReader, conn, shapes: list[tuple[int, list[str]]]):
        self.reader, self.conn, self.shapes = reader, conn, shapes

    def receive(self) -> list[dict[str, StoredValues]]:
        """Per request, feature -> its `StoredValues`. Every reply is read, even after an error reply, so the
        connection stays usable.

        The replies are turned into columns `REPLIES_AT_ONCE` at a time, not all kept until the end: each is a
        list, which the garbage collector tracks, and thousands alive at a collection are promoted to the oldest
        generation, which then fills fast enough to force a full collection every few hundred reads (~250 ms
        with the GIL held in a process with Ray and Feast loaded; BENCHMARKS.md, feature store)."""
        conn, self.conn = self.conn, None  # received once
        columns: list[list[list]] = [[[] for _ in features] for _, features in self.shapes]
        failure = None
        try:
            for (n, features), request_columns in zip(self.shapes, columns):
                for start in range(0, n, REPLIES_AT_ONCE):
                    rows = _replies(conn, min(REPLIES_AT_ONCE, n - start))
                    failure = failure or _malformed(rows, min(REPLIES_AT_ONCE, n - start), len(features))
                    if failure is None:
                        for column, values in zip(request_columns, zip(*rows)):
                            column.extend(values)
        except BaseException as err:
            if conn is not None:
                conn.disconnect()  # replies may be left unread on it: the next use reconnects
            if isinstance(err, self.reader.errors):
                raise FeatureStoreUnavailable(f"Redis online store read failed: {err}") from err
            raise
        finally:
            if conn is not None:
                self.reader.client.connection_pool.release(conn)
        if failure is not None:
            raise FeatureStoreUnavailable(failure)
        return [{f: StoredValues.of(column) for f, column in zip(features, request_columns)}
                for (_, features), request_columns in zip(self.shapes, columns)]


REPLIES_AT_ONCE = 64


def _malformed(rows: list, count: int, width: int) -> str | None:
    """Why `count` HMGET replies of `width` fields are not that (None when they are). The common case is checked
    in C (map), not by a Python loop over the replies."""
    if len(rows) == count and {*map(type, rows)} == {list} and {*map(len, rows)} == {width}:
        return None
    error = next((row for row in rows if isinstance(row, Exception)), None)  # hiredis' form of an error reply
    return f"Redis online store read failed: {error}" if error is not None else \
        "the Redis online store returned a malformed bulk read"


class Answered:
    """A read made at once (SQLite, Feast's SDK), with `SentRead`'s `receive()`: the online client asks every
    store the same way."""

    def __init__(self, answer: list[dict[str, StoredValues]]):
        self.answer = answer

    def receive(self) -> list[dict[str, StoredValues]]:
        return self.answer


def _replies(conn, n: int) -> list:
    """The next n replies on a redis-py connection, parsed by its hiredis reader directly.

    redis-py's `read_response` spends ~3 us of Python per reply around the parser (a 200-candidate read has ~400
    replies: 20-25% of the client's CPU, BENCHMARKS.md). This reads the parser's private `_reader` and
    `read_from_socket` (redis-py 8.1, pinned); with another parser it falls back to `read_response`, and a test
    holds the fast path in use with the pinned version."""
    from redis._parsers.hiredis import NOT_ENOUGH_DATA

    parser = conn._parser
    reader = getattr(parser, "_reader", None)
    if reader is None or not hasattr(parser, "read_from_socket"):
        return [conn.read_response() for _ in range(n)]
    out, gets, more = [None] * n, reader.gets, parser.read_from_socket
    for i in range(n):
        reply = gets()
        while reply is NOT_ENOUGH_DATA:
            more()
            reply = gets()
        out[i] = reply
    return out
