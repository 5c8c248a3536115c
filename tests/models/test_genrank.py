"""HSTU ranking (interleaved) and GenRank (MODELS.md §1 ranking, §3)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.genrank import GenRank, HSTURanking, RankerConfig, request_features
from models.inputs import random_ranking_inputs
from tests.models.ranker_checks import fitted_loss_ratio

FAST = settings(max_examples=10, deadline=None)
pytestmark = pytest.mark.usefixtures("flush_denormals")

NUM_TASKS = 3


def make(kind: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    base = dict(num_items=60, num_actions=9, num_tasks=NUM_TASKS, num_authors=20, cand_dense_dim=6,
                max_hist_len=12, d_model=16, num_blocks=2, num_heads=2, d_qk=8, d_v=8, dropout=0.0,
                head_hidden=16, num_users=50, user_dense_dim=4, request_context=True)
    base.update(kw)
    if kind == "genrank":
        return GenRank(RankerConfig(**base))
    return HSTURanking(RankerConfig(**base, variant=kind))


KINDS = ["genrank", "research", "production"]


def inputs(b=3, n=12, c=6, seed=0):
    return random_ranking_inputs(batch_size=b, hist_len=n, num_candidates=c, num_items=60,
                                 generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shapes_dtypes_and_finite(kind, dtype):
    model = make(kind).to(dtype)
    inp = inputs()
    inp = replace(inp, cand_dense=inp.cand_dense.to(dtype))
    out = model(inp)
    assert out.shape == (3, 6, NUM_TASKS) and out.dtype == dtype and torch.isfinite(out).all()


def test_token_counts_interleaved_vs_action_oriented():
    inp = inputs()
    h_hstu = make("research").history_tokens(inp)
    h_gen = make("genrank").history_tokens(inp)
    assert torch.equal(h_hstu.lengths, 2 * inp.hist_lengths) and h_hstu.x.shape[1] == 24
    assert torch.equal(h_gen.lengths, inp.hist_lengths) and h_gen.x.shape[1] == 12
    # interleaving: token 2i has event i's item, token 2i+1 its action, both at event i's time
    assert torch.equal(h_hstu.timestamps[:, ::2], inp.hist_ts) and torch.equal(h_hstu.timestamps[:, 1::2], inp.hist_ts)


def loop_request_features(ts, length, request_ts):
    index, gap, prev_req_time, count = [], [], None, 0
    for i in range(length):
        if i == 0 or ts[i] - ts[i - 1] >= 1:
            count += 1
            g = 65 if prev_req_time is None else min(math.floor(math.log2(ts[i] - prev_req_time)), 64)
            prev_req_time = ts[i]
        index.append(count)
        gap.append(g)
    if length == 0:
        return index, gap, 1, 65
    if request_ts - ts[length - 1] >= 1:
        return index, gap, count + 1, min(math.floor(math.log2(request_ts - ts[length - 1])), 64)
    return index, gap, count, gap[-1]


@FAST
@given(st.lists(st.integers(0, 10**7), min_size=1, max_size=10), st.integers(0, 5), st.integers(0, 10**6))
def test_request_features_match_a_loop(gaps, zeros, extra):
    gaps = [0 if i % (zeros + 1) == 1 else g for i, g in enumerate(gaps)]  # same-request runs
    ts = torch.cumsum(torch.tensor(gaps), 0)
    n = len(gaps)
    index, gap, ci, cg = request_features(ts[None], torch.tensor([n]), ts[-1:] + extra)
    e_index, e_gap, e_ci, e_cg = loop_request_features(ts.tolist(), n, int(ts[-1]) + extra)
    assert index[0].tolist() == e_index and gap[0].tolist() == e_gap
    assert int(ci[0]) == e_ci and int(cg[0]) == e_cg


@FAST
@given(kind=st.sampled_from(KINDS), b=st.integers(1, 3), c=st.integers(2, 6), j=st.integers(0, 5),
       seed=st.integers(0, 100))
def test_candidates_cannot_see_each_other(kind, b, c, j, seed):
    model = make(kind, seed).eval()
    inp = inputs(b=b, c=c, seed=seed)
    inp = replace(inp, num_candidates=torch.full((b,), c))
    j = j % c
    other = inp.cand_item_ids.clone()
    other[:, j] = other[:, j] % 60 + 1
    dense = inp.cand_dense.clone()
    dense[:, j] += 1.0
    out = model(inp)
    out2 = model(replace(inp, cand_item_ids=other, cand_dense=dense))
    keep = torch.arange(c) != j
    torch.testing.assert_close(out[:, keep], out2[:, keep], atol=1e-6, rtol=0)
    assert not torch.allclose(out[:, j], out2[:, j])


@pytest.mark.parametrize("kind", KINDS)
def test_one_candidate_at_a_time_and_subsets_give_the_same_scores(kind):
    model = make(kind).eval()
    inp = inputs(b=3, c=5)
    full = model(inp)
    real = inp.candidate_mask()
    for j in range(5):
        alone = model(inp.select_candidates(torch.full((3, 1), j)))
        torch.testing.assert_close(alone[real[:, j], 0], full[real[:, j], j], atol=1e-5, rtol=0)
    # drop the first two candidates: the rest keep their scores
    sub = inp.select_candidates(torch.arange(2, 5).expand(3, 3))
    sub = replace(sub, num_candidates=(inp.num_candidates - 2).clamp(min=0))
    got = model(sub)
    for r in range(3):
        k = int(sub.num_candidates[r])
        torch.testing.assert_close(got[r, :k], full[r, 2:2 + k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_history_states_are_causal(kind):
    """A history token's state never depends on later events (HSTU: except the next event's time)."""
    model = make(kind).eval()
    inp = inputs(b=2, n=12)
    inp = replace(inp, hist_lengths=torch.full((2,), 12))
    e = 5  # change events e.. (items, actions, authors) and e+1.. (times)
    items, acts, ts = inp.hist_item_ids.clone(), inp.hist_actions.clone(), inp.hist_ts.clone()
    items[:, e:] = items[:, e:] % 60 + 1
    acts[:, e:] = acts[:, e:] % 9 + 1
    ts[:, e + 1:] += 12345
    inp2 = replace(inp, hist_item_ids=items, hist_actions=acts, hist_ts=ts)

    def states(x):
        h = model.history_tokens(x)
        return model.encoder(h.x, h.lengths, position_ids=h.position_ids, timestamps=h.timestamps,
                             query_times=h.query_times)

    first_changed = 2 * e if kind != "genrank" else e
    s1, s2 = states(inp), states(inp2)
    torch.testing.assert_close(s1[:, :first_changed], s2[:, :first_changed], atol=1e-6, rtol=0)
    assert not torch.allclose(s1[:, first_changed:], s2[:, first_changed:])


def test_genrank_candidate_token_uses_mask_action_shared_position_and_request_features():
    model = make("genrank", num_users=0, user_dense_dim=0, request_context=False).eval()
    inp = inputs(b=2, c=4)
    hist = model.history_tokens(inp)
    cand = model.candidate_tokens(inp, hist)
    assert torch.equal(cand.position_ids, inp.hist_lengths[:, None].expand(2, 4))
    _, _, index, gap = request_features(inp.hist_ts, inp.hist_lengths, inp.request_ts)
    expected = (model.items(inp.cand_item_ids, inp.cand_author_ids)
                + model.actions.weight[model.cfg.num_actions + 1] * model.items.scale
                + model.pos(cand.position_ids) + model.request_index(index)[:, None]
                + model.request_gap(gap)[:, None] + model.dense(inp.cand_dense))
    expected = expected * inp.candidate_mask()[..., None]
    torch.testing.assert_close(cand.x, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_candidate_tokens_carry_the_user_context_and_affinity_features(kind):
    """Feature parity with DLRM / Zenith: user id and stats, hour, history length and recency, and the
    candidate's share of the history on its item / author, one linear map and two tables, per candidate."""
    model = make(kind).eval()
    inp = inputs(b=3, c=5, seed=4)
    inp.cand_item_ids[0, 0] = inp.hist_item_ids[0, 0]  # one candidate the user has seen
    side = model._request_side(inp)
    rows = []
    for b in range(3):
        n = int(inp.hist_lengths[b])
        gap = float(inp.request_ts[b] - inp.hist_ts[b, :n].max())
        for c in range(5):
            same_item = float((inp.hist_item_ids[b, :n] == inp.cand_item_ids[b, c]).float().mean())
            same_author = float((inp.hist_author_ids[b, :n] == inp.cand_author_ids[b, c]).float().mean())
            rows.append([*inp.user_dense[b].tolist(), math.log1p(n), math.log1p(gap), same_item, same_author])
    dense = torch.tensor(rows).reshape(3, 5, -1)
    assert dense[0, 0, -2] > 0
    hour = torch.div(inp.request_ts, 3600, rounding_mode="floor") % 24
    expected = (model.user(inp.user_ids)[:, None] * model.items.scale + model.hour(hour)[:, None] * model.items.scale
                + model.side_dense(dense))
    torch.testing.assert_close(side, expected, atol=1e-5, rtol=1e-5)

    changed = replace(inp, user_dense=inp.user_dense + 1.0, user_ids=inp.user_ids % 49 + 1)
    assert not torch.allclose(model(inp), model(changed))
    plain = make(kind, num_users=0, user_dense_dim=0, request_context=False).eval()
    assert plain._request_side(inp) == 0.0 and plain.head_dense(inp) is None
    torch.testing.assert_close(plain(inp), plain(changed))

    # head_dense: the heads read [candidate stats, the dense side values] beside the state
    wide = make(kind, head_dense=True).eval()
    torch.testing.assert_close(wide.head_dense(inp), torch.cat([inp.cand_dense, dense], -1), atol=1e-5, rtol=1e-5)
    assert wide.heads.mlps[0][0].in_features == 2 * 16 + 6 + dense.shape[-1]
    assert not torch.allclose(wide(inp), wide(replace(inp, cand_dense=inp.cand_dense + 1.0)))


@pytest.mark.parametrize("kind", ["genrank", "research"])
def test_loss_ignores_padded_candidates_and_weights_tasks(kind):
    model = make(kind).eval()
    inp = inputs(b=3, c=6)
    labels = torch.randint(0, 2, (3, 6, NUM_TASKS)).float()
    flipped = torch.where(inp.candidate_mask()[..., None], labels, 1 - labels)
    assert (inp.candidate_mask() == 0).any()
    torch.testing.assert_close(model.loss(inp, labels), model.loss(inp, flipped))
    w = torch.tensor([1.0, 0.0, 0.0])
    one_task = model.loss(inp, labels, task_weights=w)
    assert 0 < one_task < model.loss(inp, labels)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_overfits_a_tiny_batch(kind):
    model = make(kind, d_model=32, d_qk=16, d_v=16, head_hidden=32)
    inp = inputs(b=4, n=8, c=4, seed=3)
    labels = torch.randint(0, 2, (4, 4, NUM_TASKS), generator=torch.Generator().manual_seed(0)).float()
    assert fitted_loss_ratio(model, inp, labels, steps=120, lr=3e-3) < 0.1
    if kind == "research":  # the relative bias tables are trained
        assert model.encoder.rab[0].time_w.grad.abs().sum() > 0
