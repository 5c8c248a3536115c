"""What the two sequence rankers (HSTU ranking, GenRank) share: config, heads, loss, skeleton.

A `SequenceRanker` turns `RankingInputs` into history tokens and candidate tokens, runs the
encoder over [history, candidates] with the candidate mask, and reads each candidate's final
state with per-task heads. Subclasses only say how tokens are built; M-FALCON
(models/mfalcon.py) reuses the same pieces to score candidates against a prefilled history.

>>> import torch
>>> from models.inputs import random_ranking_inputs
>>> heads = TaskHeads(d_model=8, num_tasks=3, hidden=16)
>>> heads(torch.randn(2, 5, 8), torch.randn(2, 5, 8)).shape
torch.Size([2, 5, 3])
>>> inp = random_ranking_inputs(batch_size=2, num_candidates=5)
>>> multitask_bce(torch.zeros(2, 5, 3), torch.ones(2, 5, 3), inp.candidate_mask()).item()  # 3 * ln 2
2.0794...
>>> [round(v, 3) for v in prior_logits(torch.tensor([0.5, 0.01]), num_tasks=2).tolist()]
[0.0, -4.595]
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.features import HOURS_PER_DAY, fold_ids, history_affinity, hour_of_day, request_recency
from models.hstu import HSTUConfig, HSTUEncoder, Tokens, append_candidates
from models.inputs import RankingInputs


@dataclass
class RankerConfig:
    num_items: int
    num_actions: int  # action ids 1..num_actions, 0 = padding
    num_tasks: int
    num_authors: int = 0  # 0: no author embedding
    cand_dense_dim: int = 0  # 0: ignore RankingInputs.cand_dense
    max_hist_len: int = 256  # history events (not tokens)
    d_model: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    d_qk: int = 32
    d_v: int = 32
    dropout: float = 0.2
    variant: str = "research"  # HSTU block form, see models/hstu.py
    head_hidden: int = 64
    head_item_product: bool = True  # heads also see state ⊙ candidate item embedding
    # What DLRM and Zenith see beyond the history and the candidate's stats, added to every candidate token
    # (`SequenceRanker._request_side`): the user id (num_users > 0), the user's windowed stats (user_dense_dim > 0),
    # and with request_context the hour of day, log1p(history length), log1p(seconds since the last event)
    # and the candidate's share of the history on its item / author. Defaults: history + candidate stats only.
    num_users: int = 0
    user_dense_dim: int = 0
    request_context: bool = False
    # The heads also read the candidate's dense features (its stats and the side features above), layer-normalised,
    # beside the state: the candidate token sums every feature into d dimensions, while DLRM's cross network gets
    # them side by side (MTGR keeps such a cross-feature path next to its HSTU backbone).
    head_dense: bool = False

    def encoder_config(self, max_len: int, relative_bias: str = "auto") -> HSTUConfig:
        return HSTUConfig(d_model=self.d_model, num_blocks=self.num_blocks, num_heads=self.num_heads,
                          d_qk=self.d_qk, d_v=self.d_v, max_len=max_len, dropout=self.dropout,
                          variant=self.variant, relative_bias=relative_bias)


def prior_logits(rates: torch.Tensor, num_tasks: int) -> torch.Tensor:
    """log(p / (1 - p)) of each task's base rate p: the output bias that makes an untrained ranker predict the
    base rates. Every ranker's `init_task_bias(rates)` starts its last layer's bias there, because a head that
    starts at 0 predicts 0.5 for a task seen once in a thousand candidates and needs hundreds of steps to
    unlearn it, and one-pass training scores every one of those steps."""
    rates = torch.as_tensor(rates, dtype=torch.float32).reshape(-1)
    if rates.numel() != num_tasks or not bool(((rates > 0) & (rates < 1)).all()):
        raise ValueError(f"task base rates must be {num_tasks} values in (0, 1), got {rates.tolist()}")
    return torch.logit(rates)


class TaskHeads(nn.Module):
    """One small MLP per task on the candidate state (choice: MODELS.md §3 heads).

    With an item embedding the input is [LN(s), LN(s) ⊙ e]: a cheap explicit user-item interaction.
    """

    def __init__(self, d_model: int, num_tasks: int, hidden: int = 64, item_product: bool = True, dense_dim: int = 0):
        super().__init__()
        self.item_product = item_product
        d_in = (2 * d_model if item_product else d_model) + dense_dim
        self.norm = nn.LayerNorm(d_model)
        self.dense_norm = nn.LayerNorm(dense_dim) if dense_dim else None
        self.mlps = nn.ModuleList(
            nn.Sequential(nn.Linear(d_in, hidden), nn.SiLU(), nn.Linear(hidden, 1)) for _ in range(num_tasks)
        )

    def forward(self, state: torch.Tensor, item_emb: torch.Tensor | None = None,
                dense: torch.Tensor | None = None) -> torch.Tensor:
        """state, item_emb [B, C, d] (and dense [B, C, dense_dim] when built with one) -> logits [B, C, T]."""
        s = self.norm(state)
        if self.item_product:
            s = torch.cat([s, s * item_emb], dim=-1)
        if self.dense_norm is not None:
            s = torch.cat([s, self.dense_norm(dense.to(s.dtype))], dim=-1)
        return torch.cat([mlp(s) for mlp in self.mlps], dim=-1)

    @torch.no_grad()
    def init_task_bias(self, rates: torch.Tensor) -> None:
        """Start each task's output at its base rate's log-odds (`prior_logits`)."""
        for mlp, b in zip(self.mlps, prior_logits(rates, len(self.mlps)), strict=True):
            mlp[-1].bias.fill_(b)


def multitask_bce(
    logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, task_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """Sum over tasks (weighted) of the mean BCE over real candidates ([B, C, T], [B, C, T], [B, C])."""
    per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    m = mask.to(logits.dtype)[..., None]
    per_task = (per * m).sum(dim=(0, 1)) / m.sum().clamp(min=1)
    if task_weights is not None:
        per_task = per_task * task_weights.to(per_task)
    return per_task.sum()


class ItemEmbedding(nn.Module):
    """Item (+ author) embedding, scaled by sqrt(d) as HSTU's input (tables init std 0.02)."""

    def __init__(self, num_items: int, num_authors: int, d_model: int):
        super().__init__()
        self.scale = math.sqrt(d_model)
        self.item = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        self.author = nn.Embedding(num_authors + 1, d_model, padding_idx=0) if num_authors else None
        for t in (self.item, self.author):
            if t is not None:
                nn.init.normal_(t.weight, std=0.02)
                t.weight.data[0] = 0

    def forward(self, item_ids: torch.Tensor, author_ids: torch.Tensor) -> torch.Tensor:
        e = self.item(item_ids)
        if self.author is not None:
            e = e + self.author(author_ids)
        return e * self.scale


