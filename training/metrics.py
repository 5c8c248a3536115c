"""Offline metrics: binary ranking quality (AUC, GAUC, logloss, NE, calibration) and next-item
retrieval quality (HR@K, NDCG@K, MRR over the full catalogue).

Binary metrics take labels in {0, 1} and predicted probabilities (AUC and GAUC only need scores
that order the same way, so logits work there too). Retrieval metrics take the 0-based rank of each
user's target among all catalogue items, which `target_ranks` computes from a score matrix.

>>> import numpy as np
>>> auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8])
0.75
>>> gauc([0, 1, 0, 1, 1], [0.2, 0.9, 0.5, 0.1, 0.7], groups=[1, 1, 2, 2, 3])  # user 3 has one class
0.5
>>> {k: round(v, 4) for k, v in retrieval_metrics(np.array([0, 3, 60]), ks=(10,)).items()}
{'hr@10': 0.6667, 'ndcg@10': 0.4769, 'mrr': 0.4221}
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

_EPS = 1e-7  # probabilities are clipped to [eps, 1 - eps] so one confident mistake stays finite


def _as_array(x, dtype=np.float64) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def _grouped_auc(labels: np.ndarray, scores: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-group AUC via the Mann-Whitney rank sum, ties averaged (what sklearn's trapezoid gives).

    Returns (auc, impressions) for every group that has both classes.
    """
    if labels.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    order = np.lexsort((scores, groups))  # by group, then score
    g, s, y = groups[order], scores[order], labels[order]
    n = g.size
    new_group = np.r_[True, g[1:] != g[:-1]]
    new_run = new_group | np.r_[True, s[1:] != s[:-1]]
    group_id = np.cumsum(new_group) - 1
    run_id = np.cumsum(new_run) - 1
    group_start = np.flatnonzero(new_group)
    rank = np.arange(n) - group_start[group_id] + 1.0  # 1-based rank within the group
    run_rank = np.bincount(run_id, weights=rank) / np.bincount(run_id)  # tied scores share the mean rank
    rank = run_rank[run_id]
    pos = np.bincount(group_id, weights=y)
    size = np.bincount(group_id).astype(np.float64)
    neg = size - pos
    rank_sum = np.bincount(group_id, weights=rank * y)
    both = (pos > 0) & (neg > 0)
    auc_values = (rank_sum[both] - pos[both] * (pos[both] + 1) / 2) / (pos[both] * neg[both])
    return auc_values, size[both].astype(np.int64)


def auc(labels, scores) -> float:
    """Area under the ROC curve; tied scores count half, as in sklearn's roc_auc_score.

    nan when only one class is present (sklearn raises instead).

    >>> auc([1, 0, 1, 0], [0.5, 0.5, 0.9, 0.1])
    0.875
    """
    y, s = _as_array(labels), _as_array(scores)
    values, _ = _grouped_auc(y, s, np.zeros(y.size, dtype=np.int64))
    return float(values[0]) if values.size else math.nan


def gauc(labels, scores, groups) -> float:
    """Group AUC: per-group (per-user) AUC weighted by the group's impression count.

    Groups with a single class are skipped; nan when no group has both.

    >>> gauc([0, 1, 1, 0], [0.1, 0.2, 0.3, 0.4], groups=[7, 7, 8, 8])
    0.5
    """
    values, weights = _grouped_auc(_as_array(labels), _as_array(scores), _as_array(groups, np.int64))
    return float(np.average(values, weights=weights)) if values.size else math.nan


def logloss(labels, probs) -> float:
    """Mean binary cross-entropy of probabilities (clipped to [1e-7, 1 - 1e-7]).

    >>> round(logloss([1, 0], [0.5, 0.5]), 4)
    0.6931
    """
    y, p = _as_array(labels), np.clip(_as_array(probs), _EPS, 1 - _EPS)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))) if y.size else math.nan


def _entropy(rate: float) -> float:
    if rate <= 0 or rate >= 1:
        return math.nan
    return -(rate * math.log(rate) + (1 - rate) * math.log1p(-rate))


def normalized_entropy(labels, probs) -> float:
    """Logloss divided by the entropy of the base rate: < 1 means better than predicting the CTR.

    nan when the labels hold one class only.

    >>> normalized_entropy([1, 0, 0, 0], [0.25, 0.25, 0.25, 0.25])
    1.0
    """
    y = _as_array(labels)
    return logloss(y, probs) / _entropy(float(y.mean())) if y.size else math.nan


def calibration(labels, probs) -> float:
    """Mean predicted probability over observed positive rate (1.0 = calibrated on average).

    >>> calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5])
    2.0
    """
    y = _as_array(labels)
    return float(_as_array(probs).mean() / y.mean()) if y.size and y.mean() > 0 else math.nan


def binary_metrics(labels, probs, groups=None) -> dict[str, float]:
    """auc, logloss, ne, calibration, count, and gauc when `groups` (e.g. user ids) is given."""
    out = {"auc": auc(labels, probs), "logloss": logloss(labels, probs),
           "ne": normalized_entropy(labels, probs), "calibration": calibration(labels, probs),
           "count": int(_as_array(labels).size)}
    if groups is not None:
        out["gauc"] = gauc(labels, probs, groups)
    return out


