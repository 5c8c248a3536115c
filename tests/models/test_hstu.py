"""HSTU block / encoder (MODELS.md §1) and Stochastic Length."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.hstu import (
    HSTUBlock,
    HSTUConfig,
    HSTUEncoder,
    log_time_bucket,
    next_event_times,
)
from models.kernels.reference import attention_mask
from models.stochastic_length import kept_length, stochastic_length

FAST = settings(max_examples=12, deadline=None)
pytestmark = pytest.mark.usefixtures("flush_denormals")



def small_cfg(**kw) -> HSTUConfig:
    base = dict(d_model=16, num_blocks=2, num_heads=2, d_qk=8, d_v=4, max_len=24, dropout=0.0)
    base.update(kw)
    return HSTUConfig(**base)


def random_times(b: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 1_700_000_000 + torch.cumsum(torch.randint(0, 5000, (b, n), generator=g), dim=1)


@given(st.integers(-10**9, 10**9))
def test_log_time_bucket_matches_formula(dt):
    expected = min(max(math.floor(math.log(max(abs(dt), 1)) / 0.301), 0), 128)
    assert int(log_time_bucket(torch.tensor([dt]))[0]) == expected


def test_next_event_times_uses_next_time_and_own_time_for_last():
    ts = torch.tensor([[10, 20, 30, 40], [5, 6, 0, 0]])
    assert next_event_times(ts, torch.tensor([4, 2])).tolist() == [[20, 30, 40, 40], [6, 6, 0, 0]]


def explicit_research_block(block: HSTUBlock, x, bias, lengths, inv_n):
    """MODELS.md §1 written out literally, one head at a time."""
    h, dqk, dv = block.h, block.dqk, block.dv
    xt = F.layer_norm(x, (x.shape[-1],), eps=1e-6)
    z = F.silu(xt @ block.w1.weight.T)
    u, v, q, k = z.split([h * dv, h * dv, h * dqk, h * dqk], dim=-1)
    mask = attention_mask(lengths, None, x.shape[1]).to(x.dtype)
    outs = []
    for i in range(h):
        qh, kh, vh = q[..., i * dqk:(i + 1) * dqk], k[..., i * dqk:(i + 1) * dqk], v[..., i * dv:(i + 1) * dv]
        s = qh @ kh.transpose(1, 2) + bias[:, 0]
        outs.append((F.silu(s) * inv_n * mask) @ vh)
    o = torch.cat(outs, dim=-1)
    return x + block.w2(u * F.layer_norm(o, (o.shape[-1],), eps=1e-6))


def test_encoder_equals_the_written_out_formula_with_rab():
    torch.manual_seed(0)
    cfg = small_cfg(num_blocks=2)
    enc = HSTUEncoder(cfg)
    b, n = 2, 7
    x = torch.randn(b, n, cfg.d_model)
    ts = random_times(b, n)
    lengths = torch.tensor([7, 4])
    expected = x
    for layer, block in enumerate(enc.blocks):
        bias = torch.zeros(b, 1, n, n)
        for r in range(b):
            for i in range(n):
                tq = ts[r, i + 1] if i + 1 < int(lengths[r]) else ts[r, i]
                for j in range(n):
                    bucket = min(max(math.floor(math.log(max(abs(int(tq - ts[r, j])), 1)) / 0.301), 0), 128)
                    bias[r, 0, i, j] = enc.rab[layer].pos_w[j - i + cfg.max_len - 1] + enc.rab[layer].time_w[bucket]
        expected = explicit_research_block(block, expected, bias, lengths, 1 / cfg.max_len)
    got = enc(x, lengths, timestamps=ts)
    valid = (torch.arange(n)[None] < lengths[:, None])[..., None]
    torch.testing.assert_close(got, expected * valid, atol=1e-5, rtol=1e-5)


def test_production_block_form():
    block = HSTUBlock(small_cfg(variant="production"))
    assert block.attn_scale == pytest.approx(1 / math.sqrt(8))
    assert block.w2.in_features == 3 * 2 * 4  # [u, o, u ⊙ LN(o)]
    x = torch.randn(1, 3, 16)
    u, q, _, _ = block.project(x)
    assert (u >= -0.2785).all()  # SiLU's minimum: u is gated
    assert (q < -0.3).any()  # q is not passed through SiLU


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("variant,bias", [("research", "auto"), ("production", "auto"), ("research", "alibi")])
def test_encoder_shapes_dtypes_and_zero_padding(dtype, variant, bias):
    enc = HSTUEncoder(small_cfg(variant=variant, relative_bias=bias)).to(dtype)
    x = torch.randn(3, 9, 16, dtype=dtype)
    y = enc(x, torch.tensor([9, 5, 1]), timestamps=random_times(3, 9))
    assert y.shape == x.shape and y.dtype == dtype
    assert y[1, 5:].abs().sum() == 0 and y[2, 1:].abs().sum() == 0
    assert torch.isfinite(y).all()


@FAST
@given(
    b=st.integers(1, 3), n=st.integers(2, 12), cut=st.integers(0, 11),
    kind=st.sampled_from([("research", "auto"), ("production", "auto"), ("research", "alibi")]),
    seed=st.integers(0, 1000),
)
def test_encoder_is_causal(b, n, cut, kind, seed):
    """Changing events at positions >= p never changes outputs before p, except that output p-1 uses
    event p's time as its query time (by design), so times change only from p+1 on."""
    p = min(cut, n - 1)
    torch.manual_seed(seed)
    enc = HSTUEncoder(small_cfg(variant=kind[0], relative_bias=kind[1])).eval()
    x = torch.randn(b, n, 16)
    ts = random_times(b, n, seed)
    lengths = torch.full((b,), n)
    x2 = x.clone()
    x2[:, p:] = torch.randn(b, n - p, 16)
    ts2 = ts.clone()
    ts2[:, p + 1:] += torch.randint(0, 10**6, (1,))
    y, y2 = enc(x, lengths, timestamps=ts), enc(x2, lengths, timestamps=ts2)
    torch.testing.assert_close(y[:, :p], y2[:, :p], atol=1e-6, rtol=0)
    assert not torch.allclose(y[:, p:], y2[:, p:])


