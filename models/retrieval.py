"""Next-item retrieval with HSTU (MODELS.md §1); the SASRec baseline lives in models/sasrec.py.

Training predicts the next item at every position with a sampled softmax over cosine similarity
(temperature 0.05), uniform random negatives and accidental hits masked. Outputs and item
embeddings are L2-normalised; the input table doubles as the output table.

>>> import torch
>>> from models.hstu import HSTUConfig
>>> cfg = HSTUConfig(d_model=16, num_blocks=2, num_heads=1, d_qk=16, d_v=16, max_len=20, dropout=0.0)
>>> model = HSTURetrieval(cfg, num_items=50)
>>> ids = torch.randint(1, 51, (2, 20)); ts = torch.arange(20).expand(2, 20) * 60
>>> lengths = torch.tensor([20, 7])
>>> norms = model(ids, ts, lengths).norm(dim=-1)
>>> bool(torch.allclose(norms[0], torch.ones(20))), bool(norms[1, 7:].sum() == 0)
(True, True)
>>> model.score_all(ids, ts, lengths).shape     # one score per catalogue item (column 0 = padding)
torch.Size([2, 51])
>>> bool(model.loss(ids, ts, lengths, num_negatives=8) > 0)
True
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hstu import NUM_TIME_BUCKETS, HSTUConfig, HSTUEncoder, log_time_bucket, next_event_times

SIMILARITIES = ("cosine", "dot")


class SequentialRetriever(nn.Module):
    """Loss, item table and full-catalogue scoring shared by HSTU and SASRec; subclasses `encode`.

    `similarity`: "cosine" (states and item table L2-normalised, scores over a temperature of 0.05: HSTU's
    recipe) or "dot" (raw inner products, temperature 1: SASRec's; an item's norm can then carry its
    popularity).
    """

    def __init__(self, num_items: int, d_model: int, similarity: str = "cosine"):
        super().__init__()
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity must be one of {SIMILARITIES}, got {similarity!r}")
        self.num_items, self.similarity = num_items, similarity
        self.temperature = 0.05 if similarity == "cosine" else 1.0
        self.item_emb = nn.Embedding(num_items + 1, d_model, padding_idx=0)
        nn.init.normal_(self.item_emb.weight, std=0.02)
        self.item_emb.weight.data[0] = 0

    def encode(self, item_ids: torch.Tensor, timestamps: torch.Tensor | None,
               lengths: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, item_ids: torch.Tensor, timestamps: torch.Tensor | None,
                lengths: torch.Tensor) -> torch.Tensor:
        """[B, N] ids (right-padded), [B, N] seconds, [B] -> states [B, N, d] (L2-normalised for cosine)."""
        states = self.encode(item_ids, timestamps, lengths)
        return F.normalize(states, dim=-1) if self.similarity == "cosine" else states

    def item_embeddings(self) -> torch.Tensor:
        """The output item table [num_items + 1, d] (L2-normalised for cosine); row 0 (padding) is zero."""
        table = self.item_emb.weight
        return F.normalize(table, dim=-1) if self.similarity == "cosine" else table

    def loss(self, item_ids: torch.Tensor, timestamps: torch.Tensor | None, lengths: torch.Tensor,
             num_negatives: int = 128, generator: torch.Generator | None = None) -> torch.Tensor:
        """Sampled-softmax next-item loss averaged over every position that has a next item.

        choice: one set of uniform negatives per batch, shared by all positions (cheaper than per
        position; each position still masks negatives equal to its own target).
        """
        out = self(item_ids, timestamps, lengths)[:, :-1]
        target = item_ids[:, 1:]
        valid = torch.arange(target.shape[1], device=target.device)[None, :] < (lengths[:, None] - 1)
        q, t = out[valid], target[valid]  # [P, d], [P]
        table = self.item_embeddings()
        pos = (q * table[t]).sum(-1, keepdim=True)
        neg_ids = torch.randint(1, self.num_items + 1, (num_negatives,), generator=generator).to(t.device)
        neg = (q @ table[neg_ids].T).masked_fill(neg_ids[None, :] == t[:, None], float("-inf"))
        logits = torch.cat([pos, neg], dim=1) / self.temperature
        return F.cross_entropy(logits, torch.zeros_like(t))

    @torch.no_grad()
    def score_all(self, item_ids: torch.Tensor, timestamps: torch.Tensor | None,
                  lengths: torch.Tensor) -> torch.Tensor:
        """Score (cosine or dot) of every catalogue item after the whole history: [B, num_items + 1].

        Column 0 (padding) is -inf; excluding already-seen items is the caller's choice.
        """
        out = self(item_ids, timestamps, lengths)
        last = out[torch.arange(out.shape[0], device=out.device), (lengths - 1).clamp(min=0)]
        scores = last @ self.item_embeddings().T
        scores[:, 0] = float("-inf")
        return scores


class HSTURetrieval(SequentialRetriever):
    """HSTU encoder over item tokens: item emb · sqrt(d) + position emb, dropout, padding zeroed.

    The production variant adds a log-time-bucket embedding (next event time - own time) at the
    input, since its blocks have no relative bias.
    """

    def __init__(self, cfg: HSTUConfig, num_items: int, similarity: str = "cosine"):
        super().__init__(num_items, cfg.d_model, similarity)
        self.cfg = cfg
        self.encoder = HSTUEncoder(cfg)
        self.pos = nn.Embedding(cfg.max_len, cfg.d_model)
        nn.init.normal_(self.pos.weight, std=1.0 / math.sqrt(cfg.d_model))
        self.time = None
        if cfg.variant == "production":
            self.time = nn.Embedding(NUM_TIME_BUCKETS + 1, cfg.d_model)
            nn.init.normal_(self.time.weight, std=1.0 / math.sqrt(cfg.d_model))
        self.drop = nn.Dropout(cfg.dropout)

    def encode(self, item_ids, timestamps, lengths):
        n = item_ids.shape[1]
        pos = torch.arange(n, device=item_ids.device)
        x = self.item_emb(item_ids) * math.sqrt(self.cfg.d_model) + self.pos(pos)[None]
        qt = next_event_times(timestamps, lengths)
        if self.time is not None:
            x = x + self.time(log_time_bucket(qt - timestamps))
        valid = pos[None, :] < lengths[:, None]
        x = self.drop(x) * valid[..., None].to(x.dtype)
        return self.encoder(x, lengths, timestamps=timestamps, query_times=qt)
