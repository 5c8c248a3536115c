"""Zenith, Zenith++ and the shared-weight variant (models/zenith.py, models/zenith_layers.py)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn import functional as F

from models.features import ranking_bce
from models.zenith import Zenith, ZenithConfig, token_similarity, with_variant
from models.zenith_layers import (
    RetokenisedFusion,
    TokenwiseAttention,
    TokenwiseLinear,
    TokenwiseMoE,
    TokenwiseSwiGLU,
)
from tests.models.ranker_checks import (
    SPEC,
    check_candidates_scored_independently,
    check_shapes_and_loss,
    fitted_loss_ratio,
)
from tests.models.ranker_checks import ranking_inputs as inputs

VARIANTS = ["zenith", "zenith++", "shared"]



def make_model(variant: str, num_tasks: int = 2, **kw) -> Zenith:
    torch.manual_seed(0)
    kw = {"dim": 16, "head_dims": (32,), "num_experts": 4, "top_k": 2, **kw}
    base = ZenithConfig(SPEC, num_tasks=num_tasks, **kw)
    return Zenith(with_variant(base, variant))


# ---- model level ------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    variant=st.sampled_from(VARIANTS), b=st.integers(1, 4), c=st.integers(1, 6),
    n=st.integers(1, 8), seed=st.integers(0, 1000),
)
def test_shapes_and_dtypes(variant, b, c, n, seed):
    check_shapes_and_loss(make_model(variant, num_tasks=3), inputs(seed, b, c, n), torch.ones(b, c, 3))


def test_retokenised_fusion_can_change_the_token_count():
    model = make_model("zenith", fused_tokens=4, num_layers=3)  # T = 8 -> T' = 4, k = D/2
    assert model.num_final_tokens == 4
    assert model(inputs()).shape == (4, 8, 2)
    assert len(token_similarity(model, inputs())) == 3
    with pytest.raises(ValueError):
        make_model("zenith", fused_tokens=3, dim=12)  # T'·D = 36 is not a multiple of T = 8


@pytest.mark.parametrize("variant", VARIANTS)
def test_candidates_are_scored_independently(variant):
    # MoE packing may put rows in other buffer slots, hence a float tolerance rather than equality.
    check_candidates_scored_independently(make_model(variant), inputs(2), j=5, atol=1e-5)


@pytest.mark.parametrize("variant", VARIANTS)
def test_padded_candidates_do_not_matter(variant):
    model, x = make_model(variant), inputs(4)
    cmask = x.candidate_mask()
    g = torch.Generator().manual_seed(3)
    junk = dataclasses.replace(
        x,
        cand_item_ids=torch.where(cmask, x.cand_item_ids, torch.randint(1, 10**6, cmask.shape, generator=g)),
        cand_dense=torch.where(cmask[..., None], x.cand_dense, torch.randn(x.cand_dense.shape, generator=g)),
    )
    labels = torch.rand(4, 8, 2, generator=g)
    assert torch.allclose(model(x)[cmask], model(junk)[cmask], atol=1e-6)
    assert torch.allclose(model.loss(x, labels), model.loss(junk, labels), atol=1e-6)


def test_moe_aux_loss_is_part_of_the_loss():
    model, x = make_model("zenith++", aux_loss_weight=0.5), inputs()
    labels = torch.rand(4, 8, 2)
    loss = model.loss(x, labels)
    aux = model.aux_loss
    assert aux.requires_grad and float(aux.detach()) > 0
    bce = ranking_bce(model(x), labels, x.candidate_mask())
    assert torch.allclose(loss, bce + 0.5 * aux, atol=1e-6)
    plain = make_model("zenith")
    plain.loss(x, labels)
    assert float(plain.aux_loss) == 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_token_similarity_one_value_per_layer_in_range(variant):
    model = make_model(variant, num_layers=3)
    sims = token_similarity(model, inputs())
    assert len(sims) == 3
    assert all(isinstance(s, float) and -1.0 <= s <= 1.0 for s in sims)


@pytest.mark.parametrize("variant", VARIANTS)
def test_overfits_a_tiny_batch(variant):
    labels = (torch.rand(4, 8, 2, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    assert fitted_loss_ratio(make_model(variant), inputs(3), labels, steps=150, lr=1e-2) < 0.2


# ---- token-wise weights are really per token --------------------------------------------------


def test_tokenwise_linear_uses_token_ts_own_matrix():
    lin = TokenwiseLinear(3, 4, 5)
    x = torch.randn(2, 3, 4)
    want = torch.stack([x[:, t] @ lin.weight[t] for t in range(3)], dim=1)
    assert torch.allclose(lin(x), want, atol=1e-6)


@pytest.mark.parametrize("make", [
    lambda shared: TokenwiseAttention(4, 8, 2, shared=shared),
    lambda shared: TokenwiseSwiGLU(4, 8, 16, shared=shared),
])
def test_shared_layers_are_permutation_equivariant_tokenwise_are_not(make):
    torch.manual_seed(0)
    x, perm = torch.randn(3, 4, 8), torch.tensor([2, 0, 3, 1])
    shared, tokenwise = make(True), make(False)
    assert torch.allclose(shared(x[:, perm]), shared(x)[:, perm], atol=1e-5)
    assert not torch.allclose(tokenwise(x[:, perm]), tokenwise(x)[:, perm], atol=1e-3)


def test_gradient_of_token_weights_comes_only_from_that_tokens_path():
    torch.manual_seed(0)
    x, t = torch.randn(3, 4, 8), 1
    probe = torch.randn(8)  # a plain .sum() of a LayerNorm output has zero gradient
    swiglu = TokenwiseSwiGLU(4, 8, 16)
    (swiglu(x)[:, t] @ probe).sum().backward()
    attn = TokenwiseAttention(4, 8, 2)
    (attn(x)[:, t] @ probe).sum().backward()
    moe = TokenwiseMoE(4, 8, 16, num_experts=3, top_k=2)
    (moe(x)[:, t] @ probe).sum().backward()
    others = [s for s in range(4) if s != t]
    grads = [
        swiglu.gate.weight.grad, swiglu.up.weight.grad, swiglu.down.weight.grad,
        attn.out.weight.grad, attn.qkv.weight.grad[..., :8],  # the query columns of token t
        moe.w_gate.grad, moe.w_up.grad, moe.w_down.grad, moe.router.weight.grad,
    ]
    for grad in grads:
        assert grad[others].abs().max() == 0
        assert grad[t].abs().max() > 0
    # keys and values of every token feed token t's output, so those weights all get gradient
    assert (attn.qkv.weight.grad[..., 8:].abs().amax((1, 2)) > 0).all()


def test_retokenised_fusion_matches_its_formula():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 8)
    fusion = RetokenisedFusion(num_tokens=4, out_tokens=2, dim=8, hidden=16)
    o = (x @ x.transpose(1, 2) / 8) @ (x @ fusion.w_r.weight.T)  # [N, T, k] with k = T'·D/T = 4
    res = fusion.token_map(fusion.mlp(x).transpose(1, 2)).transpose(1, 2)
    want = F.layer_norm(o.reshape(2, 2, 8) + res, (8,), fusion.norm.weight, fusion.norm.bias)
    assert torch.allclose(fusion(x), want, atol=1e-5)


# ---- mixture of experts -----------------------------------------------------------------------


def dense_moe_reference(moe: TokenwiseMoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, combined with the sparse top-k gates (the slow, obvious way)."""
    _, top_w, top_i = moe.route(x)
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for t in range(x.shape[1]):
            for w, e in zip(top_w[n, t], top_i[n, t]):
                h = F.silu(x[n, t] @ moe.w_gate[t, e]) * (x[n, t] @ moe.w_up[t, e])
                out[n, t] += w * (h @ moe.w_down[t, e])
    return F.layer_norm(x + out, x.shape[-1:], moe.norm.weight, moe.norm.bias)


