"""training.metrics against scikit-learn and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from training.metrics import (
    StreamingBinaryMetrics,
    auc,
    binary_metrics,
    calibration,
    gauc,
    hit_rate,
    logloss,
    mrr,
    ndcg,
    normalized_entropy,
    retrieval_metrics,
    target_ranks,
)

FAST = settings(max_examples=40, deadline=None)


@FAST
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=60))
def test_auc_matches_sklearn_with_many_ties(rows):
    labels, scores = np.array(rows).T
    if labels.min() == labels.max():
        assert math.isnan(auc(labels, scores))
    else:
        assert auc(labels, scores / 7.0) == pytest.approx(roc_auc_score(labels, scores / 7.0), abs=1e-12)


def test_auc_on_a_large_random_sample_and_on_torch_inputs():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 20_000)
    scores = np.round(rng.normal(size=20_000) + labels * 0.5, 2)  # rounding makes ties
    expected = roc_auc_score(labels, scores)
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert auc(torch.from_numpy(labels), torch.from_numpy(scores).float()) == pytest.approx(expected, abs=1e-6)


@FAST
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 4), st.integers(1, 5)), min_size=1, max_size=80))
def test_gauc_is_the_impression_weighted_mean_of_per_user_sklearn_aucs(rows):
    labels, scores, users = np.array(rows).T
    values, weights = [], []
    for u in np.unique(users):
        sel = users == u
        if labels[sel].min() != labels[sel].max():
            values.append(roc_auc_score(labels[sel], scores[sel]))
            weights.append(sel.sum())
    got = gauc(labels, scores, users)
    if values:
        assert got == pytest.approx(np.average(values, weights=weights), abs=1e-12)
    else:
        assert math.isnan(got)


def test_gauc_by_hand():
    # user 1: perfect (weight 3); user 2: of four pairs three reversed, one tied -> 0.125 (weight 4);
    # user 3: positives only, skipped
    labels = [1, 0, 0, 1, 1, 0, 0, 1]
    scores = [0.9, 0.1, 0.2, 0.3, 0.5, 0.5, 0.6, 0.7]
    users = [1, 1, 1, 2, 2, 2, 2, 3]
    assert gauc(labels, scores, users) == pytest.approx((3 * 1.0 + 4 * 0.125) / 7)


def test_logloss_ne_and_calibration():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 1000)
    probs = rng.uniform(0.01, 0.99, 1000)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)
    rate = labels.mean()
    base = -(rate * math.log(rate) + (1 - rate) * math.log(1 - rate))
    assert normalized_entropy(labels, probs) == pytest.approx(log_loss(labels, probs) / base, rel=1e-12)
    # predicting the base rate everywhere has NE exactly 1 and calibration exactly 1
    const = np.full(1000, rate)
    assert normalized_entropy(labels, const) == pytest.approx(1.0)
    assert calibration(labels, const) == pytest.approx(1.0)
    assert calibration([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4]) == pytest.approx(0.5)
    # a confident mistake is clipped, not infinite
    assert math.isfinite(logloss([1], [0.0]))
    assert math.isnan(normalized_entropy([1, 1], [0.5, 0.5]))


def test_streaming_accumulator_equals_the_metrics_of_the_concatenation():
    rng = np.random.default_rng(2)
    acc = StreamingBinaryMetrics()
    chunks = []
    for size in (50, 1, 300, 7):
        y, p, u = rng.integers(0, 2, size), rng.uniform(0.01, 0.99, size), rng.integers(1, 20, size)
        acc.update(y, p, groups=u)
        chunks.append((y, p, u))
        assert acc.last()["count"] == size
    y, p, u = (np.concatenate(c) for c in zip(*chunks))
    got, expected = acc.result(), binary_metrics(y, p, u)
    assert set(got) == set(expected)
    for key in expected:
        assert got[key] == pytest.approx(expected[key], rel=1e-5), key  # scores are kept as float32
    with pytest.raises(ValueError, match="groups"):
        acc.update([1], [0.5])
    assert StreamingBinaryMetrics().result()["count"] == 0


def test_target_ranks_exclude_padding_and_count_ties_against_the_target():
    scores = torch.tensor([[9.0, 0.1, 0.8, 0.3, 0.8],
                           [9.0, 0.5, 0.5, 0.5, 0.5]])
    # padding (column 0) never outranks; the tie at 0.8 counts against item 2; a constant model is worst
    assert target_ranks(scores, torch.tensor([2, 3])).tolist() == [1, 3]
    assert target_ranks(scores, torch.tensor([4, 1])).tolist() == [1, 3]
    exclude = torch.tensor([[4, 2, 0], [1, 2, 3]])  # the row's own target is never excluded
    assert target_ranks(scores, torch.tensor([2, 3]), exclude=exclude).tolist() == [0, 1]


@FAST
@given(st.integers(0, 10_000), st.integers(1, 6), st.integers(2, 40))
def test_target_ranks_equal_the_position_in_a_full_sort(seed, b, v):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, v + 1, generator=g)  # continuous: no ties
    targets = torch.randint(1, v + 1, (b,), generator=g)
    order = scores[:, 1:].argsort(dim=1, descending=True) + 1
    expected = (order == targets[:, None]).float().argmax(dim=1)
    assert target_ranks(scores, targets).tolist() == expected.tolist()


def test_retrieval_metrics_by_hand():
    ranks = np.array([0, 1, 9, 10, 49, 50])
    assert hit_rate(ranks, 10) == pytest.approx(3 / 6)
    assert hit_rate(ranks, 50) == pytest.approx(5 / 6)
    assert ndcg(ranks, 10) == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(11)) / 6)
    assert mrr(ranks) == pytest.approx(sum(1 / (r + 1) for r in ranks) / 6)
    assert retrieval_metrics(torch.tensor(ranks), ks=(10,)).keys() == {"hr@10", "ndcg@10", "mrr"}
    assert math.isnan(hit_rate([], 10))
