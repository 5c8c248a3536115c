"""Stochastic Length (Zhai et al., ICML 2024; MODELS.md §1): training-time sequence sparsity.

With max length N and alpha in (1, 2], a sequence of n > N^(alpha/2) events is cut to its most
recent N^(alpha/2) events with probability 1 - N^alpha / n² (else kept whole). Its expected
attention cost is then N^alpha + (1 - N^alpha / n²)·N^alpha <= 2·N^alpha instead of n² <= N².

>>> import torch
>>> ids = torch.arange(1, 9).expand(3, 8).clone()
>>> ids2, lengths = stochastic_length(ids, torch.tensor([8, 8, 2]), alpha=1.2,
...                                   generator=torch.Generator().manual_seed(0))[:2]
>>> lengths.tolist()   # N = 8: a cut row keeps its floor(8^0.6) = 3 most recent events
[8, 3, 2]
>>> ids2[1].tolist()
[6, 7, 8, 0, 0, 0, 0, 0]
"""

from __future__ import annotations

import math

import torch


def kept_length(max_len: int, alpha: float) -> int:
    """N^(alpha/2), rounded down (the epsilon stops 256^0.75 = 63.99999 becoming 63)."""
    return max(1, math.floor(max_len ** (alpha / 2) + 1e-6))


def stochastic_length(
    ids: torch.Tensor,
    lengths: torch.Tensor,
    alpha: float,
    *aligned: torch.Tensor,
    max_len: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, ...]:
    """Cut right-padded sequences ([B, L, ...]) as above; returns (ids, lengths, *aligned).

    `aligned` are tensors laid out like `ids` (timestamps, actions, ...) and are cut the same way.
    Kept events are moved to the front, padding is 0, and the width shrinks to the longest kept row
    (that is where the saving comes from with padded batches). `max_len` (N) defaults to ids' width.
    """
    if not 1.0 < alpha <= 2.0:
        raise ValueError(f"alpha must be in (1, 2], got {alpha}")
    b, width = ids.shape[:2]
    n_max = max_len or width
    keep = kept_length(n_max, alpha)
    n = lengths.to(torch.float64).clamp(min=1)
    p_cut = (1.0 - n_max**alpha / n**2).clamp(min=0.0)
    u = torch.rand(b, generator=generator, dtype=torch.float64).to(lengths.device)
    cut = (lengths > keep) & (u < p_cut)
    new_lengths = torch.where(cut, torch.full_like(lengths, keep), lengths)
    start = lengths - new_lengths  # drop the oldest events of cut rows

    new_width = int(new_lengths.max()) if b else 0
    j = torch.arange(new_width, device=ids.device)[None, :]
    src = (start[:, None] + j).clamp(max=max(width - 1, 0))
    valid = j < new_lengths[:, None]

    def crop(t: torch.Tensor) -> torch.Tensor:
        idx = src.view(b, new_width, *([1] * (t.dim() - 2))).expand(b, new_width, *t.shape[2:])
        v = valid.view(b, new_width, *([1] * (t.dim() - 2)))
        return torch.gather(t, 1, idx) * v.to(t.dtype)

    return (crop(ids), new_lengths, *(crop(t) for t in aligned))
