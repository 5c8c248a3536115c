"""DLRM baseline and the shared feature front end (models/features.py) it shares with Zenith."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from models.dlrm import DLRM, CrossLayer, DLRMConfig
from models.features import FeatureEmbedder, fold_ids, ranking_bce
from tests.models.ranker_checks import (
    SPEC,
    check_candidates_scored_independently,
    check_shapes_and_loss,
    fitted_loss_ratio,
)
from tests.models.ranker_checks import ranking_inputs as inputs


def make_model(rank: int | None = None, num_tasks: int = 2) -> DLRM:
    torch.manual_seed(0)
    return DLRM(DLRMConfig(SPEC, num_tasks=num_tasks, cross_layers=2, cross_rank=rank, mlp_dims=(32,)))


# ---- shared front end -------------------------------------------------------------------------


def test_fold_ids_keeps_vocab_and_wraps_the_rest():
    ids = torch.tensor([0, 1, 5, 10, 11, 25, -3])
    assert fold_ids(ids, 10).tolist() == [0, 1, 5, 10, 1, 5, 0]


def test_feature_groups_have_declared_widths_and_one_row_per_real_candidate():
    x = inputs()
    feats = FeatureEmbedder(SPEC)(x)
    assert feats.num_rows == int(x.num_candidates.sum())
    assert {k: v.shape[1] for k, v in feats.groups.items()} == SPEC.group_dims()
    assert all(v.dtype == torch.float32 for v in feats.groups.values())


def test_affinity_counts_history_matches():
    x = inputs(b=1, c=2, n=4)
    x = dataclasses.replace(
        x,
        hist_lengths=torch.tensor([4]),
        hist_item_ids=torch.tensor([[7, 7, 3, 9]]),
        hist_author_ids=torch.tensor([[2, 2, 2, 5]]),
        cand_item_ids=torch.tensor([[7, 8]]),
        cand_author_ids=torch.tensor([[5, 2]]),
        num_candidates=torch.tensor([2]),
    )
    aff = FeatureEmbedder(SPEC)(x).groups["affinity"]
    assert torch.allclose(aff, torch.tensor([[0.5, 0.25], [0.0, 0.75]]))


def test_padding_of_history_and_candidates_is_ignored():
    model, x = make_model(), inputs(1)
    hmask, cmask = x.history_mask(), x.candidate_mask()
    g = torch.Generator().manual_seed(5)

    def junk(high: int, shape: torch.Size) -> torch.Tensor:
        return torch.randint(1, high, shape, generator=g)

    garbage = dataclasses.replace(
        x,  # junk (including out-of-vocabulary ids) everywhere padding is
        hist_item_ids=torch.where(hmask, x.hist_item_ids, junk(10**6, hmask.shape)),
        hist_author_ids=torch.where(hmask, x.hist_author_ids, junk(10**6, hmask.shape)),
        hist_actions=torch.where(hmask, x.hist_actions, junk(9, hmask.shape)),
        hist_ts=torch.where(hmask, x.hist_ts, torch.full_like(x.hist_ts, 10**12)),
        cand_item_ids=torch.where(cmask, x.cand_item_ids, junk(10**6, cmask.shape)),
        cand_dense=torch.where(cmask[..., None], x.cand_dense, torch.randn(x.cand_dense.shape, generator=g)),
    )
    a, b = model(x), model(garbage)
    assert torch.equal(a[cmask], b[cmask])
    labels = torch.rand(a.shape, generator=g)
    assert torch.allclose(model.loss(x, labels), model.loss(garbage, labels))


def test_ranking_bce_masks_and_weights_tasks():
    logits, labels = torch.randn(2, 3, 2), torch.rand(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    ref = torch.nn.functional.binary_cross_entropy_with_logits(logits[mask][:, 0], labels[mask][:, 0])
    assert torch.allclose(ranking_bce(logits, labels, mask, torch.tensor([1.0, 0.0])), ref)
    logits2 = logits.clone()
    logits2[~mask] = 100.0
    assert torch.allclose(ranking_bce(logits, labels, mask), ranking_bce(logits2, labels, mask))


# ---- DLRM -------------------------------------------------------------------------------------


@settings(max_examples=8, deadline=None)
@given(
    b=st.integers(1, 5), c=st.integers(1, 6), n=st.integers(1, 8),
    rank=st.sampled_from([None, 3]), seed=st.integers(0, 1000),
)
def test_shapes_and_dtypes(b, c, n, rank, seed):
    check_shapes_and_loss(make_model(rank, num_tasks=3), inputs(seed, b, c, n), torch.zeros(b, c, 3))


def test_cross_layer_formula_and_low_rank_is_smaller():
    full, low = CrossLayer(12), CrossLayer(12, rank=2)
    x0, x = torch.randn(3, 12), torch.randn(3, 12)
    assert torch.allclose(full(x0, x), x0 * (x @ full.proj.weight.T + full.proj.bias) + x)
    assert sum(p.numel() for p in low.parameters()) < sum(p.numel() for p in full.parameters())


@pytest.mark.parametrize("rank", [None, 4])
def test_candidates_are_scored_independently(rank):
    check_candidates_scored_independently(make_model(rank), inputs(2), j=3, atol=1e-6)


def test_overfits_a_tiny_batch():
    labels = (torch.rand(4, 8, 2, generator=torch.Generator().manual_seed(1)) < 0.5).float()
    assert fitted_loss_ratio(make_model(), inputs(3), labels, steps=150, lr=1e-2) < 0.2
