"""The bulk readers of Feast's online layout (`features.feast_layout`): what the serving client reads with.

- `SqliteReader`: per request and feature one aggregate row, a large read in slices on several connections.
- `RedisReader`: one HMGET per entity, all of a read's HMGETs pipelined; `send` puts a read on the wire and
  `SentRead.receive()` reads its replies, so a reader thread can keep several reads in flight.
- `Answered`: a read made at once, with the same `receive()`, so the client asks every store the same way.

Each returns, per request, feature -> `StoredValues`; a store that cannot be read raises
`FeatureStoreUnavailable`.
"""

from __future__ import annotations

import sqlite3
import threading

import numpy as np

from features.feast_layout import FeatureStoreUnavailable, StoredValues

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
                    count = min(REPLIES_AT_ONCE, n - start)
                    rows = _replies(conn, count)
                    failure = failure or _malformed(rows, count, len(features))
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
