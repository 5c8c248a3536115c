"""The shared feature front end of the non-sequence rankers (DLRM, Zenith).

Both models score each (request, candidate) pair independently from the same declared features, so
their comparison measures the interaction architecture and nothing else. `RankingInputSpec` declares the
vocabularies and widths; `FeatureEmbedder` turns a `RankingInputs` into named feature groups, one row
per *real* candidate (padded candidates are dropped here, so they can never influence anything).

Feature groups (name -> width), in the order `RankingInputSpec.group_dims()` lists them:
- ID features, each one embedding of width E (Zenith gives each its own token, never split):
  `user`, `item` (the candidate), `author` (the candidate's author);
- `history`:    masked mean of the user's history item, author and action embeddings (3E);
- `item_stats`: the candidate's windowed stats `cand_dense` (F_item);
- `user_stats`: the user's windowed stats `user_dense` plus log1p(history length) (F_user + 1);
- `context`:    hour-of-day embedding of request_ts plus log1p(seconds since the last event) (E + 1);
- `affinity`:   fraction of the history on the candidate item / on the candidate author (2).

Choices (not from a paper): out-of-vocabulary ids are folded into the vocabulary by modulo hashing
(`fold_ids`); hour-of-day is taken as (request_ts // 3600) % 24, which only has a fixed phase when the
epoch is fixed (inputs.py allows any epoch; one data set uses one epoch, so the model still learns it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from models.inputs import RankingInputs

ID_FEATURES = ("user", "item", "author")
HOURS_PER_DAY = 24  # the hour-of-day embedding's rows


@dataclass
class RankingInputSpec:
    """What DLRM and Zenith take as input: vocabularies and widths of their feature groups; ids run
    1..num_* (0 = padding). The feature store's layout is `features.spec.FeatureStoreSpec`.

    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> spec.group_dims()["history"]
    24
    """

    num_users: int
    num_items: int
    num_authors: int
    num_actions: int = 9
    item_dense_dim: int = 6
    user_dense_dim: int = 4
    embed_dim: int = 32
    num_hours: int = HOURS_PER_DAY

    def group_dims(self) -> dict[str, int]:
        e = self.embed_dim
        return {
            "user": e,
            "item": e,
            "author": e,
            "history": 3 * e,
            "item_stats": self.item_dense_dim,
            "user_stats": self.user_dense_dim + 1,
            "context": e + 1,
            "affinity": 2,
        }

    @property
    def total_dim(self) -> int:
        return sum(self.group_dims().values())


def fold_ids(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Map ids into 0..vocab: 0 stays padding, ids above the vocabulary wrap into 1..vocab (modulo
    hashing, so a new id shares a row with an old one instead of crashing the lookup)."""
    ids = ids.clamp(min=0)
    return torch.where(ids > vocab, (ids - 1) % vocab + 1, ids)