def test_rab_uses_the_next_events_time_as_query_time():
    torch.manual_seed(0)
    enc = HSTUEncoder(small_cfg()).eval()
    with torch.no_grad():
        for r in enc.rab:
            r.time_w.normal_()
    x, ts, lengths = torch.randn(1, 5, 16), random_times(1, 5), torch.tensor([5])
    ts2 = ts.clone()
    ts2[0, 3:] += 10**6  # moves t_3: output 2's query time, and key time of 3, 4
    y, y2 = enc(x, lengths, timestamps=ts), enc(x, lengths, timestamps=ts2)
    torch.testing.assert_close(y[:, :2], y2[:, :2])
    assert not torch.allclose(y[:, 2], y2[:, 2])


def test_extra_padding_does_not_change_real_outputs():
    torch.manual_seed(0)
    enc = HSTUEncoder(small_cfg()).eval()
    x, ts, lengths = torch.randn(2, 6, 16), random_times(2, 6), torch.tensor([6, 3])
    y = enc(x, lengths, timestamps=ts)
    xp = torch.cat([x, torch.randn(2, 4, 16)], dim=1)
    tsp = torch.cat([ts, torch.zeros(2, 4, dtype=ts.dtype)], dim=1)
    torch.testing.assert_close(enc(xp, lengths, timestamps=tsp)[:, :6], y, atol=1e-6, rtol=0)


def test_alibi_slopes_and_bias():
    enc = HSTUEncoder(small_cfg(num_heads=4, relative_bias="alibi"))
    torch.testing.assert_close(enc.alibi_slopes, torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    bias = enc.layer_bias(0, torch.tensor([[[-3]]]), torch.tensor([[[0]]]))
    torch.testing.assert_close(bias.flatten(), -3 * enc.alibi_slopes)


# --- Stochastic Length --------------------------------------------------------------------------


def expected_cost(n: int, big_n: int, alpha: float) -> float:
    keep = kept_length(big_n, alpha)
    if n <= keep:
        return n * n
    p_keep = min(big_n**alpha / n**2, 1.0)
    return p_keep * n * n + (1 - p_keep) * keep * keep


@pytest.mark.parametrize("alpha", [1.3, 1.5, 1.7])
def test_stochastic_length_expected_attention_cost_is_about_n_to_the_alpha(alpha):
    big_n, b = 256, 20000
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(1, big_n + 1, (b,), generator=g)
    lengths[: b // 2] = big_n  # half at full length: the worst case
    ids = torch.ones(b, 1, dtype=torch.long).expand(b, big_n)
    _, new = stochastic_length(ids, lengths, alpha, generator=g)
    cost = (new.double() ** 2).mean().item()
    theory = sum(expected_cost(int(n), big_n, alpha) for n in lengths.tolist()) / b
    assert cost == pytest.approx(theory, rel=0.03)
    # per sequence at most ~2·N^alpha, far below N² for the full-length half
    full = (new[: b // 2].double() ** 2).mean().item()
    assert big_n**alpha <= full <= 2 * big_n**alpha
    assert full < big_n**2 / 2


def test_stochastic_length_keeps_most_recent_events_and_aligned_tensors():
    g = torch.Generator().manual_seed(0)
    b, n = 64, 16
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    valid = torch.arange(n)[None] < lengths[:, None]
    ids = (torch.arange(1, n + 1)[None].expand(b, n) * valid)
    ts = ids * 100
    emb = ids[..., None].float().expand(b, n, 3)
    new_ids, new_len, new_ts, new_emb = stochastic_length(ids, lengths, 1.5, ts, emb, generator=g)
    assert (new_len < lengths).any() and (new_len == lengths).any()
    for r in range(b):
        k, m = int(new_len[r]), int(lengths[r])
        assert new_ids[r, :k].tolist() == list(range(m - k + 1, m + 1))
        assert (new_ids[r, k:] == 0).all()
    assert torch.equal(new_ts, new_ids * 100) and torch.equal(new_emb[..., 1], new_ids.float())
    assert new_ids.shape[1] == int(new_len.max())


def test_stochastic_length_alpha_two_never_cuts_and_bad_alpha_raises():
    ids = torch.arange(1, 11).expand(5, 10)
    lengths = torch.tensor([10, 9, 3, 10, 1])
    out, new = stochastic_length(ids, lengths, 2.0)
    assert torch.equal(new, lengths) and torch.equal(out, ids * (torch.arange(10)[None] < lengths[:, None]))
    with pytest.raises(ValueError):
        stochastic_length(ids, lengths, 0.9)
