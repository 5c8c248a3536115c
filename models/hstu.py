"""HSTU: the Hierarchical Sequential Transduction Unit (Zhai et al., ICML 2024; MODELS.md §1).

One block, research form (the published code):

    x̃       = LayerNorm(X)                        no affine, eps 1e-6
    u,v,q,k = split(SiLU(x̃ W1))                   W1 without bias
    A       = SiLU(q kᵀ + rab(p, t)) / N ⊙ mask    pointwise, not softmax
    Y       = X + W2 · Dropout(u ⊙ LayerNorm(A v))

`variant="production"` is the later form: SiLU on u only, 1/sqrt(dqk) scaling and W2 over
[u, o, u ⊙ LN(o)]; its models add position and time at the input instead of the relative bias.

The encoder is a stack of blocks over already-embedded tokens; every sequence model in `models/`
(retrieval, HSTU ranking, GenRank) builds its tokens and calls it. Sequences are right-padded:
the first `lengths[b]` tokens of row b are real and, when `num_candidates` is given, its last
`num_candidates[b]` real tokens are candidates that see the history and themselves only.

>>> import torch
>>> cfg = HSTUConfig(d_model=16, num_blocks=2, num_heads=2, d_qk=8, d_v=8, max_len=12, dropout=0.0)
>>> enc = HSTUEncoder(cfg)
>>> ts = torch.arange(10).expand(2, 10) * 60
>>> y = enc(torch.randn(2, 10, 16), torch.tensor([10, 6]), timestamps=ts)
>>> tuple(y.shape), bool(y[1, 6:].abs().sum() == 0)
((2, 10, 16), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.kernels import hstu_attention

NUM_TIME_BUCKETS = 128  # buckets 0..128: 129 learned entries, as in the research code


@dataclass
class HSTUConfig:
    d_model: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    d_qk: int = 32  # per head
    d_v: int = 32  # per head
    # Most positions a sequence may have (history tokens + 1 shared candidate position). It sizes the
    # position tables and fixes inv_n = 1 / max_len (see models/kernels/reference.py for why constant).
    max_len: int = 256
    dropout: float = 0.2
    variant: str = "research"  # "research" | "production"
    # "rab" (learned relative position + log-time buckets), "alibi" (GenRank) or "none";
    # "auto" = rab for research, none for production (which adds position/time at the input).
    relative_bias: str = "auto"

    def __post_init__(self) -> None:
        if self.variant not in ("research", "production"):
            raise ValueError(f"variant must be 'research' or 'production', got {self.variant!r}")
        if self.relative_bias not in ("auto", "rab", "alibi", "none"):
            raise ValueError(f"unknown relative_bias {self.relative_bias!r}")

    @property
    def bias_kind(self) -> str:
        if self.relative_bias == "auto":
            return "rab" if self.variant == "research" else "none"
        return self.relative_bias


def log_time_bucket(dt: torch.Tensor, num_buckets: int = NUM_TIME_BUCKETS) -> torch.Tensor:
    """clamp(floor(ln(max(|dt|, 1)) / 0.301), 0, num_buckets) for integer seconds `dt`.

    >>> log_time_bucket(torch.tensor([0, 1, 2, 60, 86400]))
    tensor([ 0,  0,  2, 13, 37])
    """
    x = dt.abs().clamp(min=1).to(torch.float64)  # float64: bucket edges must not depend on magnitude
    return torch.floor(torch.log(x) / 0.301).long().clamp(0, num_buckets)


def next_event_times(ts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Query time of each token: the next token's time (when the prediction is made).

    The last real token uses its own time. Choice: not the request time, so a user's history states
    are a function of the history alone and M-FALCON can cache them across requests.

    >>> next_event_times(torch.tensor([[1, 5, 9, 0]]), torch.tensor([3]))
    tensor([[5, 9, 9, 0]])
    """
    shifted = torch.cat([ts[:, 1:], ts[:, -1:]], dim=1)
    idx = torch.arange(ts.shape[1], device=ts.device)[None, :]
    return torch.where(idx >= lengths[:, None] - 1, ts, shifted)


@dataclass
class Tokens:
    """A right-padded batch of embedded tokens plus what the attention bias needs."""

    x: torch.Tensor  # [B, N, d]
    lengths: torch.Tensor  # [B] real tokens per row
    position_ids: torch.Tensor  # [B, N] long
    timestamps: torch.Tensor  # [B, N] long seconds (the key time)
    query_times: torch.Tensor  # [B, N] long seconds (the time the token's prediction is made)