@dataclass
class CandidateFeatures:
    """Feature groups for the real candidates of a batch, flattened to N rows.

    `groups[name]` is [N, width]; `index` ([N, 2] long) gives each row's (request, candidate)
    position so `scatter` can put per-row outputs back into a [B, C, ...] tensor."""

    groups: dict[str, torch.Tensor]
    index: torch.Tensor
    batch_shape: tuple[int, int]

    @property
    def num_rows(self) -> int:
        return int(self.index.shape[0])

    def concat(self) -> torch.Tensor:
        return torch.cat(list(self.groups.values()), dim=-1)

    def scatter(self, rows: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """[N, ...] -> [B, C, ...]; padded candidates get `fill`."""
        out = rows.new_full((*self.batch_shape, *rows.shape[1:]), fill)
        out[self.index[:, 0], self.index[:, 1]] = rows
        return out


def hour_of_day(request_ts: torch.Tensor, num_hours: int = HOURS_PER_DAY) -> torch.Tensor:
    """(request_ts // 3600) % num_hours: the hour embedding's index (see the module's choice on the epoch)."""
    return torch.div(request_ts, 3600, rounding_mode="floor") % num_hours


def request_recency(inputs: RankingInputs, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[B, 2]: log1p(history length), log1p(seconds since the last history event) (0 without a history)."""
    hmask = inputs.history_mask()
    n_hist = inputs.hist_lengths.clamp(min=0).to(dtype)
    last_ts = torch.where(hmask, inputs.hist_ts, torch.zeros_like(inputs.hist_ts)).max(1).values
    gap = (inputs.request_ts - last_ts).clamp(min=0).to(dtype)
    gap = torch.where(n_hist > 0, gap, torch.zeros_like(gap))  # no history: no recency signal
    return torch.stack([torch.log1p(n_hist), torch.log1p(gap)], -1)


def history_affinity(hist_items: torch.Tensor, hist_authors: torch.Tensor, hist_mask: torch.Tensor,
                     cand_items: torch.Tensor, cand_authors: torch.Tensor) -> torch.Tensor:
    """[..., 2]: the share of the history on the candidate's item and on its author.

    The history tensors are [..., L] and broadcast against the candidates' [...] (one row per candidate, or
    [B, 1, L] against [B, C]). The one cross feature we hand-build: "has this user engaged with this very item /
    author before" is the strongest live-stream signal and costs one comparison per event.

    >>> h = torch.tensor([[1, 2, 2, 0]])
    >>> history_affinity(h, h, h > 0, torch.tensor([2]), torch.tensor([5])).tolist()
    [[0.6666666865348816, 0.0]]
    """
    hm = hist_mask.to(torch.float32)
    denom = hm.sum(-1).clamp(min=1.0)
    same_item = ((hist_items == cand_items[..., None]).to(hm.dtype) * hm).sum(-1) / denom
    same_author = ((hist_authors == cand_authors[..., None]).to(hm.dtype) * hm).sum(-1) / denom
    return torch.stack([same_item, same_author], -1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over dim 1 of x [B, L, E] where mask [B, L] is True; 0 for an empty history."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1.0)


class FeatureEmbedder(nn.Module):
    """Embedding tables and pooling shared by DLRM and Zenith.

    >>> from models.inputs import random_ranking_inputs
    >>> spec = RankingInputSpec(num_users=50, num_items=100, num_authors=20, embed_dim=8)
    >>> feats = FeatureEmbedder(spec)(random_ranking_inputs())
    >>> feats.concat().shape[1] == spec.total_dim
    True
    """

    def __init__(self, spec: RankingInputSpec):
        super().__init__()
        self.spec = spec
        e = spec.embed_dim
        # The history reuses the candidate tables: a history item and a candidate item are the same
        # thing, and sharing lets the history summary live in the candidates' embedding space.
        self.user_emb = nn.Embedding(spec.num_users + 1, e, padding_idx=0)
        self.item_emb = nn.Embedding(spec.num_items + 1, e, padding_idx=0)
        self.author_emb = nn.Embedding(spec.num_authors + 1, e, padding_idx=0)
        self.action_emb = nn.Embedding(spec.num_actions + 1, e, padding_idx=0)
        self.hour_emb = nn.Embedding(spec.num_hours, e)
        for table in (self.user_emb, self.item_emb, self.author_emb, self.action_emb, self.hour_emb):
            nn.init.normal_(table.weight, std=0.1)
            if table.padding_idx is not None:
                with torch.no_grad():
                    table.weight[table.padding_idx].zero_()

    def forward(self, inputs: RankingInputs) -> CandidateFeatures:
        s = self.spec
        cmask = inputs.candidate_mask()
        index = cmask.nonzero()  # [N, 2] (request, candidate), request-major order
        req, cand = index[:, 0], index[:, 1]

        # Per-request features are computed once per request, then gathered per candidate row.
        hmask = inputs.history_mask()
        hist_items = fold_ids(inputs.hist_item_ids, s.num_items)
        hist_authors = fold_ids(inputs.hist_author_ids, s.num_authors)
        history = torch.cat(
            [
                masked_mean(self.item_emb(hist_items), hmask),
                masked_mean(self.author_emb(hist_authors), hmask),
                masked_mean(self.action_emb(fold_ids(inputs.hist_actions, s.num_actions)), hmask),
            ],
            dim=-1,
        )
        recency = request_recency(inputs, history.dtype)  # log1p(history length), log1p(gap)
        user_stats = torch.cat([inputs.user_dense.to(history.dtype), recency[:, :1]], -1)
        context = torch.cat([self.hour_emb(hour_of_day(inputs.request_ts, s.num_hours)), recency[:, 1:]], -1)

        cand_items = fold_ids(inputs.cand_item_ids[req, cand], s.num_items)
        cand_authors = fold_ids(inputs.cand_author_ids[req, cand], s.num_authors)
        affinity = history_affinity(hist_items[req], hist_authors[req], hmask[req], cand_items, cand_authors)

        groups = {
            "user": self.user_emb(fold_ids(inputs.user_ids, s.num_users))[req],
            "item": self.item_emb(cand_items),
            "author": self.author_emb(cand_authors),
            "history": history[req],
            "item_stats": inputs.cand_dense[req, cand].to(history.dtype),
            "user_stats": user_stats[req],
            "context": context[req],
            "affinity": affinity.to(history.dtype),
        }
        return CandidateFeatures(groups, index, (inputs.batch_size, int(cmask.shape[1])))


def ranking_bce(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    task_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Summed (or weighted) per-task BCE over real candidates.

    logits, labels: [B, C, T]; mask: [B, C] bool. Each task's BCE is averaged over the real candidates,
    then tasks are summed with `task_weights` ([T], default all ones)."""
    per = F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype), reduction="none")
    m = mask.to(per.dtype)[..., None]
    per_task = (per * m).sum((0, 1)) / m.sum().clamp(min=1.0)
    if task_weights is None:
        return per_task.sum()
    return (per_task * task_weights.to(per_task)).sum()
