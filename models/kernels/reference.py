"""Plain PyTorch reference for HSTU / GenRank pointwise attention.

This is the ground truth every fast kernel is tested against (forward and backward), and the
path used wherever no kernel applies (CPU, exotic shapes).

Semantics (MODELS.md §1-3):
    S   = attn_scale * q kᵀ + bias (+ ALiBi)
    A   = SiLU(S) * inv_n * mask           # pointwise, not softmax; the mask multiplies after SiLU
    out = A v                              # rows outside the valid prefix are zero

Mask: a sequence of `length` valid tokens whose last `num_candidates` are candidates.
History row i sees history columns j <= i (causal). A candidate row sees every history column
and itself, never another candidate (the M-FALCON / GenRank target-aware mask).

`inv_n` is a constant (1 / the model's max sequence length), not the batch's padded length: with
the padded length a candidate's score would change with how many other candidates share its
batch, which breaks M-FALCON's "same score alone or together" (choice, see MODELS.md §2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_mask(
    lengths: torch.Tensor, num_candidates: torch.Tensor | None, n: int
) -> torch.Tensor:
    """[B, N, N] bool: may query i attend to key j."""
    device = lengths.device
    i = torch.arange(n, device=device)[:, None]
    j = torch.arange(n, device=device)[None, :]
    length = lengths[:, None, None]
    n_hist = length if num_candidates is None else length - num_candidates[:, None, None]
    valid = (i < length) & (j < length)
    history_row = (i < n_hist) & (j <= i)
    candidate_row = (i >= n_hist) & ((j < n_hist) | (j == i))
    return valid & (history_row | candidate_row)


def alibi_bias(
    slopes: torch.Tensor, position_ids: torch.Tensor
) -> torch.Tensor:
    """[B, H, N, N] ALiBi bias: -slope_h * |pos_i - pos_j| (positions may repeat for candidates)."""
    dist = (position_ids[:, :, None] - position_ids[:, None, :]).abs().to(slopes.dtype)
    return -slopes[None, :, None, None] * dist[:, None, :, :]


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor,
    num_candidates: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attn_scale: float = 1.0,
    inv_n: float = 1.0,
) -> torch.Tensor:
    """Pointwise SiLU attention.

    Shapes: q, k [B, N, H, Dqk]; v [B, N, H, Dv]; lengths, num_candidates [B];
    bias broadcastable to [B, H, N, N]; alibi_slopes [H]; position_ids [B, N] (default 0..N-1).
    Returns [B, N, H, Dv] in q's dtype (computed in float32).

    >>> import torch
    >>> q = k = v = torch.randn(2, 5, 1, 4)
    >>> out = hstu_attention_reference(q, k, v, lengths=torch.tensor([5, 3]), inv_n=1 / 5)
    >>> tuple(out.shape), bool(out[1, 3:].abs().sum() == 0)
    ((2, 5, 1, 4), True)
    """
    b, n = q.shape[:2]
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, N, D]
    scores = attn_scale * torch.matmul(qf, kf.transpose(-1, -2))
    if bias is not None:
        scores = scores + bias.float()
    if alibi_slopes is not None:
        if position_ids is None:
            position_ids = torch.arange(n, device=q.device).expand(b, n)
        scores = scores + alibi_bias(alibi_slopes.float(), position_ids)
    mask = attention_mask(lengths, num_candidates, n)[:, None, :, :]
    weights = F.silu(scores) * inv_n * mask
    out = torch.matmul(weights, vf).transpose(1, 2)
    return out.to(q.dtype)
