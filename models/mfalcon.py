"""M-FALCON inference (Zhai et al., ICML 2024; MODELS.md §2) for HSTURanking and GenRank.

Score m candidates per user so that each gets exactly the score it would get alone:
1. prefill: run the encoder over the history once and keep every layer's keys and values;
2. micro-batches of b_m candidates: per layer, each candidate attends to the cached history K/V
   and to itself only, all at the candidates' shared position and query time. A micro-batch costs
   O(b_m·d² + b_m·n·d) per layer instead of O((n + b_m)²·d); the history is never recomputed.
3. optionally keep the prefill per user id (LRU) and reuse it while that user's history is unchanged
   (history states do not depend on the request time: see next_event_times in models/hstu.py).

Call `clear_cache()` after changing the model's weights.

>>> import torch
>>> from models.genrank import GenRank, RankerConfig
>>> from models.inputs import random_ranking_inputs
>>> cfg = RankerConfig(num_items=100, num_actions=9, num_tasks=2, max_hist_len=16, d_model=16,
...                    d_qk=8, d_v=8, head_hidden=8)
>>> model = GenRank(cfg).eval()
>>> inp = random_ranking_inputs(batch_size=3, hist_len=16, num_candidates=10)
>>> scorer = MFalconScorer(model, micro_batch=4, cache_size=100)
>>> real = inp.candidate_mask()
>>> torch.allclose(scorer.score(inp)[real], model(inp)[real], atol=1e-5)
True
>>> _ = scorer.score(inp); scorer.hits
3
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import fields, replace

import torch
import torch.nn.functional as F

from models.heads import SequenceRanker
from models.inputs import RankingInputs

_HISTORY_FIELDS = ("hist_item_ids", "hist_author_ids", "hist_actions", "hist_ts")


def candidate_attention(q, k, v, hist_k, hist_v, hist_mask, cross_bias, self_bias, attn_scale, inv_n):
    """Pointwise SiLU attention of candidates on [cached history, themselves].

    q, k [B, m, H, Dqk], v [B, m, H, Dv]; hist_k [B, H, n, Dqk], hist_v [B, H, n, Dv] (float32);
    hist_mask [B, n]; cross_bias [B, 1|H, 1, n] and self_bias [B, 1|H, m, 1] or None.
    Returns [B, m, H, Dv]; float32 arithmetic, like the reference kernel.
    """
    qf = q.float().transpose(1, 2)  # [B, H, m, D]
    s = attn_scale * torch.matmul(qf, hist_k.transpose(-1, -2))
    if cross_bias is not None:
        s = s + cross_bias.float()
    out = torch.matmul(F.silu(s) * (inv_n * hist_mask[:, None, None, :]), hist_v)
    s_self = attn_scale * (qf * k.float().transpose(1, 2)).sum(-1, keepdim=True)
    if self_bias is not None:
        s_self = s_self + self_bias.float()
    out = out + F.silu(s_self) * inv_n * v.float().transpose(1, 2)
    return out.transpose(1, 2).to(q.dtype)


def _rows(inputs: RankingInputs, idx: torch.Tensor) -> RankingInputs:
    return replace(inputs, **{f.name: getattr(inputs, f.name)[idx] for f in fields(inputs)})


class MFalconScorer:
    """Score `RankingInputs` with a prefilled history and candidate micro-batches.

    `score(inputs)` equals `model(inputs)` (eval mode) up to float rounding; padded candidates get
    arbitrary finite logits, as with `model(inputs)`.
    """

    def __init__(self, model: SequenceRanker, micro_batch: int = 256, cache_size: int = 0):
        self.model = model
        self.micro_batch = micro_batch
        self.cache_size = cache_size
        self._cache: OrderedDict[int, tuple] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def clear_cache(self) -> None:
        self._cache.clear()

    def _prefill(self, hist) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer history (k, v) as [B, H, n, D] float32, from the encoder's own forward."""
        kv: list = []
        self.model.encoder(hist.x, hist.lengths, position_ids=hist.position_ids,
                           timestamps=hist.timestamps, query_times=hist.query_times, kv_out=kv)
        return [(k.float().transpose(1, 2), v.float().transpose(1, 2)) for k, v in kv]

    def _history_key(self, inputs: RankingInputs, b: int) -> tuple[torch.Tensor, ...]:
        n = int(inputs.hist_lengths[b])
        return tuple(getattr(inputs, name)[b, :n].clone() for name in _HISTORY_FIELDS)

    def _cached_prefill(self, inputs: RankingInputs, hist) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Prefill the rows whose (user, history) is not cached, reuse the rest, return the batch's K/V."""
        b = inputs.batch_size
        users = inputs.user_ids.tolist()
        entries: list = [None] * b
        for r, uid in enumerate(users):
            hit = self._cache.get(uid)
            if hit is not None and all(a.shape == c.shape and torch.equal(a, c)
                                       for a, c in zip(hit[0], self._history_key(inputs, r))):
                self._cache.move_to_end(uid)
                entries[r] = hit[1]
                self.hits += 1
        miss = [r for r in range(b) if entries[r] is None]
        self.misses += len(miss)
        if miss:
            idx = torch.tensor(miss, device=inputs.user_ids.device)
            sub = _rows(inputs, idx)
            sub_hist = self.model.history_tokens(sub)
            kv = self._prefill(sub_hist)
            for i, r in enumerate(miss):
                n_tok = int(sub_hist.lengths[i])
                entries[r] = [(k[i, :, :n_tok].clone(), v[i, :, :n_tok].clone()) for k, v in kv]
                self._cache[users[r]] = (self._history_key(inputs, r), entries[r])
                self._cache.move_to_end(users[r])
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        n = hist.x.shape[1]
        out = []
        for layer in range(len(entries[0])):
            ks, vs = [], []
            for e in entries:
                k, v = e[layer]
                pad = (0, 0, 0, n - k.shape[1])
                ks.append(F.pad(k, pad))
                vs.append(F.pad(v, pad))
            out.append((torch.stack(ks), torch.stack(vs)))
        return out

    @torch.no_grad()
    def score(self, inputs: RankingInputs) -> torch.Tensor:
        model = self.model
        was_training = model.training
        model.eval()
        try:
            return self._score(inputs)
        finally:
            model.train(was_training)

    def _score(self, inputs: RankingInputs) -> torch.Tensor:
        model, enc = self.model, self.model.encoder
        hist = model.history_tokens(inputs)
        cand = model.candidate_tokens(inputs, hist)
        kv = self._cached_prefill(inputs, hist) if self.cache_size > 0 else self._prefill(hist)
        n = hist.x.shape[1]
        hist_mask = (torch.arange(n, device=hist.x.device)[None, :] < hist.lengths[:, None]).float()

        # All candidates of a row share one position and query time, so their bias on the history is
        # one row per layer, built once per request.
        c_pos, c_qt = cand.position_ids[:, :1], cand.query_times[:, :1]
        if not (torch.equal(cand.position_ids, c_pos.expand_as(cand.position_ids))
                and torch.equal(cand.query_times, c_qt.expand_as(cand.query_times))):
            raise ValueError("M-FALCON needs all candidates of a request at one position and query time")
        rel = (hist.position_ids - c_pos)[:, None, :]
        dt = (c_qt - hist.timestamps)[:, None, :]
        cross = [enc.layer_bias(i, rel, dt) for i in range(len(enc.blocks))]

        dense = model.head_dense(inputs)
        logits = []
        for s in range(0, cand.x.shape[1], self.micro_batch):
            sl = slice(s, s + self.micro_batch)
            x = cand.x[:, sl]
            self_rel = torch.zeros_like(cand.position_ids[:, sl, None])
            self_dt = (cand.query_times[:, sl] - cand.timestamps[:, sl])[..., None]
            for i, block in enumerate(enc.blocks):
                u, q, k, v = block.project(x)
                o = candidate_attention(q, k, v, kv[i][0], kv[i][1], hist_mask, cross[i],
                                        enc.layer_bias(i, self_rel, self_dt), block.attn_scale, enc.inv_n)
                x = block.output(x, u, o.flatten(2))
            logits.append(model.head(x, inputs.cand_item_ids[:, sl], inputs.cand_author_ids[:, sl],
                                     None if dense is None else dense[:, sl]))
        if not logits:
            return cand.x.new_zeros(inputs.batch_size, 0, model.cfg.num_tasks)
        return torch.cat(logits, dim=1)
