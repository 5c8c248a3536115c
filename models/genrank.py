"""The two generative rankers: HSTU ranking (paper form) and GenRank (MODELS.md §1, §3).

HSTURanking interleaves item and action tokens Φ0, a0, Φ1, a1, ... and appends the candidate items;
the state at a candidate item token predicts its actions. GenRank (Huang et al., 2025) makes one
token per exposure (item + action), a candidate token of item + a learned "mask action", gives all
candidates of a request one shared position, adds request-index and pre-request-time embeddings and
replaces the learned relative bias with parameter-free ALiBi. Both keep the pointwise SiLU attention,
the candidate mask (candidates see the history and themselves only) and take `RankingInputs` to
logits [B, C, T]; only candidate positions carry a loss.

>>> import torch
>>> from models.inputs import random_ranking_inputs
>>> cfg = RankerConfig(num_items=100, num_actions=9, num_tasks=2, num_authors=20, cand_dense_dim=6,
...                    max_hist_len=16, d_model=16, d_qk=8, d_v=8, head_hidden=8)
>>> inp = random_ranking_inputs(batch_size=3, hist_len=16, num_candidates=4)
>>> GenRank(cfg)(inp).shape, HSTURanking(cfg)(inp).shape
(torch.Size([3, 4, 2]), torch.Size([3, 4, 2]))
>>> labels = torch.randint(0, 2, (3, 4, 2)).float()
>>> bool(GenRank(cfg).loss(inp, labels) > 0)
True
"""

from __future__ import annotations

import torch
import torch.nn as nn

from models.heads import RankerConfig, SequenceRanker
from models.hstu import NUM_TIME_BUCKETS, HSTUEncoder, Tokens, log_time_bucket, next_event_times
from models.inputs import RankingInputs

__all__ = ["GenRank", "HSTURanking", "RankerConfig", "request_features"]

MAX_GAP_BUCKET = 64  # floor(log2(seconds)) clipped to 64 (choice, §3)
NO_PREVIOUS_REQUEST = MAX_GAP_BUCKET + 1  # the first request has no gap


def _log2_bucket(seconds: torch.Tensor) -> torch.Tensor:
    return torch.floor(torch.log2(seconds.clamp(min=1).to(torch.float64))).long().clamp(0, MAX_GAP_BUCKET)


def request_features(ts: torch.Tensor, lengths: torch.Tensor, request_ts: torch.Tensor):
    """Request index and pre-request-time bucket of each history event and of the candidates.

    choice: an event whose time differs from the previous event's by >= 1 s starts a new request.
    The request index counts requests so far (1-based); the gap bucket is floor(log2(seconds since
    the previous request)) clipped to 64, or 65 for the first request. Candidates belong to one more
    request at `request_ts` (or to the last one if no second has passed).
    Returns (hist_index [B, L], hist_gap [B, L], cand_index [B], cand_gap [B]).

    >>> request_features(torch.tensor([[100, 100, 104, 0]]), torch.tensor([3]), torch.tensor([1124]))
    (tensor([[1, 1, 2, 2]]), tensor([[65, 65,  2,  2]]), tensor([3]), tensor([9]))
    """
    b, n = ts.shape
    i = torch.arange(n, device=ts.device)[None, :].expand(b, n)
    prev = torch.cat([ts[:, :1], ts[:, :-1]], dim=1)
    start = (i == 0) | (ts - prev >= 1)
    index = torch.cumsum(start.long(), dim=1)
    gap_at_start = torch.where(i == 0, torch.full_like(ts, NO_PREVIOUS_REQUEST), _log2_bucket(ts - prev))
    start_of = torch.cummax(torch.where(start, i, torch.zeros_like(i)), dim=1).values
    gap = torch.gather(gap_at_start, 1, start_of)

    has = lengths > 0
    last = (lengths - 1).clamp(min=0)[:, None]
    last_ts = ts.gather(1, last).squeeze(1)
    new = ~has | (request_ts - last_ts >= 1)
    cand_index = torch.where(has, index.gather(1, last).squeeze(1), 0) + new.long()
    cand_gap = torch.where(new, _log2_bucket(request_ts - last_ts), gap.gather(1, last).squeeze(1))
    cand_gap = torch.where(has, cand_gap, torch.full_like(cand_gap, NO_PREVIOUS_REQUEST))
    return index, gap, cand_index, cand_gap


def _table(n: int, d: int, std: float) -> nn.Embedding:
    t = nn.Embedding(n, d)
    nn.init.normal_(t.weight, std=std)
    return t