class SequenceRanker(nn.Module):
    """Skeleton shared by HSTURanking and GenRank (models/genrank.py, with examples).

    It owns the item embedding, the heads and the candidate dense projection; subclasses set
    `encoder` and implement `history_tokens` / `candidate_tokens`.
    """

    encoder: HSTUEncoder

    def __init__(self, cfg: RankerConfig):
        super().__init__()
        self.cfg = cfg
        self.items = ItemEmbedding(cfg.num_items, cfg.num_authors, cfg.d_model)
        self.side_dim = cfg.user_dense_dim + (4 if cfg.request_context else 0)
        self.heads = TaskHeads(cfg.d_model, cfg.num_tasks, cfg.head_hidden, cfg.head_item_product,
                               dense_dim=cfg.cand_dense_dim + self.side_dim if cfg.head_dense else 0)
        # choice: windowed candidate stats enter through a linear map on the candidate token (§3 says
        # they still add AUC); both rankers do it so their comparison stays fair.
        self.dense = nn.Linear(cfg.cand_dense_dim, cfg.d_model) if cfg.cand_dense_dim else None
        # choice: the request's side features join the candidate tokens (GenRank adds side information to its
        # tokens), not a leading context token: the history's keys and values (M-FALCON's prefill, serving's
        # per-user cache) then stay independent of request-time features, and one request's candidates still
        # share one history pass. Tables init like the item table, scaled by sqrt(d) like it.
        self.user = (nn.Embedding(cfg.num_users + 1, cfg.d_model, padding_idx=0) if cfg.num_users else None)
        self.hour = nn.Embedding(HOURS_PER_DAY, cfg.d_model) if cfg.request_context else None
        self.side_dense = nn.Linear(self.side_dim, cfg.d_model) if self.side_dim else None
        for table in (self.user, self.hour):
            if table is not None:
                nn.init.normal_(table.weight, std=0.02)
                if table.padding_idx is not None:
                    table.weight.data[table.padding_idx] = 0
        self.drop = nn.Dropout(cfg.dropout)
        self.pos_std = 1.0 / math.sqrt(cfg.d_model)

    def history_tokens(self, inputs: RankingInputs) -> Tokens:
        raise NotImplementedError

    def candidate_tokens(self, inputs: RankingInputs, hist: Tokens) -> Tokens:
        """Tokens for all C candidate slots; each depends only on its own candidate and the history."""
        raise NotImplementedError

    def init_task_bias(self, rates: torch.Tensor) -> None:
        self.heads.init_task_bias(rates)

    def _finish(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        return self.drop(x) * valid[..., None].to(x.dtype)

    def _dense(self, inputs: RankingInputs) -> torch.Tensor | float:
        """What a candidate token adds to its item embedding: its stats, then the request's side features."""
        out = self.dense(inputs.cand_dense) if self.dense is not None else 0.0
        return out + self._request_side(inputs)

    def _request_side(self, inputs: RankingInputs) -> torch.Tensor | float:
        """[B, C, d] side features of each candidate (RankerConfig), or 0.0 when the config asks for none."""
        cfg = self.cfg
        out: torch.Tensor | float = 0.0
        if self.user is not None:
            out = out + self.user(fold_ids(inputs.user_ids, cfg.num_users))[:, None, :] * self.items.scale
        if self.hour is not None:
            out = out + self.hour(hour_of_day(inputs.request_ts))[:, None, :] * self.items.scale
        if self.side_dense is None:
            return out
        return out + self.side_dense(self._side_values(inputs).to(self.side_dense.weight.dtype))

    def _side_values(self, inputs: RankingInputs) -> torch.Tensor:
        """[B, C, side_dim]: the user's stats, log1p(history length), log1p(gap), the history affinity."""
        cfg, c = self.cfg, inputs.cand_item_ids.shape[1]
        parts = []
        if cfg.user_dense_dim:
            parts.append(inputs.user_dense.float()[:, None, :].expand(-1, c, -1))
        if cfg.request_context:
            parts.append(request_recency(inputs)[:, None, :].expand(-1, c, -1))
            hmask = inputs.history_mask()[:, None, :]
            parts.append(history_affinity(inputs.hist_item_ids[:, None, :], inputs.hist_author_ids[:, None, :],
                                          hmask, inputs.cand_item_ids, inputs.cand_author_ids))
        return torch.cat(parts, -1)

    def head_dense(self, inputs: RankingInputs) -> torch.Tensor | None:
        """[B, C, F] what the heads read beside the state (RankerConfig.head_dense), or None."""
        if not self.cfg.head_dense:
            return None
        parts = [inputs.cand_dense.float()] if self.cfg.cand_dense_dim else []
        if self.side_dim:
            parts.append(self._side_values(inputs))
        return torch.cat(parts, -1)

    def head(self, state: torch.Tensor, cand_item_ids: torch.Tensor, cand_author_ids: torch.Tensor,
             dense: torch.Tensor | None = None) -> torch.Tensor:
        """Candidate states [B, C, d] (and `head_dense` for those candidates) -> logits [B, C, T]."""
        return self.heads(state, self.items(cand_item_ids, cand_author_ids), dense)

    def forward(self, inputs: RankingInputs) -> torch.Tensor:
        hist = self.history_tokens(inputs)
        cand = self.candidate_tokens(inputs, hist)
        seq, cand_index = append_candidates(hist, cand, inputs.num_candidates)
        out = self.encoder(seq.x, seq.lengths, num_candidates=inputs.num_candidates,
                           position_ids=seq.position_ids, timestamps=seq.timestamps,
                           query_times=seq.query_times)
        state = torch.gather(out, 1, cand_index[..., None].expand(-1, -1, out.shape[-1]))
        return self.head(state, inputs.cand_item_ids, inputs.cand_author_ids, self.head_dense(inputs))

    def loss(self, inputs: RankingInputs, labels: torch.Tensor, task_weights: torch.Tensor | None = None):
        """Multi-task BCE on real candidates only (loss on history positions costs AUC, §1)."""
        return multitask_bce(self(inputs), labels, inputs.candidate_mask(), task_weights)
