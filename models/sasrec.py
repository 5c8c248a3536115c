"""SASRec (Kang & McAuley, 2018): the causal softmax-transformer baseline for HSTU retrieval.

Same input embedding, loss, item table and scoring as HSTURetrieval (models/retrieval.py), so the
two differ only in the encoder. Pre-LN blocks (choice: trains more stably than the original
post-LN); the feed-forward keeps SASRec's width d -> d.

>>> import torch
>>> model = SASRec(num_items=50, d_model=16, num_blocks=2, num_heads=2, max_len=20, dropout=0.0)
>>> ids = torch.randint(1, 51, (2, 20)); lengths = torch.tensor([20, 7])
>>> model(ids, None, lengths).shape
torch.Size([2, 20, 16])
>>> model.score_all(ids, None, lengths).shape
torch.Size([2, 51])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.retrieval import SequentialRetriever


class SASRecBlock(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dropout: float):
        super().__init__()
        self.h = num_heads
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ffn = nn.Sequential(nn.Linear(d_model, d_model), nn.ReLU(), nn.Dropout(dropout),
                                 nn.Linear(d_model, d_model))
        self.drop = nn.Dropout(dropout)
        self.p = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(a.transpose(1, 2).reshape(b, n, d)))
        return x + self.drop(self.ffn(self.norm2(x)))


class SASRec(SequentialRetriever):
    """Causal softmax self-attention over item tokens; timestamps are ignored."""

    def __init__(self, num_items: int, d_model: int = 50, num_blocks: int = 2, num_heads: int = 1,
                 max_len: int = 200, dropout: float = 0.2, similarity: str = "cosine"):
        super().__init__(num_items, d_model, similarity)
        self.d = d_model
        self.pos = nn.Embedding(max_len, d_model)
        nn.init.normal_(self.pos.weight, std=1.0 / math.sqrt(d_model))
        self.blocks = nn.ModuleList(SASRecBlock(d_model, num_heads, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(d_model)
        self.drop = nn.Dropout(dropout)

    def encode(self, item_ids, timestamps, lengths):
        n = item_ids.shape[1]
        pos = torch.arange(n, device=item_ids.device)
        valid = pos[None, :] < lengths[:, None]
        x = self.drop(self.item_emb(item_ids) * math.sqrt(self.d) + self.pos(pos)[None])
        x = x * valid[..., None].to(x.dtype)
        # Causal over real keys; the diagonal is always allowed so no row is empty (padded rows are
        # zeroed at the end anyway).
        causal = pos[None, :] <= pos[:, None]
        mask = (causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device)[None]
        for block in self.blocks:
            x = block(x, mask[:, None])
        return self.norm(x) * valid[..., None].to(x.dtype)
