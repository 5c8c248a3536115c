"""Checks every ranker (DLRM, Zenith, GenRank, HSTU ranking) must pass, shared by their test modules."""

from __future__ import annotations

import dataclasses

import torch

from models.features import RankingInputSpec
from models.inputs import RankingInputs, random_ranking_inputs

SPEC = RankingInputSpec(num_users=50, num_items=100, num_authors=20, num_actions=9, embed_dim=8)


def ranking_inputs(seed: int = 0, b: int = 4, c: int = 8, n: int = 16) -> RankingInputs:
    return random_ranking_inputs(b, n, c, generator=torch.Generator().manual_seed(seed))


def check_shapes_and_loss(model, x: RankingInputs, labels: torch.Tensor) -> None:
    """Scores [B, C, T] float32 and finite; the loss a finite scalar."""
    out = model(x)
    assert out.shape == labels.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    loss = model.loss(x, labels)
    assert loss.dim() == 0 and torch.isfinite(loss)


def check_candidates_scored_independently(model, x: RankingInputs, j: int, atol: float) -> None:
    """Changing everything about candidate j of request 0 (which has all C candidates) changes its score only."""
    base = model(x)
    items, authors, dense = x.cand_item_ids.clone(), x.cand_author_ids.clone(), x.cand_dense.clone()
    items[0, j], authors[0, j], dense[0, j] = 99, 19, 5.0
    out = model(dataclasses.replace(x, cand_item_ids=items, cand_author_ids=authors, cand_dense=dense))
    others = x.candidate_mask().clone()
    others[0, j] = False
    assert not torch.allclose(out[0, j], base[0, j])
    assert torch.allclose(out[others], base[others], atol=atol)


def fitted_loss_ratio(model, x: RankingInputs, labels: torch.Tensor, steps: int, lr: float) -> float:
    """The loss after `steps` Adam steps on one batch, over the loss before them (a model that can learn: << 1)."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    first = None
    for _ in range(steps):
        loss = model.loss(x, labels)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item() / first
