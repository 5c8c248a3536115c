"""The Redis bulk reader (`features.online_readers`): its commands, its reply parsing and its failures; against a
real redis-server where replies matter. The SQLite reader and both readers' answers are held equal to Feast's in
test_online.py."""

from __future__ import annotations

import pytest

import features.online_readers as online_readers
from features.feast_layout import EntityKeys, FeatureStoreUnavailable
from features.online_readers import RedisReader, SentRead


def test_the_redis_readers_pipelined_commands_are_what_redis_py_sends():
    """`RedisReader` builds its HMGETs with numpy; each must be byte for byte redis-py's own encoding."""
    from redis.connection import Connection


    reader = RedisReader("127.0.0.1:1,db=0", "proj", 0.1)  # builds commands only: nothing connects
    blob, width = EntityKeys("item_id").keys([1, -3, 2**40])
    fields = [reader.field("item_stats", f) for f in ("stats", "item_author_id")]
    expected = b"".join(b"".join(Connection().pack_command("HMGET", blob[i:i + width] + b"proj", *fields))
                        for i in range(0, len(blob), width))
    assert reader._hmgets("item_stats", ["stats", "item_author_id"], blob, width) == expected


def test_a_malformed_redis_reply_is_refused(monkeypatch):
    reader = RedisReader("127.0.0.1:1,db=0", "proj", 0.1)
    for replies in ([[b"a", None], b"not a list"], [[b"a", None], [b"b"]], [[b"a", None]]):
        sent = SentRead(reader, None, [(2, ["stats", "item_author_id"])])  # two entities' HMGETs
        monkeypatch.setattr(online_readers, "_replies", lambda conn, n, replies=replies: replies)
        with pytest.raises(FeatureStoreUnavailable, match="malformed"):
            sent.receive()


def test_redis_replies_are_parsed_by_hiredis_directly_and_an_error_reply_is_refused(redis_server):
    """The reader parses replies with the connection's hiredis reader (`online_readers._replies`), not redis-py's
    per-reply loop; an error reply fails the read with the server's message, and the next read works."""
    import redis


    reader = RedisReader(redis_server.connection_string, "proj", 1.0)
    conn = reader.client.connection_pool.get_connection()
    try:
        assert getattr(conn._parser, "_reader", None) is not None  # the fast path, with the pinned redis-py
    finally:
        reader.client.connection_pool.release(conn)
    # 600 keys: the replies are read in chunks (`REPLIES_AT_ONCE`); the error is in the first, and the later
    # chunks are still read off the connection before the read fails.
    blob, width = EntityKeys("item_id").keys(range(1, 601))
    redis.Redis(port=redis_server.port).set(blob[width:2 * width] + b"proj", b"not a hash")
    with pytest.raises(FeatureStoreUnavailable, match="WRONGTYPE"):
        reader.read([("item_stats", ["stats"], blob, width), ("item_stats", ["stats"], blob[:width], width)])
    redis.Redis(port=redis_server.port).delete(blob[width:2 * width] + b"proj")
    (got,) = reader.read([("item_stats", ["stats"], blob, width)])
    assert not got["stats"].present().any() and got["stats"].n == 600


def test_a_read_that_fails_midway_leaves_no_replies_behind_on_its_connection(redis_server, monkeypatch):
    """A failure while the replies are read (here a decoding bug, not a Redis error) drops the connection: the
    replies left unread on it must never answer the next read."""
    import redis

    reader = RedisReader(redis_server.connection_string, "proj", 1.0)
    blob, width = EntityKeys("item_id").keys(range(1, 301))  # several chunks of replies
    redis.Redis(port=redis_server.port).hset(blob[:width] + b"proj", reader.field("item_stats", "stats"), b"v1")

    def broken(rows, count, width):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(online_readers, "_malformed", broken)
    with pytest.raises(RuntimeError, match="decoder bug"):
        reader.read([("item_stats", ["stats"], blob, width)])
    monkeypatch.undo()
    (got,) = reader.read([("item_stats", ["stats"], blob[:width], width)])
    assert got["stats"].values() == [b"v1"]
