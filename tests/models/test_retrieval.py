"""HSTU retrieval and the SASRec baseline (MODELS.md §1 retrieval training)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from models.hstu import HSTUConfig
from models.retrieval import HSTURetrieval
from models.sasrec import SASRec

FAST = settings(max_examples=10, deadline=None)
pytestmark = pytest.mark.usefixtures("flush_denormals")
KINDS = ["research", "production", "sasrec"]



def make(kind: str, num_items: int = 40, d: int = 16, dropout: float = 0.0, seed: int = 0):
    torch.manual_seed(seed)
    if kind == "sasrec":
        return SASRec(num_items, d_model=d, num_blocks=2, num_heads=2, max_len=16, dropout=dropout)
    cfg = HSTUConfig(d_model=d, num_blocks=2, num_heads=2, d_qk=d // 2, d_v=d // 2, max_len=16,
                     dropout=dropout, variant=kind)
    return HSTURetrieval(cfg, num_items)


def batch(b=3, n=16, num_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, n + 1, (b,), generator=g)
    lengths[0] = n
    valid = torch.arange(n)[None] < lengths[:, None]
    ids = torch.randint(1, num_items + 1, (b, n), generator=g) * valid
    ts = (1_000_000 + torch.cumsum(torch.randint(1, 10**5, (b, n), generator=g), 1)) * valid
    return ids, ts, lengths


@pytest.mark.parametrize("kind", KINDS)
def test_outputs_are_unit_norm_and_padding_is_zero(kind):
    model = make(kind, dropout=0.2).train()
    ids, ts, lengths = batch()
    out = model(ids, ts, lengths)
    assert out.shape == (3, 16, 16) and out.dtype == torch.float32
    valid = torch.arange(16)[None] < lengths[:, None]
    torch.testing.assert_close(out[valid].norm(dim=-1), torch.ones(int(valid.sum())))
    assert out[~valid].abs().sum() == 0
    table = model.item_embeddings()
    assert table.shape == (41, 16) and table[0].abs().sum() == 0


@FAST
@given(kind=st.sampled_from(KINDS), cut=st.integers(1, 15), seed=st.integers(0, 1000))
def test_causal(kind, cut, seed):
    """Changing items from position p on and times from p+1 on leaves outputs before p unchanged."""
    model = make(kind, seed=seed % 5).eval()
    ids, ts, lengths = batch(seed=seed)
    lengths[:] = 16
    ids2, ts2 = ids.clone(), ts.clone()
    ids2[:, cut:] = ids2[:, cut:] % 40 + 1
    ts2[:, cut + 1:] += 10**6
    a, b = model(ids, ts, lengths), model(ids2, ts2, lengths)
    torch.testing.assert_close(a[:, :cut], b[:, :cut], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, cut:], b[:, cut:])


@pytest.mark.parametrize("kind", ["research", "sasrec"])
def test_score_all_is_cosine_of_the_last_state_with_every_item(kind):
    model = make(kind).eval()
    ids, ts, lengths = batch()
    scores = model.score_all(ids, ts, lengths)
    assert scores.shape == (3, 41) and torch.isinf(scores[:, 0]).all()
    out = model(ids, ts, lengths)
    for r in range(3):
        last = out[r, int(lengths[r]) - 1]
        expected = F.cosine_similarity(last[None], model.item_emb.weight[1:], dim=-1)
        torch.testing.assert_close(scores[r, 1:], expected, atol=1e-5, rtol=0)


def test_loss_matches_the_sampled_softmax_formula_and_masks_accidental_hits():
    model = make("research").eval()
    ids, ts, lengths = batch()
    loss = model.loss(ids, ts, lengths, num_negatives=5, generator=torch.Generator().manual_seed(3))
    neg = torch.randint(1, 41, (5,), generator=torch.Generator().manual_seed(3))
    out, table = model(ids, ts, lengths), model.item_embeddings()
    terms = []
    for r in range(3):
        for i in range(int(lengths[r]) - 1):
            t = int(ids[r, i + 1])
            logits = [out[r, i] @ table[t]] + [out[r, i] @ table[k] for k in neg.tolist() if k != t]
            terms.append(-torch.log_softmax(torch.stack(logits) / 0.05, 0)[0])
    torch.testing.assert_close(loss, torch.stack(terms).mean())
    # one item only: every negative is an accidental hit, so nothing is left to contrast with
    one = make("research", num_items=1)
    ones = (ids > 0).long()
    assert one.loss(ones, ts, lengths, num_negatives=8).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_model_overfits_a_tiny_batch(kind):
    model = make(kind, num_items=30, d=32)
    ids, ts, lengths = batch(b=4, n=10, num_items=30, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3, betas=(0.9, 0.98))
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(150):
        loss = model.loss(ids, ts, lengths, num_negatives=16, generator=g)
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert sum(losses[-10:]) / 10 < 0.2 * losses[0]
