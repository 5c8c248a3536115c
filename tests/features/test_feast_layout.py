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
