"""Zenith building blocks: token-wise linear maps, Token Fusion and Token Boost layers.

Tensors are [N, T, D]: N (request, candidate) rows, T tokens of width D. "Token-wise" means token t has
its own weights, applied to all rows at once with one batched einsum ('ntd,tde->nte'), so the T
per-token maps cost one kernel, not T. The shared-weight switches exist for the token-similarity
comparison the paper makes (MODELS.md §4). See models/zenith.py for the names of the choices.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class TokenwiseLinear(nn.Module):
    """y[:, t] = x[:, t] @ W[t]: one [d_in, d_out] matrix per token (or one for all if `shared`).

    >>> lin = TokenwiseLinear(num_tokens=3, d_in=4, d_out=5)
    >>> lin(torch.randn(2, 3, 4)).shape
    torch.Size([2, 3, 5])
    """

    def __init__(self, num_tokens: int, d_in: int, d_out: int, shared: bool = False, scale: float = 1.0):
        super().__init__()
        self.shared = shared
        # Same variance as a fan-in-scaled nn.Linear; `scale` lets residual branches start small.
        w = torch.randn(1 if shared else num_tokens, d_in, d_out) * (scale / d_in**0.5)
        self.weight = nn.Parameter(w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared:
            return x @ self.weight[0]
        return torch.einsum("ntd,tde->nte", x, self.weight)


class RetokenisedFusion(nn.Module):
    """Zenith Token Fusion: O = (X Xᵀ / D)(X W_R), reshaped to T' tokens, then Norm(reshape(O) + MLP(X)).

    X: [N, T, D], W_R: [D, k] with k = T'·D / T, so T·k = T'·d with d = D (the width never changes).
    Choices: (1) X Xᵀ is divided by D: inputs are layer-normalised (|x_t|² ≈ D), so X Xᵀ / D is the
    tokens' correlation matrix, bounded, with no softmax (the description has none). (2) MLP(X) is a
    shared per-token GELU MLP; when T' != T a learned linear map over the token axis (T -> T') follows,
    so the residual branch has the output's shape. With T' = T (the default, k = D) that map is absent.

    >>> fusion = RetokenisedFusion(num_tokens=4, out_tokens=2, dim=8, hidden=16)
    >>> fusion(torch.randn(3, 4, 8)).shape
    torch.Size([3, 2, 8])
    """

    def __init__(self, num_tokens: int, out_tokens: int, dim: int, hidden: int):
        super().__init__()
        if (out_tokens * dim) % num_tokens:
            raise ValueError(f"T'·D = {out_tokens}·{dim} must be divisible by T = {num_tokens}")
        self.out_tokens, self.dim = out_tokens, dim
        self.w_r = nn.Linear(dim, out_tokens * dim // num_tokens, bias=False)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.token_map = nn.Linear(num_tokens, out_tokens) if out_tokens != num_tokens else None
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        mix = x @ x.transpose(1, 2) / self.dim  # [N, T, T]
        o = (mix @ self.w_r(x)).reshape(n, self.out_tokens, self.dim)
        res = self.mlp(x)
        if self.token_map is not None:
            res = self.token_map(res.transpose(1, 2)).transpose(1, 2)
        return self.norm(o + res)


class TokenwiseAttention(nn.Module):
    """Zenith++ Token Fusion: multi-head self-attention over the T tokens with separate Q/K/V/O weights
    per token (and so per head), output Norm(X + Attn(X)). `shared=True` is ordinary MHSA (one set of
    weights for all tokens), the baseline of the token-similarity comparison.

    >>> attn = TokenwiseAttention(num_tokens=4, dim=8, num_heads=2)
    >>> attn(torch.randn(3, 4, 8)).shape
    torch.Size([3, 4, 8])
    """

    def __init__(self, num_tokens: int, dim: int, num_heads: int, shared: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = TokenwiseLinear(num_tokens, dim, 3 * dim, shared=shared)
        self.out = TokenwiseLinear(num_tokens, dim, dim, shared=shared)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # [N, H, T, dh]; all tokens see all tokens
        return self.norm(x + self.out(a.transpose(1, 2).reshape(n, t, d)))


class TokenwiseSwiGLU(nn.Module):
    """Zenith Token Boost: per-token SwiGLU, W_down[t] (silu(x W_gate[t]) * (x W_up[t])), output
    Norm(X + SwiGLU(X)). `shared=True` is an ordinary (shared-weight) SwiGLU feed-forward.

    >>> boost = TokenwiseSwiGLU(num_tokens=4, dim=8, hidden=16)
    >>> boost(torch.randn(3, 4, 8)).shape
    torch.Size([3, 4, 8])
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, shared: bool = False):
        super().__init__()
        self.gate = TokenwiseLinear(num_tokens, dim, hidden, shared=shared)
        self.up = TokenwiseLinear(num_tokens, dim, hidden, shared=shared)
        self.down = TokenwiseLinear(num_tokens, hidden, dim, shared=shared)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(F.silu(self.gate(x)) * self.up(x)))