class HSTURanking(SequenceRanker):
    """HSTU ranking with interleaved item/action tokens; research block + rab by default.

    The production variant (cfg.variant="production") adds a log-time-bucket embedding of
    (query time - own time) at the input instead of rab.
    """

    def __init__(self, cfg: RankerConfig):
        super().__init__(cfg)
        max_len = 2 * cfg.max_hist_len + 1  # two tokens per event + the candidates' shared position
        self.encoder = HSTUEncoder(cfg.encoder_config(max_len))
        self.actions = _table(cfg.num_actions + 1, cfg.d_model, 0.02)
        self.pos = _table(max_len, cfg.d_model, self.pos_std)
        self.time = (_table(NUM_TIME_BUCKETS + 1, cfg.d_model, self.pos_std)
                     if cfg.variant == "production" else None)

    def _add_time(self, x: torch.Tensor, ts: torch.Tensor, qt: torch.Tensor) -> torch.Tensor:
        return x if self.time is None else x + self.time(log_time_bucket(qt - ts))

    def history_tokens(self, inputs: RankingInputs) -> Tokens:
        b, n = inputs.hist_item_ids.shape
        item = self.items(inputs.hist_item_ids, inputs.hist_author_ids)
        act = self.actions(inputs.hist_actions) * self.items.scale
        x = torch.stack([item, act], dim=2).reshape(b, 2 * n, -1)  # Φ0, a0, Φ1, a1, ...
        ts = inputs.hist_ts.repeat_interleave(2, dim=1)
        lengths = 2 * inputs.hist_lengths
        pos = torch.arange(2 * n, device=x.device).expand(b, -1)
        qt = next_event_times(ts, lengths)
        x = self._add_time(x + self.pos(pos), ts, qt)
        return Tokens(self._finish(x, pos < lengths[:, None]), lengths, pos, ts, qt)

    def candidate_tokens(self, inputs: RankingInputs, hist: Tokens) -> Tokens:
        b, c = inputs.cand_item_ids.shape
        pos = hist.lengths[:, None].expand(b, c)  # every candidate sits where the next token would
        ts = inputs.request_ts[:, None].expand(b, c)
        x = self.items(inputs.cand_item_ids, inputs.cand_author_ids) + self.pos(pos) + self._dense(inputs)
        x = self._add_time(x, ts, ts)
        return Tokens(self._finish(x, inputs.candidate_mask()), inputs.num_candidates, pos, ts, ts)


class GenRank(SequenceRanker):
    """GenRank: action-oriented tokens, shared candidate position, ALiBi, request-level time features.

    choice: item and action tables are scaled by sqrt(d) like HSTU's input; softmax attention (the
    paper's optional switch) and the log-time ALiBi term are not implemented.
    """

    def __init__(self, cfg: RankerConfig):
        super().__init__(cfg)
        max_len = cfg.max_hist_len + 1  # one token per event + the candidates' shared position
        self.encoder = HSTUEncoder(cfg.encoder_config(max_len, relative_bias="alibi"))
        self.mask_action = cfg.num_actions + 1
        self.actions = _table(cfg.num_actions + 2, cfg.d_model, 0.02)
        self.pos = _table(max_len, cfg.d_model, self.pos_std)
        self.request_index = _table(max_len + 1, cfg.d_model, self.pos_std)
        self.request_gap = _table(NO_PREVIOUS_REQUEST + 1, cfg.d_model, self.pos_std)
        self._max_index = max_len

    def _side(self, pos: torch.Tensor, index: torch.Tensor, gap: torch.Tensor) -> torch.Tensor:
        return self.pos(pos) + self.request_index(index.clamp(max=self._max_index)) + self.request_gap(gap)

    def history_tokens(self, inputs: RankingInputs) -> Tokens:
        b, n = inputs.hist_item_ids.shape
        index, gap, _, _ = request_features(inputs.hist_ts, inputs.hist_lengths, inputs.request_ts)
        pos = torch.arange(n, device=inputs.hist_ts.device).expand(b, -1)
        x = (self.items(inputs.hist_item_ids, inputs.hist_author_ids)
             + self.actions(inputs.hist_actions) * self.items.scale + self._side(pos, index, gap))
        lengths = inputs.hist_lengths
        x = self._finish(x, pos < lengths[:, None])
        return Tokens(x, lengths, pos, inputs.hist_ts, next_event_times(inputs.hist_ts, lengths))

    def candidate_tokens(self, inputs: RankingInputs, hist: Tokens) -> Tokens:
        b, c = inputs.cand_item_ids.shape
        _, _, index, gap = request_features(inputs.hist_ts, inputs.hist_lengths, inputs.request_ts)
        pos = hist.lengths[:, None].expand(b, c)  # all candidates share position = history length
        mask_act = self.actions.weight[self.mask_action] * self.items.scale
        x = (self.items(inputs.cand_item_ids, inputs.cand_author_ids) + mask_act
             + self._side(pos, index[:, None].expand(b, c), gap[:, None].expand(b, c)) + self._dense(inputs))
        ts = inputs.request_ts[:, None].expand(b, c)
        return Tokens(self._finish(x, inputs.candidate_mask()), inputs.num_candidates, pos, ts, ts)
