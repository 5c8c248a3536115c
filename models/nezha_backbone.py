"""The causal backbone of the generative retriever (MODELS.md §7): HSTU blocks (models/hstu.py) or a
plain pre-LN softmax transformer (the SASRec block, models/sasrec.py), with a K/V cache for
token-by-token decoding.

Tokens are already embedded and right-padded; position p of a row is its p-th real token. Choice:
with the HSTU relative bias, a token's "time" is its position and its query time is position + 1,
fixed at creation, so cached keys and queries never change when a token is appended (HSTU's own
next-event query time would change the last token's state when the next one arrives).

>>> import torch
>>> bb = CausalBackbone("hstu", d_model=16, num_blocks=2, num_heads=2, max_len=12, dropout=0.0).eval()
>>> x, lengths = torch.randn(2, 6, 16), torch.tensor([6, 4])
>>> full = bb(x, lengths)
>>> out, cache = bb.prefill(x[:, :5], torch.tensor([5, 3]))
>>> step, cache = bb.step(x[[0, 1], [5, 3]][:, None], cache)     # row 0's 6th token, row 1's 4th
>>> torch.allclose(step[:, 0], full[[0, 1], [5, 3]], atol=1e-5)
True
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.hstu import HSTUConfig, HSTUEncoder
from models.sasrec import SASRecBlock

BACKBONES = ("hstu", "transformer")


class CausalBackbone(nn.Module):
    """Causal encoder over embedded tokens with `prefill` / `step` for cached decoding.

    The cache is a dict: per layer keys and values [R, H, S, D], a key mask and key positions [R, S]
    and the next position [R]; `reorder(cache, rows)` selects / repeats rows (beam search).
    """

    def __init__(self, kind: str = "hstu", d_model: int = 64, num_blocks: int = 2, num_heads: int = 2,
                 max_len: int = 64, dropout: float = 0.2, variant: str = "research"):
        super().__init__()
        if kind not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {kind!r}")
        self.kind, self.h, self.d = kind, num_heads, d_model
        if kind == "hstu":
            per_head = d_model // num_heads
            self.cfg = HSTUConfig(d_model=d_model, num_blocks=num_blocks, num_heads=num_heads, d_qk=per_head,
                                  d_v=per_head, max_len=max_len, dropout=dropout, variant=variant)
            self.encoder = HSTUEncoder(self.cfg)
        else:
            self.blocks = nn.ModuleList(SASRecBlock(d_model, num_heads, dropout) for _ in range(num_blocks))
        self.norm = nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, N, d] right-padded, lengths [B] -> normalised states [B, N, d] (padding zero)."""
        return self._run(x, lengths, None)

    def _run(self, x: torch.Tensor, lengths: torch.Tensor, kv: list | None) -> torch.Tensor:
        n = x.shape[1]
        pos = torch.arange(n, device=x.device)[None]
        valid = pos < lengths[:, None]
        if self.kind == "hstu":
            # Positions serve as times, and every row has the same ones: the relative bias is computed once,
            # [1, N, N], and broadcast over the batch (at batch 32, ~15 elementwise ops on [B, N, N] fewer).
            y = self.encoder(x, lengths, position_ids=pos, timestamps=pos, query_times=pos + 1, kv_out=kv)
        else:
            causal = pos[0][None, :] <= pos[0][:, None]
            mask = (causal[None] & valid[:, None, :]) | torch.eye(n, dtype=torch.bool, device=x.device)[None]
            y = x
            for block in self.blocks:
                if kv is not None:
                    _, k, v = self._qkv(block, y)
                    kv.append((k, v))
                y = block(y, mask[:, None])
        return self.norm(y) * valid[..., None].to(y.dtype)

    def _qkv(self, block: SASRecBlock, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, n, d = x.shape
        q, k, v = block.qkv(block.norm1(x)).view(b, n, 3, block.h, d // block.h).permute(2, 0, 3, 1, 4)
        return q, k, v  # [B, H, N, D]

    @torch.no_grad()
    def prefill(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Run the prompt once; returns its states and the cache for `step`."""
        kv: list = []
        out = self._run(x, lengths, kv)
        if self.kind == "hstu":  # the encoder reports [B, N, H, D]
            kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kv]
        key_pos = torch.arange(x.shape[1], device=x.device).expand(len(x), x.shape[1])
        return out, {"kv": kv, "mask": key_pos < lengths[:, None], "key_pos": key_pos, "pos": lengths.clone()}

    @staticmethod
    def reorder(cache: dict, rows: torch.Tensor) -> dict:
        return {"kv": [(k[rows], v[rows]) for k, v in cache["kv"]],
                **{name: cache[name][rows] for name in ("mask", "key_pos", "pos")}}

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        """One new token per row (x [R, 1, d]) at position cache["pos"]; returns its state [R, 1, d]."""
        pos = cache["pos"]
        mask = torch.cat([cache["mask"], cache["mask"].new_ones(len(x), 1)], dim=1)
        key_pos = torch.cat([cache["key_pos"], pos[:, None]], dim=1)
        new_kv = []
        for i in range(len(cache["kv"])):
            k_old, v_old = cache["kv"][i]
            if self.kind == "hstu":
                block = self.encoder.blocks[i]
                u, q, k, v = block.project(x)
                k_all = torch.cat([k_old, k.transpose(1, 2)], 2)
                v_all = torch.cat([v_old, v.transpose(1, 2)], 2)
                scores = block.attn_scale * torch.matmul(q.transpose(1, 2).float(), k_all.transpose(-1, -2).float())
                rel = (key_pos - pos[:, None])[:, None, :]
                bias = self.encoder.layer_bias(i, rel, (pos[:, None] + 1 - key_pos)[:, None, :])
                if bias is not None:
                    scores = scores + bias
                attn = F.silu(scores) * (self.encoder.inv_n * mask[:, None, None, :])
                o = torch.matmul(attn, v_all.float()).transpose(1, 2).flatten(2).to(x.dtype)
                x = block.output(x, u, o)
            else:
                block = self.blocks[i]
                q, k, v = self._qkv(block, x)
                k_all, v_all = torch.cat([k_old, k], 2), torch.cat([v_old, v], 2)
                a = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask[:, None, None, :])
                x = x + block.proj(a.transpose(1, 2).reshape(len(x), 1, self.d))
                x = x + block.ffn(block.norm2(x))
            new_kv.append((k_all, v_all))
        return self.norm(x), {"kv": new_kv, "mask": mask, "key_pos": key_pos, "pos": pos + 1}

