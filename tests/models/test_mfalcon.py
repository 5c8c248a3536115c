"""M-FALCON (MODELS.md §2): batched = one-at-a-time = model.forward; cached = recomputed."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.genrank import GenRank, HSTURanking, RankerConfig
from models.inputs import random_ranking_inputs
from models.mfalcon import MFalconScorer

FAST = settings(max_examples=10, deadline=None)
KINDS = ["genrank", "research", "production"]



def make(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = dict(num_items=60, num_actions=9, num_tasks=2, num_authors=20, cand_dense_dim=6, max_hist_len=12,
               d_model=16, num_blocks=2, num_heads=2, d_qk=8, d_v=8, dropout=0.1, head_hidden=16,
               num_users=50, user_dense_dim=4, request_context=True, head_dense=True)  # every side feature
    model = GenRank(RankerConfig(**cfg)) if kind == "genrank" else HSTURanking(RankerConfig(**cfg, variant=kind))
    with torch.no_grad():  # make the relative-bias tables matter
        for p in model.encoder.parameters():
            if p.dim() == 1:
                p.normal_(0, 0.5)
    return model.eval()


def inputs(b=3, n=12, c=7, seed=0, users=50):
    return random_ranking_inputs(batch_size=b, hist_len=n, num_candidates=c, num_items=60, num_users=users,
                                 generator=torch.Generator().manual_seed(seed))


def assert_same_on_real(a, b, inp, atol=1e-5):
    real = inp.candidate_mask()
    torch.testing.assert_close(a[real], b[real], atol=atol, rtol=0)


@FAST
@given(kind=st.sampled_from(KINDS), b=st.integers(1, 4), n=st.integers(1, 12), c=st.integers(1, 9),
       mb=st.sampled_from([1, 2, 3, 64]), seed=st.integers(0, 1000))
def test_mfalcon_equals_forward(kind, b, n, c, mb, seed):
    model = make(kind, seed % 7)
    inp = inputs(b, n, c, seed)
    assert_same_on_real(MFalconScorer(model, micro_batch=mb).score(inp), model(inp), inp)


@pytest.mark.parametrize("kind", KINDS)
def test_mfalcon_equals_one_candidate_at_a_time_in_float64(kind):
    model = make(kind).double()
    inp = inputs(b=2, c=6)
    inp = replace(inp, cand_dense=inp.cand_dense.double())
    batched = MFalconScorer(model, micro_batch=4).score(inp)
    assert batched.dtype == torch.float64
    real = inp.candidate_mask()
    for j in range(6):
        alone = model(inp.select_candidates(torch.full((2, 1), j)))
        torch.testing.assert_close(batched[real[:, j], j], alone[real[:, j], 0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", ["genrank", "research"])
def test_history_is_prefilled_once_not_per_micro_batch(kind):
    model = make(kind)
    calls = []
    for block in model.encoder.blocks:  # block.forward runs only for the prefill; candidates use project/output
        block.register_forward_hook(lambda *_: calls.append(1))
    MFalconScorer(model, micro_batch=2).score(inputs(c=9))  # 5 micro-batches
    assert len(calls) == len(model.encoder.blocks)


@pytest.mark.parametrize("kind", ["genrank", "production"])
def test_cached_equals_recomputed_and_invalidates_on_history_change(kind):
    model = make(kind)
    inp = inputs(b=4, c=5, users=1000)
    scorer = MFalconScorer(model, micro_batch=3, cache_size=10)
    first = scorer.score(inp)
    assert (scorer.hits, scorer.misses) == (0, 4)
    # same histories at a later request time, new candidates: every row hits and stays exact
    new_items = torch.where(inp.candidate_mask(), inp.cand_item_ids % 60 + 1, 0)
    later = replace(inp, request_ts=inp.request_ts + 3600, cand_item_ids=new_items)
    cached = scorer.score(later)
    assert (scorer.hits, scorer.misses) == (4, 4)
    assert_same_on_real(cached, MFalconScorer(model).score(later), later)
    assert_same_on_real(cached, model(later), later)
    # user 1 gets one more event: only that row is recomputed, and its score follows the new history
    h = inp.hist_item_ids.clone()
    n1 = int(inp.hist_lengths[1])
    assert n1 < h.shape[1]
    h[1, n1] = 7
    ts = inp.hist_ts.clone()
    ts[1, n1] = ts[1, n1 - 1] + 5
    acts = inp.hist_actions.clone()
    acts[1, n1] = 2
    grown = replace(inp, hist_item_ids=h, hist_ts=ts, hist_actions=acts, hist_lengths=inp.hist_lengths + (
        torch.arange(4) == 1).long())
    got = scorer.score(grown)
    assert (scorer.hits, scorer.misses) == (7, 5)
    assert_same_on_real(got, model(grown), grown)
    assert not torch.allclose(got[1], first[1])
    torch.testing.assert_close(got[[0, 2, 3]], first[[0, 2, 3]])


def test_cache_is_lru_bounded():
    model = make("genrank")
    scorer = MFalconScorer(model, cache_size=2)
    inp = inputs(b=3, users=1000)
    assert len(set(inp.user_ids.tolist())) == 3
    scorer.score(inp)
    assert len(scorer._cache) == 2  # the oldest user (row 0) was evicted
    scorer.score(inp)
    assert (scorer.hits, scorer.misses) == (2, 4)
    scorer.clear_cache()
    assert len(scorer._cache) == 0


def test_score_restores_training_mode_and_keeps_no_grad():
    model = make("research").train()
    out = MFalconScorer(model).score(inputs())
    assert model.training and not out.requires_grad
    model.eval()
    assert_same_on_real(out, model(inputs()), inputs())