class TokenwiseMoE(nn.Module):
    """Zenith++ Token Boost: per-token sparse mixture of SwiGLU experts, output Norm(X + MoE(X)).

    Token t has its own router [D, E] and its own E experts; each (row, token) goes to its top-k experts
    by router probability, weighted by those probabilities renormalised over the k (choice, as in
    Mixtral). Only the selected experts run (see `forward` for the dispatch). After each forward,
    `aux_loss` holds the Switch-Transformer load-balancing loss E · Σ_e f_e · P_e per token position,
    averaged over tokens (f_e: share of the k·N assignments that went to expert e; P_e: mean router
    probability of e). Its bounds: 0 < aux <= E/k; it is exactly 1 for a uniform router and E/k when all
    rows collapse onto the same k experts. (It is *not* bounded below by 1, contrary to folklore: f and P
    can anti-correlate; for k = 1 the bound is 1/E.) Training should add `weight * aux_loss`.

    >>> moe = TokenwiseMoE(num_tokens=4, dim=8, hidden=16, num_experts=4, top_k=2)
    >>> moe(torch.randn(3, 4, 8)).shape
    torch.Size([3, 4, 8])
    >>> float(moe.aux_loss.detach()) >= 0
    True
    """

    def __init__(self, num_tokens: int, dim: int, hidden: int, num_experts: int, top_k: int):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in 1..{num_experts}, got {top_k}")
        self.num_experts, self.top_k = num_experts, top_k
        t, e = num_tokens, num_experts
        self.router = TokenwiseLinear(t, dim, e)
        self.w_gate = nn.Parameter(torch.randn(t, e, dim, hidden) / dim**0.5)
        self.w_up = nn.Parameter(torch.randn(t, e, dim, hidden) / dim**0.5)
        self.w_down = nn.Parameter(torch.randn(t, e, hidden, dim) / hidden**0.5)
        self.norm = nn.LayerNorm(dim)
        self.aux_loss = torch.zeros(())
        self.last_topk: torch.Tensor | None = None  # [N, T, k] expert indices of the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities [N, T, E], top-k weights [N, T, k] (sum to 1) and indices [N, T, k]."""
        probs = torch.softmax(self.router(x).float(), dim=-1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        return probs, (top_p / top_p.sum(-1, keepdim=True)).to(x.dtype), top_i

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        probs, top_w, top_i = self.route(x)
        self.last_topk = top_i
        self.aux_loss = self.balance_loss(probs, top_i)

        # Dispatch: sort the N·T·k assignments by (token, expert) group and pack each group into a
        # padded slot of a [T·E, capacity, D] buffer, with capacity = the largest group, so no assignment
        # is ever dropped. Then all groups run as three batched matmuls (one per SwiGLU weight) and the
        # results are scattered back weighted by their gates: only the selected experts compute (plus
        # the padding), unlike a dense mixture.
        num_groups = t * self.num_experts
        flat_x = x.reshape(n * t, d)
        rows = torch.arange(n * t, device=x.device).repeat_interleave(self.top_k)  # which (n, t)
        group = (rows % t) * self.num_experts + top_i.reshape(-1)
        group, order = group.sort(stable=True)
        rows, weight = rows[order], top_w.reshape(-1)[order]
        counts = torch.bincount(group, minlength=num_groups)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(group.numel(), device=x.device) - starts[group]
        capacity = int(counts.max()) if group.numel() else 0
        buf = flat_x.new_zeros(num_groups, capacity, d)
        buf[group, slot] = flat_x[rows]
        w_gate = self.w_gate.reshape(num_groups, d, -1)
        w_up = self.w_up.reshape(num_groups, d, -1)
        w_down = self.w_down.reshape(num_groups, -1, d)
        y = torch.bmm(F.silu(torch.bmm(buf, w_gate)) * torch.bmm(buf, w_up), w_down)
        out = torch.zeros_like(flat_x).index_add(0, rows, y[group, slot] * weight[:, None])
        return self.norm(x + out.reshape(n, t, d))

    def balance_loss(self, probs: torch.Tensor, top_i: torch.Tensor) -> torch.Tensor:
        """Switch load-balancing loss from router probabilities [N, T, E] and choices [N, T, k]."""
        e = self.num_experts
        if probs.shape[0] == 0:
            return probs.new_zeros(())
        chosen = F.one_hot(top_i, e).sum(-2).float()  # [N, T, E], 1 where e is among the k
        f = chosen.mean(0) / self.top_k  # [T, E], no gradient (counts), sums to 1 per token
        p = probs.mean(0)  # [T, E], differentiable
        return e * (f * p).sum(-1).mean()
