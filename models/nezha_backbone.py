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
# Beams share their request's prompt keys above this many (row, prompt token) pairs and copy them below it. Beam
# search of 20 beams on Beauty's histories (means of 8 batches, ms, shared / copied): batch 1 (median 220 pairs)
# 3.99 / 3.85, batch 2 (300) 4.35 / 4.25, batch 4 (760) 5.08 / 5.53, batch 8 (2,480) 7.56 / 11.80, batch 16 (7,040)
# 10.99 / 29.73.
_COPY_PROMPTS_UP_TO = 512


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
        """Run the prompt once; returns its states and the cache for `step`.

        Two layouts. "Shared": one copy of each request's prompt keys and values ("prompt", [B, H, S, D] per
        layer), and per row the request it continues ("req", W consecutive rows per request) and only the keys it
        generated ("gen", [R, H, t, D]); a reorder moves t tokens per row and a step reads each prompt once per
        request. "Copied" ("kv"): every row holds all its keys, [R, H, S + t, D]. `reorder` picks: shared when
        the rows keep beam search's layout and rows x prompt length exceeds `_COPY_PROMPTS_UP_TO`. At batch 32
        (640 beams) sharing made beam search three to four times faster; with 20 beams of one request copying
        was a few percent faster."""
        kv: list = []
        out = self._run(x, lengths, kv)
        if self.kind == "hstu":  # the encoder reports [B, N, H, D]
            kv = [(k.transpose(1, 2), v.transpose(1, 2)) for k, v in kv]
        b, n = x.shape[:2]
        gen = [(k.new_zeros(b, k.shape[1], 0, k.shape[3]), v.new_zeros(b, v.shape[1], 0, v.shape[3])) for k, v in kv]
        return out, {"prompt": kv, "prompt_mask": torch.arange(n, device=x.device)[None] < lengths[:, None],
                     "req": torch.arange(b, device=x.device), "w": 1, "gen": gen, "pos": lengths.clone()}

    @staticmethod
    def reorder(cache: dict, rows: torch.Tensor) -> dict:
        """The cache for rows `rows` of the current one (beam search's parents)."""
        if "kv" in cache:
            return {"kv": [(k[rows], v[rows]) for k, v in cache["kv"]],
                    **{name: cache[name][rows] for name in ("mask", "key_pos", "pos")}}
        req, requests, s = cache["req"][rows], len(cache["prompt_mask"]), cache["prompt_mask"].shape[1]
        w = len(rows) // requests
        if (len(rows) % requests == 0 and len(rows) * s > _COPY_PROMPTS_UP_TO
                and torch.equal(req, torch.arange(requests, device=req.device).repeat_interleave(w))):
            return {**cache, "req": req, "w": w, "pos": cache["pos"][rows],
                    "gen": [(k[rows], v[rows]) for k, v in cache["gen"]]}
        pos = cache["pos"][rows]
        key_pos, mask = CausalBackbone._keys(cache["prompt_mask"], req, pos, cache["gen"][0][0].shape[2])
        return {"kv": [(torch.cat([k_p[req], k_g[rows]], 2), torch.cat([v_p[req], v_g[rows]], 2))
                       for (k_p, v_p), (k_g, v_g) in zip(cache["prompt"], cache["gen"])],
                "mask": mask, "key_pos": key_pos, "pos": pos}

    @staticmethod
    def _keys(prompt_mask: torch.Tensor, req: torch.Tensor, pos: torch.Tensor, t: int) -> tuple[torch.Tensor, ...]:
        """Per row, the positions [R, S + t] and validity of its keys: its request's prompt (positions 0..S-1,
        padding masked out), then its t generated tokens, the last at position pos - 1."""
        s = prompt_mask.shape[1]
        key_pos = torch.cat([torch.arange(s, device=pos.device).expand(len(pos), s),
                             pos[:, None] - t + torch.arange(t, device=pos.device)], dim=1)
        return key_pos, torch.cat([prompt_mask[req], prompt_mask.new_ones(len(pos), t)], dim=1)

    def _qkv_step(self, i: int, x: torch.Tensor) -> tuple:
        """Block i's (block, u or None, q, k, v [R, H, 1, D], score scale) for one new token per row."""
        if self.kind == "hstu":
            block = self.encoder.blocks[i]
            u, q, k, v = block.project(x)
            return block, u, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block.attn_scale
        block = self.blocks[i]
        q, k, v = self._qkv(block, x)
        return block, None, q, k, v, q.shape[-1] ** -0.5

    def _attend(self, i: int, scores: torch.Tensor, key_pos: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """Attention weights from raw scores [R, H, 1, K]: HSTU's relative bias and SiLU, or a masked softmax."""
        if self.kind == "hstu":
            rel = (key_pos - pos[:, None])[:, None, :]
            bias = self.encoder.layer_bias(i, rel, (pos[:, None] + 1 - key_pos)[:, None, :])
            if bias is not None:
                scores = scores + bias
            return F.silu(scores) * (self.encoder.inv_n * mask[:, None, None, :])
        return torch.softmax(scores.masked_fill(~mask[:, None, None, :], float("-inf")), dim=-1)

    def _update(self, block, u, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """The block's residual update from the attention output o [R, H, 1, D]."""
        o = o.transpose(1, 2).flatten(2).to(x.dtype)
        if self.kind == "hstu":
            return block.output(x, u, o)
        x = x + block.proj(o)
        return x + block.ffn(block.norm2(x))

    @torch.no_grad()
    def step(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        """One new token per row (x [R, 1, d]) at position cache["pos"]; returns its state [R, 1, d]."""
        if "kv" in cache:
            return self._step_copied(x, cache)
        pos, req, w = cache["pos"], cache["req"], cache["w"]
        b, s = cache["prompt_mask"].shape
        # This token's key, at position pos, joins the generated ones.
        key_pos, mask = self._keys(cache["prompt_mask"], req, pos + 1, cache["gen"][0][0].shape[2] + 1)
        new_gen = []
        for i, ((k_p, v_p), (k_g, v_g)) in enumerate(zip(cache["prompt"], cache["gen"])):
            block, u, q, k, v, scale = self._qkv_step(i, x)
            k_g, v_g = torch.cat([k_g, k], 2), torch.cat([v_g, v], 2)
            h, d = q.shape[1], q.shape[3]
            q = q.float()
            # Each request's W rows read its prompt once: [B, H, W, D] x [B, H, D, S].
            shared = torch.matmul(q.view(b, w, h, d).transpose(1, 2), k_p.float().transpose(-1, -2))
            scores = scale * torch.cat([shared.transpose(1, 2).reshape(b * w, h, 1, s),
                                        torch.matmul(q, k_g.float().transpose(-1, -2))], dim=-1)
            attn = self._attend(i, scores, key_pos, pos, mask)
            o = torch.matmul(attn[..., :s].reshape(b, w, h, s).transpose(1, 2), v_p.float()).transpose(1, 2)
            o = o.reshape(b * w, h, 1, d) + torch.matmul(attn[..., s:], v_g.float())
            x = self._update(block, u, x, o)
            new_gen.append((k_g, v_g))
        return self.norm(x), {**cache, "gen": new_gen, "pos": pos + 1}

    def _step_copied(self, x: torch.Tensor, cache: dict) -> tuple[torch.Tensor, dict]:
        pos = cache["pos"]
        mask = torch.cat([cache["mask"], cache["mask"].new_ones(len(x), 1)], dim=1)
        key_pos = torch.cat([cache["key_pos"], pos[:, None]], dim=1)
        new_kv = []
        for i, (k_old, v_old) in enumerate(cache["kv"]):
            block, u, q, k, v, scale = self._qkv_step(i, x)
            k_all, v_all = torch.cat([k_old, k], 2), torch.cat([v_old, v], 2)
            attn = self._attend(i, scale * torch.matmul(q.float(), k_all.float().transpose(-1, -2)), key_pos, pos, mask)
            x = self._update(block, u, x, torch.matmul(attn, v_all.float()))
            new_kv.append((k_all, v_all))
        return self.norm(x), {"kv": new_kv, "mask": mask, "key_pos": key_pos, "pos": pos + 1}

