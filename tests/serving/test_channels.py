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


def test_retrieval_channels_answer_each_channel_without_excluded_items(tmp_path):
    import torch

    from bench.toy import retriever_artifact
    from models.nezha import NezhaConfig, NezhaRetriever
    from serving.retriever import RetrievalChannels
    from training.artifact import save_artifact

    items = list(range(101, 113))  # raw ids
    cfg = NezhaConfig(num_items=12, codebook_sizes=(4, 3, 1), d_model=16, num_blocks=1, num_heads=2,
                      max_history=6, dropout=0.0, beam_size=12)
    nezha = NezhaRetriever(cfg)
    nezha.set_semantic_ids(torch.tensor([[0, 0, 0]] + [[i % 4, i // 4, 0] for i in range(12)]))
    gen = save_artifact(tmp_path / "nezha", nezha, cfg, {"item_ids": items}, {}, name="toy-nezha").folder
    dense = retriever_artifact(tmp_path / "dense", items, max_len=8, d_model=16, steps=2).folder
    channels = RetrievalChannels(str(gen), str(dense))
    assert set(channels.models) == {"generative", "dense"} and "+" in channels.version
    history = [[(101, 1_000), (105, 2_000)]]
    (answer,) = channels.retrieve(history, [3_000], [8], [{101, 107}])
    for name in ("generative", "dense"):
        got, scores = answer[name]
        assert 0 < len(got) <= 8 and len(got) == len(scores) and not {101, 107} & set(got) and set(got) <= set(items)
    alone = RetrievalChannels(str(dense))
    assert set(alone.models) == {"dense"}
    with pytest.raises(ValueError, match="dense retriever too"):
        RetrievalChannels(str(dense), str(dense))
    with pytest.raises(ValueError, match="holds a generative retriever"):
        RetrievalChannels(str(gen), str(gen))


def test_a_request_merges_its_channels_with_its_own_trending_items():
    from serving.cascade import Job

    job = Job(user=None, user_id=7, now_ms=0, n=6, exclude={9}, trending=[(9, 5.0), (1, 4.0), (2, 3.0), (3, 2.0)],
              quotas={"generative": 2, "dense": 2, "trending": 2})
    assert not job.use_channels({"generative": ([], [])}) and job.cands == []  # nobody knew the history
    assert job.use_channels({"generative": ([4, 5, 6], [-1.0, -2.0, -3.0]), "dense": ([5, 7], [0.9, 0.8])})
    assert job.cands == [4, 5, 7, 1, 2, 6]  # dense's 5 is taken already; seen 9 is not trending here
    assert job.channels == ["generative", "generative", "dense", "trending", "trending", "generative"]
    assert job.cand_scores == [-1.0, -2.0, 0.8, 4.0, 3.0, -3.0]