def append_candidates(hist: Tokens, cand: Tokens, num_candidates: torch.Tensor) -> tuple[Tokens, torch.Tensor]:
    """Place each row's real candidates right after its real history (the layout the mask expects).

    Returns the packed tokens and, for every candidate slot, its index in the packed sequence
    ([B, C]; padded candidates point at 0, their outputs are meaningless).
    """
    b, n = hist.x.shape[:2]
    c = cand.x.shape[1]
    dev = hist.x.device
    total = int((hist.lengths + num_candidates).max()) if b else 0
    p = torch.arange(total, device=dev)[None, :]
    hl = hist.lengths[:, None]
    # Source index into cat([history, candidates, one zero row]).
    src = torch.where(p < hl, p, torch.where(p < hl + num_candidates[:, None], n + p - hl, n + c))

    def pack(h: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        z = torch.cat([h, k, torch.zeros_like(k[:, :1])], dim=1)
        idx = src.view(b, total, *([1] * (z.dim() - 2))).expand(b, total, *z.shape[2:])
        return torch.gather(z, 1, idx)

    packed = Tokens(
        x=pack(hist.x, cand.x),
        lengths=hist.lengths + num_candidates,
        position_ids=pack(hist.position_ids, cand.position_ids),
        timestamps=pack(hist.timestamps, cand.timestamps),
        query_times=pack(hist.query_times, cand.query_times),
    )
    j = torch.arange(c, device=dev)[None, :]
    cand_index = torch.where(j < num_candidates[:, None], hl + j, torch.zeros_like(j))
    return packed, cand_index


class RelativeBias(nn.Module):
    """rab(p, t): learned bias by relative position (2N-1 entries) plus log-time bucket (129 entries).

    Shared by heads; one per block, as in the research code. It is looked up through one combined
    index into the small (2N-1) x 129 table of all sums: one gather of B·N² per layer instead of two
    (the gathers and their scatter-add backward are most of rab's cost).

    >>> rab = RelativeBias(max_len=4)
    >>> rel, bucket = torch.tensor([[[-1, 0]]]), torch.tensor([[[3, 0]]])
    >>> bool(rab(rab.index(rel, bucket))[0, 0, 0, 0] == rab.pos_w[2] + rab.time_w[3])
    True
    """

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.pos_w = nn.Parameter(torch.randn(2 * max_len - 1) * 0.02)
        self.time_w = nn.Parameter(torch.randn(NUM_TIME_BUCKETS + 1) * 0.02)

    def index(self, rel_pos: torch.Tensor, time_bucket: torch.Tensor) -> torch.Tensor:
        """rel_pos = key position - query position; same-shaped combined index into the sum table."""
        pos = (rel_pos + self.max_len - 1).clamp(0, 2 * self.max_len - 2)
        return pos * (NUM_TIME_BUCKETS + 1) + time_bucket

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        """Combined index [B, X, Y] -> bias [B, 1, X, Y]."""
        table = (self.pos_w[:, None] + self.time_w[None, :]).flatten()
        # gather, whose backward is a scatter-add: B·N² gradients land in a small table, and plain
        # indexing's backward serialises such repeats on CUDA (235 ms vs 1 ms per layer on an H100 at
        # B=128, N=528; F.embedding 7 ms); on the CPU gather is also the fastest of the three.
        return torch.gather(table, 0, index.flatten()).view(index.shape).unsqueeze(1)


class HSTUBlock(nn.Module):
    """One HSTU layer; `project` and `output` are exposed so M-FALCON can run the candidate half.

    >>> block = HSTUBlock(HSTUConfig(d_model=8, num_heads=2, d_qk=4, d_v=4, max_len=6))
    >>> block(torch.randn(1, 6, 8), lengths=torch.tensor([6]), inv_n=1 / 6).shape
    torch.Size([1, 6, 8])
    """

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.d, self.h, self.dqk, self.dv = cfg.d_model, cfg.num_heads, cfg.d_qk, cfg.d_v
        self.production = cfg.variant == "production"
        self.w1 = nn.Linear(self.d, 2 * self.h * (self.dv + self.dqk), bias=False)
        self.w2 = nn.Linear((3 if self.production else 1) * self.h * self.dv, self.d)
        self.dropout = nn.Dropout(cfg.dropout)
        self.attn_scale = 1.0 / math.sqrt(self.dqk) if self.production else 1.0
        nn.init.xavier_uniform_(self.w1.weight)
        nn.init.xavier_uniform_(self.w2.weight)
        nn.init.zeros_(self.w2.bias)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """x [B, N, d] -> u [B, N, H*dv], q, k [B, N, H, dqk], v [B, N, H, dv]."""
        b, n, _ = x.shape
        z = self.w1(F.layer_norm(x, (self.d,), eps=1e-6))
        hv, hk = self.h * self.dv, self.h * self.dqk
        if self.production:
            u, v, q, k = z.split([hv, hv, hk, hk], dim=-1)
            u = F.silu(u)
        else:
            u, v, q, k = F.silu(z).split([hv, hv, hk, hk], dim=-1)
        return (u, q.reshape(b, n, self.h, self.dqk), k.reshape(b, n, self.h, self.dqk),
                v.reshape(b, n, self.h, self.dv))

    def output(self, x: torch.Tensor, u: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual update from the gate u and the attention output o [B, N, H*dv]."""
        z = u * F.layer_norm(o, (o.shape[-1],), eps=1e-6)
        if self.production:
            z = torch.cat([u, o, z], dim=-1)
        return x + self.w2(self.dropout(z))

    def forward(self, x: torch.Tensor, kv_out: list | None = None, **attn) -> torch.Tensor:
        """`attn` are hstu_attention's keyword arguments; `kv_out` collects (k, v) for a KV cache."""
        u, q, k, v = self.project(x)
        if kv_out is not None:
            kv_out.append((k, v))
        o = hstu_attention(q, k, v, attn_scale=self.attn_scale, **attn)
        return self.output(x, u, o.flatten(2))


class HSTUEncoder(nn.Module):
    """A stack of HSTU blocks with the configured relative bias (rab, ALiBi or none).

    >>> enc = HSTUEncoder(HSTUConfig(d_model=8, num_heads=2, d_qk=4, d_v=4, max_len=6, relative_bias="alibi"))
    >>> enc(torch.randn(2, 5, 8), torch.tensor([5, 2]), num_candidates=torch.tensor([2, 1])).shape
    torch.Size([2, 5, 8])
    """

    def __init__(self, cfg: HSTUConfig):
        super().__init__()
        self.cfg = cfg
        self.blocks = nn.ModuleList(HSTUBlock(cfg) for _ in range(cfg.num_blocks))
        self.inv_n = 1.0 / cfg.max_len
        self.rab = (nn.ModuleList(RelativeBias(cfg.max_len) for _ in range(cfg.num_blocks))
                    if cfg.bias_kind == "rab" else None)
        if cfg.bias_kind == "alibi":
            h = torch.arange(1, cfg.num_heads + 1, dtype=torch.float32)
            self.register_buffer("alibi_slopes", 2.0 ** (-8.0 * h / cfg.num_heads), persistent=False)
        else:
            self.alibi_slopes = None

    def layer_bias(self, layer: int, rel_pos: torch.Tensor, dt: torch.Tensor) -> torch.Tensor | None:
        """Bias of block `layer` for (query, key) pairs given key_pos - query_pos and query_time - key_time,
        both [B, X, Y]; returns [B, 1 or H, X, Y] (None without a bias). Used by M-FALCON."""
        if self.rab is not None:
            return self.rab[layer](self.rab[layer].index(rel_pos, log_time_bucket(dt)))
        if self.alibi_slopes is not None:
            return -self.alibi_slopes[None, :, None, None] * rel_pos.abs()[:, None].float()
        return None

    def forward(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        *,
        num_candidates: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        timestamps: torch.Tensor | None = None,
        query_times: torch.Tensor | None = None,
        kv_out: list | None = None,
    ) -> torch.Tensor:
        b, n, _ = x.shape
        if position_ids is None:
            position_ids = torch.arange(n, device=x.device).expand(b, n)
        attn = dict(lengths=lengths, num_candidates=num_candidates, inv_n=self.inv_n)
        if self.rab is not None:
            if timestamps is None:
                raise ValueError("the relative attention bias needs timestamps")
            if query_times is None:
                query_times = next_event_times(timestamps, lengths)
            rel = position_ids[:, None, :] - position_ids[:, :, None]
            bucket = log_time_bucket(query_times[:, :, None] - timestamps[:, None, :])
            index = self.rab[0].index(rel, bucket)  # same for every layer
        elif self.alibi_slopes is not None:
            attn.update(alibi_slopes=self.alibi_slopes, position_ids=position_ids)
        for i, block in enumerate(self.blocks):
            bias = self.rab[i](index) if self.rab is not None else None
            x = block(x, kv_out=kv_out, bias=bias, **attn)
        valid = torch.arange(n, device=x.device)[None, :] < lengths[:, None]
        return x * valid[..., None].to(x.dtype)
