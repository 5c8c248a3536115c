"""The multi-channel merge: quotas, order, duplicates, the fill, bad input."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.channels import CHANNELS, merge_channels

lists_st = st.dictionaries(st.sampled_from(CHANNELS), st.lists(st.integers(1, 60), max_size=40))
quotas_st = st.dictionaries(st.sampled_from(CHANNELS), st.integers(0, 30), min_size=1)


@given(lists_st, quotas_st, st.integers(0, 80))
@settings(max_examples=300, deadline=None)
def test_merge_is_distinct_bounded_and_draws_only_from_configured_channels(lists, quotas, k):
    merged = merge_channels(lists, quotas, k)
    items = [i for i, _ in merged]
    assert len(items) == len(set(items)) <= k
    for item, channel in merged:
        assert channel in quotas and item in lists.get(channel, [])
    available = {i for name in quotas for i in lists.get(name, [])}
    assert len(items) == min(k, len(available))  # the fill leaves nothing usable behind


@given(st.lists(st.integers(0, 15), min_size=3, max_size=3))
def test_disjoint_full_lists_get_exactly_their_quotas_in_config_order(quotas):
    lists = {name: list(range(100 * (n + 1), 100 * (n + 1) + 20)) for n, name in enumerate(CHANNELS)}
    shares = dict(zip(("trending", "dense", "generative"), quotas))  # any order: the config's
    merged = merge_channels(lists, shares, k=sum(quotas))
    assert [c for _, c in merged] == [name for name, q in shares.items() for _ in range(q)]
    for name in CHANNELS:  # each channel's best items, in its own order
        assert [i for i, c in merged if c == name] == lists[name][: shares[name]]


def test_a_missing_channel_leaves_its_share_to_the_others():
    merged = merge_channels({"dense": [1, 2, 3, 4]}, {"generative": 2, "dense": 2}, k=4)
    assert merged == [(1, "dense"), (2, "dense"), (3, "dense"), (4, "dense")]


def test_bad_configuration_is_named():
    with pytest.raises(ValueError, match="unknown retrieval channel"):
        merge_channels({}, {"collaborative": 3}, 3)
    with pytest.raises(ValueError, match=">= 0"):
        merge_channels({}, {"dense": -1}, 3)
