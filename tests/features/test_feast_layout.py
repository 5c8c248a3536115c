"""The bulk readers' decoding (`StoredValues`) against Feast's own ValueProto parsing, value by value."""

from __future__ import annotations

import numpy as np
import pytest
from feast.protos.feast.types.Value_pb2 import DoubleList, Value
from hypothesis import given, settings
from hypothesis import strategies as st

from features.feast_layout import EntityKeys, FeatureStoreUnavailable, PackedDoubles, StoredValues, decode_value

int64 = st.integers(-(2**63), 2**63 - 1)


def stored(n: int, values: dict[int, bytes]) -> StoredValues:
    """What a reader returns for entities `values` (position -> serialized value) out of n, in a shuffled order."""
    order = list(values)[::-1]
    return StoredValues(n, ",".join(map(str, order)).encode(), ",".join(str(len(values[p])) for p in order).encode(),
                        b"".join(values[p] for p in order))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.none(), int64), min_size=1, max_size=40))
def test_int64s_equal_feast_decoding(ids):
    values = {i: Value(int64_val=v).SerializeToString() for i, v in enumerate(ids) if v is not None}
    got = stored(len(ids), values).int64s(default=-7)
    assert got.tolist() == [-7 if v is None else v for v in ids]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.none(), st.lists(st.floats(allow_nan=False), min_size=3, max_size=3)), min_size=1,
                max_size=20), st.booleans())
def test_doubles_equal_feast_decoding(rows, one_odd_value):
    packed, default = PackedDoubles(3), np.array([0.5, 0.25, 0.125])
    values = {i: Value(double_list_val=DoubleList(val=r)).SerializeToString() for i, r in enumerate(rows)
              if r is not None}
    if one_odd_value and values:  # another encoding of the same value takes the one-by-one path, same answer
        first = next(iter(values))
        values[first] = b"".join(Value(double_list_val=DoubleList(val=part)).SerializeToString()
                                 for part in ([1.0], [2.0, 3.0]))  # protobuf merges the two lists
        rows[first] = [1.0, 2.0, 3.0]
    matrix, missing = stored(len(rows), values).doubles(packed, default)
    assert missing.tolist() == [r is None for r in rows]
    for row, expected in zip(matrix, rows):
        assert row.tolist() == (default.tolist() if expected is None else expected)


def test_other_value_types_fall_back_to_feast_decoding():
    values = {0: Value(int32_val=5).SerializeToString(), 2: Value(int64_val=3).SerializeToString(), 3: b""}
    column = stored(4, values)
    assert column.int64s(default=0).tolist() == [5, 0, 3, 0]
    assert column.values() == [values[0], None, values[2], b""] and decode_value(b"") is None


def test_a_malformed_bulk_answer_is_refused():
    with pytest.raises(FeatureStoreUnavailable, match="malformed"):
        StoredValues(2, b"0,5", b"1,1", b"ab")  # a position past the request
    with pytest.raises(FeatureStoreUnavailable, match="malformed"):
        StoredValues(2, b"0,1", b"1,2", b"ab")  # lengths that do not add up to the data
    with pytest.raises(FeatureStoreUnavailable, match="malformed"):
        StoredValues(2, b"0,x", b"1,1", b"ab")  # not a list of numbers


def test_many_entity_keys_equal_feasts_one_at_a_time():
    from feast.infra.key_encoding_utils import serialize_entity_key
    from feast.protos.feast.types.EntityKey_pb2 import EntityKey

    ids = [0, 1, -3, 2**40 + 7]
    feast = [serialize_entity_key(EntityKey(join_keys=["item_id"], entity_values=[Value(int64_val=i)]), 3) for i in ids]
    blob, width = EntityKeys("item_id").keys(ids)
    assert blob == b"".join(feast) and width == len(feast[0])


def test_one_value_per_entity_reads_like_the_packed_form():
    values = [Value(int64_val=5).SerializeToString(), None, Value(int64_val=-3).SerializeToString()]
    column = StoredValues.of(values)
    assert column.values() == values and column.present().tolist() == [True, False, True]
    assert column.int64s(default=0).tolist() == [5, 0, -3] and StoredValues.of([]).n == 0
    with pytest.raises(FeatureStoreUnavailable, match="malformed"):
        StoredValues.of([b"ab", 7])  # a reply element that is not a stored value


def test_the_redis_readers_pipelined_commands_are_what_redis_py_sends():
    """`RedisReader` builds its HMGETs with numpy; each must be byte for byte redis-py's own encoding."""
    from redis.connection import Connection

    from features.feast_layout import RedisReader

    reader = RedisReader("127.0.0.1:1,db=0", "proj", 0.1)  # builds commands only: nothing connects
    blob, width = EntityKeys("item_id").keys([1, -3, 2**40])
    fields = [reader.field("item_stats", f) for f in ("stats", "item_author_id")]
    expected = b"".join(b"".join(Connection().pack_command("HMGET", blob[i:i + width] + b"proj", *fields))
                        for i in range(0, len(blob), width))
    assert reader._hmgets("item_stats", ["stats", "item_author_id"], blob, width) == expected


def test_a_malformed_redis_reply_is_refused(monkeypatch):
    import features.feast_layout as layout

    reader = layout.RedisReader("127.0.0.1:1,db=0", "proj", 0.1)
    for replies in ([[b"a", None], b"not a list"], [[b"a", None], [b"b"]], [[b"a", None]]):
        sent = layout.SentRead(reader, None, [(2, ["stats", "item_author_id"])])  # two entities' HMGETs
        monkeypatch.setattr(layout, "_replies", lambda conn, n, replies=replies: replies)
        with pytest.raises(FeatureStoreUnavailable, match="malformed"):
            sent.receive()


def test_redis_replies_are_parsed_by_hiredis_directly_and_an_error_reply_is_refused(redis_server):
    """The reader parses replies with the connection's hiredis reader (`feast_layout._replies`), not redis-py's
    per-reply loop; an error reply fails the read with the server's message, and the next read works."""
    import redis

    from features.feast_layout import RedisReader

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

    import features.feast_layout as layout

    reader = layout.RedisReader(redis_server.connection_string, "proj", 1.0)
    blob, width = EntityKeys("item_id").keys(range(1, 301))  # several chunks of replies
    redis.Redis(port=redis_server.port).hset(blob[:width] + b"proj", reader.field("item_stats", "stats"), b"v1")

    def broken(rows, count, width):
        raise RuntimeError("decoder bug")

    monkeypatch.setattr(layout, "_malformed", broken)
    with pytest.raises(RuntimeError, match="decoder bug"):
        reader.read([("item_stats", ["stats"], blob, width)])
    monkeypatch.undo()
    (got,) = reader.read([("item_stats", ["stats"], blob[:width], width)])
    assert got["stats"].values() == [b"v1"]