class StreamingBinaryMetrics:
    """Exact AUC / GAUC / logloss over chunks that arrive one at a time (progressive validation).

    Score each chunk before training on it, `update` with that chunk, read `result()` whenever you
    like. Exact AUC needs every score, so the chunks are kept (about 13 bytes per impression:
    float32 score, int8 label, int64 group); logloss sums are kept separately so `result` never
    re-reads them. `last()` gives the metrics of the most recent chunk alone.

    >>> acc = StreamingBinaryMetrics()
    >>> acc.update([0, 1], [0.2, 0.7], groups=[1, 1])
    >>> acc.update([1, 0], [0.6, 0.4], groups=[2, 2])
    >>> acc.result()["auc"], acc.result()["gauc"], acc.result()["count"]
    (1.0, 1.0, 4)
    """

    def __init__(self) -> None:
        self._labels: list[np.ndarray] = []
        self._probs: list[np.ndarray] = []
        self._groups: list[np.ndarray] = []
        self._loss_sum = 0.0
        self._label_sum = 0.0
        self._prob_sum = 0.0
        self._count = 0

    def update(self, labels, probs, groups=None) -> None:
        y, p = _as_array(labels), _as_array(probs)
        if y.shape != p.shape:
            raise ValueError(f"labels and probs differ in size: {y.size} vs {p.size}")
        if groups is not None:
            self._groups.append(_as_array(groups, np.int64))
        elif self._groups:
            raise ValueError("groups were given for earlier chunks but not for this one")
        self._labels.append(y.astype(np.int8))
        self._probs.append(p.astype(np.float32))
        self._loss_sum += logloss(y, p) * y.size if y.size else 0.0
        self._label_sum += float(y.sum())
        self._prob_sum += float(p.sum())
        self._count += y.size

    def last(self) -> dict[str, float]:
        """Metrics of the latest chunk only."""
        groups = self._groups[-1] if self._groups else None
        return binary_metrics(self._labels[-1], self._probs[-1], groups)

    def result(self) -> dict[str, float]:
        """auc, logloss, ne, calibration, count (and gauc with groups) over every chunk so far."""
        if not self._count:
            return {"auc": math.nan, "logloss": math.nan, "ne": math.nan, "calibration": math.nan, "count": 0}
        labels, probs = np.concatenate(self._labels), np.concatenate(self._probs)
        loss = self._loss_sum / self._count
        rate = self._label_sum / self._count
        out = {"auc": auc(labels, probs), "logloss": loss, "ne": loss / _entropy(rate),
               "calibration": self._prob_sum / self._label_sum if self._label_sum else math.nan,
               "count": self._count}
        if self._groups:
            out["gauc"] = gauc(labels, probs, np.concatenate(self._groups))
        return out


def target_ranks(scores: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """0-based rank of each target among all catalogue items, from scores [B, num_items + 1].

    Column 0 is padding and never competes. `exclude` ([B, L] item ids, 0 = none) removes more
    items per row (e.g. already-seen ones), except the row's own target; the public protocol
    (datasets README) excludes nothing but padding. Ties count against the target (rank = items
    scoring >= the target, minus itself), so a constant model gets the worst rank, not the best.

    >>> s = torch.tensor([[0.0, 0.9, 0.5, 0.5, 0.1]])
    >>> target_ranks(s, torch.tensor([2])).tolist(), target_ranks(s, torch.tensor([4])).tolist()
    ([2], [3])
    >>> target_ranks(s, torch.tensor([2]), exclude=torch.tensor([[1, 0]])).tolist()
    [1]
    """
    scores = scores.detach().float().clone()
    rows = torch.arange(scores.shape[0], device=scores.device)
    scores[:, 0] = float("-inf")
    if exclude is not None:
        drop = torch.zeros_like(scores, dtype=torch.bool)
        drop.scatter_(1, exclude.long(), True)
        drop[:, 0] = False  # already -inf; and id 0 is padding in `exclude`
        drop[rows, targets] = False
        scores = scores.masked_fill(drop, float("-inf"))
    target_score = scores[rows, targets]
    return (scores >= target_score[:, None]).sum(dim=1) - 1


def hit_rate(ranks, k: int) -> float:
    """HR@K (= Recall@K with one target): share of targets ranked in the top k."""
    r = _as_array(ranks, np.int64)
    return float((r < k).mean()) if r.size else math.nan


def ndcg(ranks, k: int) -> float:
    """NDCG@K with one relevant item: 1 / log2(rank + 2) inside the top k, else 0."""
    r = _as_array(ranks, np.int64)
    return float(np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0).mean()) if r.size else math.nan


def mrr(ranks) -> float:
    """Mean reciprocal rank over the full catalogue (no cut-off)."""
    r = _as_array(ranks, np.int64)
    return float((1.0 / (r + 1.0)).mean()) if r.size else math.nan


def retrieval_metrics(ranks, ks: Sequence[int] = (10, 50)) -> dict[str, float]:
    """{"hr@K", "ndcg@K" for each K, "mrr"} from 0-based target ranks."""
    out: dict[str, float] = {}
    for k in ks:
        out[f"hr@{k}"] = hit_rate(ranks, k)
        out[f"ndcg@{k}"] = ndcg(ranks, k)
    out["mrr"] = mrr(ranks)
    return out