@settings(max_examples=10, deadline=None)
@given(k=st.integers(1, 3), n=st.integers(0, 6), seed=st.integers(0, 1000))
def test_moe_routes_top_k_and_matches_dense_reference(k, n, seed):
    torch.manual_seed(seed)
    moe, x = TokenwiseMoE(3, 8, 12, num_experts=4, top_k=k), torch.randn(n, 3, 8)
    out = moe(x)
    top = moe.last_topk
    assert top.shape == (n, 3, k)
    assert all(len(set(row.tolist())) == k for row in top.reshape(-1, k))  # k distinct experts
    assert torch.allclose(out, dense_moe_reference(moe, x), atol=1e-5)


def test_moe_unselected_experts_neither_compute_nor_learn():
    torch.manual_seed(0)
    moe, x = TokenwiseMoE(2, 8, 12, num_experts=4, top_k=1), torch.randn(1, 2, 8)
    (moe(x) @ torch.randn(8)).sum().backward()  # a plain .sum() of a LayerNorm output has no gradient
    chosen = moe.last_topk[0, :, 0]
    for t in range(2):
        for e in range(4):
            has_grad = moe.w_up.grad[t, e].abs().max() > 0
            assert bool(has_grad) == (e == int(chosen[t]))
    before = moe(x).detach()
    with torch.no_grad():
        e = (int(chosen[0]) + 1) % 4
        moe.w_up[0, e] += 100.0  # an expert token 0 does not use
    assert torch.allclose(moe(x), before)


@settings(max_examples=25, deadline=None)
@given(k=st.integers(1, 4), scale=st.floats(0.0, 20.0), seed=st.integers(0, 1000))
def test_moe_aux_loss_bounds_and_gradient(k, scale, seed):
    torch.manual_seed(seed)
    e = 4
    moe, x = TokenwiseMoE(3, 8, 12, num_experts=e, top_k=k), torch.randn(16, 3, 8)
    with torch.no_grad():
        moe.router.weight.mul_(scale)  # 0: uniform router; large: near-hard routing
    moe(x)
    aux = moe.aux_loss
    value = float(aux.detach())
    assert 0 < value <= e / k + 1e-5
    if k == 1:
        assert value >= 1 / e - 1e-6
    if scale == 0.0:
        assert abs(value - 1.0) < 1e-5  # the balanced value
    aux.backward()
    if scale > 0 and k < e:
        assert moe.router.weight.grad.abs().max() > 0


def test_moe_aux_loss_extremes():
    moe = TokenwiseMoE(1, 4, 4, num_experts=4, top_k=2)
    collapsed = torch.tensor([[[0.5, 0.5, 0.0, 0.0]]]).repeat(8, 1, 1)
    assert torch.allclose(moe.balance_loss(collapsed, collapsed.topk(2).indices), torch.tensor(2.0))
    # f and P can anti-correlate, so the Switch loss can go below 1 (why the test above uses 1/E).
    moe1 = TokenwiseMoE(1, 4, 4, num_experts=3, top_k=1)
    probs = torch.tensor([[[0.34, 0.33, 0.33]], [[0.0, 0.51, 0.49]]])
    assert float(moe1.balance_loss(probs, probs.topk(1).indices)) < 1.0
