"""Generative retrieval over semantic IDs with NEZHA decoding (Wang et al., WWW 2026; MODELS.md §6-7).

A causal backbone (models/nezha_backbone.py: HSTU or a plain transformer) reads the user's history,
one token per item = the sum of the embeddings of the item's L codes (choice: L tokens per item
would make the prompt L times longer; the codes still carry the semantic ID), plus, optionally
(`item_embeddings`), an embedding of the item itself. Two heads share it:
- NEZHA: the prompt ends with L placeholder tokens SP_1..SP_L; one pass gives h_0 (last history
  token) and h_1..h_L; the draft head computes s_1 = h_0, logits_l = Linear_l(h_l + s_l),
  s_{l+1} = cell_l(Emb_l(t_l), s_l) (the paper's RNNCell, or a GRUCell: `draft_cell`); decoding is one
  pass plus a beam search over L cheap steps.
- the baseline: an ordinary autoregressive LM over the codes (t_1 from h_0, then one cached backbone
  step per generated code), decoded by beam search with the full backbone.
Both are trained jointly with teacher forcing: loss = Σ_l CE(draft) + ar_weight · Σ_l CE(LM); optionally each
level's CE also has a soft part against a teacher's distribution over that level's codes (`losses`).
Decoding verifies IDs with hash sets (models/nezha_decode.py) built from the `semantic_ids` buffer,
so a model loaded from an artifact rebuilds them from its own weights.

>>> import torch
>>> cfg = NezhaConfig(num_items=6, codebook_sizes=(3, 2, 2), d_model=16, num_blocks=1, num_heads=2,
...                   max_history=5, dropout=0.0, beam_size=4)
>>> model = NezhaRetriever(cfg)
>>> model.set_semantic_ids(torch.tensor([[0, 0, 0], [0, 0, 0], [0, 1, 0], [1, 0, 0], [1, 0, 1], [2, 1, 0], [2, 0, 0]]))
>>> hist, lengths = torch.tensor([[1, 2, 3], [4, 0, 0]]), torch.tensor([3, 1])
>>> bool(model.loss(hist, lengths, torch.tensor([5, 6])) > 0)
True
>>> items, scores = model.retrieve(hist, lengths, k=3, decoder="nezha", exclude=[{1}, set()])
>>> items.shape, bool((items[0] != 1).all()), len(set(items[1].tolist())) == 3
(torch.Size([2, 3]), True, True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from models.nezha_backbone import CausalBackbone
from models.nezha_decode import BeamResult, beam_search
from models.semantic_ids import SemanticIdIndex

DECODERS = ("nezha", "beam")
# The draft head's transition s_{l+1} = cell(Emb_l(t_l), s_l): the paper's RNNCell, or (our choice) a GRUCell, whose
# gates let the chosen code reshape the state instead of only adding to it before a tanh.
DRAFT_CELLS = {"rnn": nn.RNNCell, "gru": nn.GRUCell}


@dataclass
class NezhaConfig:
    num_items: int = 1
    codebook_sizes: tuple[int, ...] = (256, 256, 256, 1)  # the last level is the collision code
    backbone: str = "hstu"  # "hstu" | "transformer"
    d_model: int = 64
    num_blocks: int = 2
    num_heads: int = 2
    max_history: int = 50  # most recent items read per request
    dropout: float = 0.2
    hstu_variant: str = "research"
    beam_size: int = 20  # default beam width (at least k)
    ar_weight: float = 1.0  # weight of the backbone LM loss (0 trains NEZHA alone: no baseline)
    # A history token also carries an embedding of the item itself, not only of its codes (items that share
    # codes stay apart; `init_from_item_table` can start it from a dense retriever's items).
    item_embeddings: bool = False
    draft_cell: str = "rnn"  # "rnn" | "gru": the draft head's cell carrying the codes chosen so far
    # Our choice (not in the paper): the last level (the collision code, numbering the items of a prefix) is scored
    # by each item's own output row, of the draft head and of the LM, instead of one row per code. A code's row is
    # shared by every prefix, so below the first levels it can only score a direction shared by unrelated items;
    # with one k-means level of balanced clusters (codebooks (256,), ~48 items each) the second step is a softmax
    # over the chosen cluster's items, as a dense retriever's over the catalogue.
    item_head: bool = False


def recent(history: torch.Tensor, lengths: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The most recent `m` items of right-padded rows, still right-padded (oldest first).

    >>> recent(torch.tensor([[1, 2, 3, 0], [4, 0, 0, 0]]), torch.tensor([3, 1]), 2)[0].tolist()
    [[2, 3], [4, 0]]
    """
    lengths = lengths.long().clamp(max=history.shape[1])
    if history.shape[1] <= m:
        return history.long(), lengths
    start = (lengths - m).clamp(min=0)
    idx = start[:, None] + torch.arange(m, device=history.device)[None, :]
    new_len = lengths.clamp(max=m)
    valid = idx < lengths[:, None]
    out = history.gather(1, idx.clamp(max=history.shape[1] - 1)).long()
    return out * valid, new_len


def _item_logits_per_prefix(table: nn.Embedding, index: SemanticIdIndex, level: int, x: torch.Tensor,
                            prefix: torch.Tensor) -> torch.Tensor | None:
    """The item head's logits [N, T] with each distinct prefix's item rows read once, or None where it does not pay:
    prefixes of fewer than 12 items (T; grouping the beams then costs more than the rows it saves: at T = 3 and 6 it
    was slower, at 12 and above faster, dev timing at serving's 200 candidates), or beams sharing too few prefixes.
    A padded slot costs a multiply-add per (code, dimension), reading a row for a beam several times that: padding up
    to 8x the beams still pays.

    A request's beams are distinct prefixes, so a prefix is shared only across requests, by B beams at most. Reading
    [N, T, d] rows per beam was most of a batch's decode (serving's 200 candidates at batch 32: 8,000 beams, 78 MB
    of rows); here each prefix's [T, d] rows meet its beams' states in one padded [U, G, d] x [U, d, T] product.
    """
    if index.radices[level] < 12:
        return None
    distinct, group = torch.unique(prefix, return_inverse=True)
    n, u = len(prefix), len(distinct)
    if u == n:
        return None
    counts = torch.bincount(group, minlength=u)
    width = int(counts.max())
    if u * width > 8 * n:
        return None
    order = torch.argsort(group, stable=True)
    grouped = group[order]
    slot = torch.arange(n, device=x.device) - (torch.cumsum(counts, 0) - counts)[grouped]  # place in its group
    states = x.new_zeros(u, width, x.shape[1])
    states[grouped, slot] = x[order]
    items = index.extend(level, distinct)  # [U, T]
    scores = torch.bmm(states, table(items.clamp(min=0)).transpose(1, 2))  # [U, G, T]
    out = torch.empty(n, items.shape[1], dtype=scores.dtype, device=x.device)
    out[order] = scores[grouped, slot].masked_fill(items[grouped] < 0, -1e9)
    return out


class NezhaRetriever(nn.Module):
    def __init__(self, cfg: NezhaConfig):
        super().__init__()
        self.cfg = cfg
        sizes, d = tuple(int(t) for t in cfg.codebook_sizes), cfg.d_model
        self.levels = len(sizes)
        # Row i = dense item i's codes; row 0 (padding) is never a valid item. Persistent, so the
        # weights file carries it too and `load_artifact` gives a model that can verify on its own.
        self.register_buffer("semantic_ids", torch.zeros(cfg.num_items + 1, self.levels, dtype=torch.long))
        self.code_emb = nn.ModuleList(nn.Embedding(t, d) for t in sizes)
        self.item_emb = nn.Embedding(cfg.num_items + 1, d, padding_idx=0) if cfg.item_embeddings else None
        if self.item_emb is not None:
            nn.init.zeros_(self.item_emb.weight)  # start as a pure code-sum token
        self.pos_emb = nn.Embedding(cfg.max_history + self.levels, d)
        self.placeholders = nn.Parameter(torch.randn(self.levels, d) / math.sqrt(d))  # SP_1..SP_L
        self.step_type = nn.Parameter(torch.randn(self.levels, d) / math.sqrt(d))  # marks LM code tokens
        for emb in (*self.code_emb, self.pos_emb):
            nn.init.normal_(emb.weight, std=1.0 / math.sqrt(d))
        self.drop = nn.Dropout(cfg.dropout)
        self.backbone = CausalBackbone(cfg.backbone, d, cfg.num_blocks, cfg.num_heads,
                                       max_len=cfg.max_history + self.levels, dropout=cfg.dropout,
                                       variant=cfg.hstu_variant)
        if cfg.item_head and self.levels < 2:
            raise ValueError("item_head needs at least two levels: codes, then the items of each prefix")
        code_sizes = sizes[:-1] if cfg.item_head else sizes  # levels scored by one output row per code
        self.draft_out = nn.ModuleList(nn.Linear(d, t) for t in code_sizes)
        self.draft_emb = nn.ModuleList(nn.Embedding(t, d) for t in sizes[:-1])
        if cfg.draft_cell not in DRAFT_CELLS:
            raise ValueError(f"draft_cell must be one of {tuple(DRAFT_CELLS)}, got {cfg.draft_cell!r}")
        cell = DRAFT_CELLS[cfg.draft_cell]
        self.draft_rnn = nn.ModuleList(cell(d, d) for _ in sizes[:-1])
        self.lm_out = nn.ModuleList(nn.Linear(d, t) for t in code_sizes)
        # item_head: the items' output rows, [0] the draft head's, [1] the LM's
        self.item_out = nn.ModuleList(nn.Embedding(cfg.num_items + 1, d) for _ in range(2)) if cfg.item_head else None
        self._index: tuple[torch.Tensor, SemanticIdIndex] | None = None

    # ---- semantic IDs -------------------------------------------------------------------------
    def set_semantic_ids(self, table: torch.Tensor) -> None:
        """Install a [num_items + 1, L] code table (row 0 = padding); rows 1.. must be distinct tuples."""
        if tuple(table.shape) != tuple(self.semantic_ids.shape):
            raise ValueError(f"semantic-ID table must be {tuple(self.semantic_ids.shape)}, got {tuple(table.shape)}")
        self.semantic_ids.copy_(table)
        self.index()  # validates uniqueness now, not at the first request

    @torch.no_grad()
    def init_from_codebooks(self, books: list[torch.Tensor]) -> None:
        """Start level l's code embedding and its draft / LM output rows at the tokeniser's centroids
        (RQ-KMeans codebooks [T_l, d_model], one per level before the collision code).

        Choice (not in the paper): a history token then starts as the sum of its item's centroids, which
        approximates the item embedding that was tokenised, and level-l logits start as similarities to
        the level's centroids, so training begins from the sequential model's geometry rather than noise.
        """
        if len(books) >= self.levels:
            raise ValueError(f"expected at most {self.levels - 1} codebooks (the collision code has none), "
                             f"got {len(books)}")
        for level, book in enumerate(books):
            if tuple(book.shape) != tuple(self.code_emb[level].weight.shape):
                raise ValueError(f"codebook {level} is {tuple(book.shape)}, level {level} embeds "
                                 f"{tuple(self.code_emb[level].weight.shape)} (codes x d_model)")
            for weight in (self.code_emb[level].weight, self.draft_out[level].weight, self.lm_out[level].weight):
                weight.copy_(book)

    @torch.no_grad()
    def init_from_item_table(self, table: torch.Tensor) -> None:
        """Start every history token at row i of `table` [num_items + 1, d_model] (a dense retriever's items):
        the item embedding takes the residual between the table row and the sum of the item's code embeddings.
        Call it after `init_from_codebooks`, whose centroids the residual is taken against."""
        if self.item_emb is None:
            raise ValueError("this model has no item embeddings (NezhaConfig.item_embeddings=False)")
        if tuple(table.shape) != tuple(self.item_emb.weight.shape):
            raise ValueError(f"item table is {tuple(table.shape)}, "
                             f"the model embeds {tuple(self.item_emb.weight.shape)}")
        codes = self.semantic_ids
        code_sum = sum(emb.weight[codes[:, level]] for level, emb in enumerate(self.code_emb))
        self.item_emb.weight.copy_(table.to(code_sum) - code_sum)
        self.item_emb.weight[0] = 0

    @torch.no_grad()
    def init_item_head(self, table: torch.Tensor) -> None:
        """Start both heads' item output rows at `table` [num_items + 1, d_model] (a dense retriever's items), so the
        last step starts as the dense model's ranking of the prefix's items."""
        if self.item_out is None:
            raise ValueError("this model has no item head (NezhaConfig.item_head=False)")
        for out in self.item_out:
            if tuple(table.shape) != tuple(out.weight.shape):
                raise ValueError(f"item table is {tuple(table.shape)}, the item head is {tuple(out.weight.shape)}")
            out.weight.copy_(table)
            out.weight[0] = 0

    def index(self) -> SemanticIdIndex:
        """Hash sets of the current table, rebuilt whenever the buffer changed (e.g. after loading)."""
        table = self.semantic_ids
        if self._index is None or not torch.equal(self._index[0], table):
            self._index = (table.clone(), SemanticIdIndex(table, self.cfg.codebook_sizes))
        return self._index[1]

    # ---- tokens -------------------------------------------------------------------------------
    def item_tokens(self, items: torch.Tensor) -> torch.Tensor:
        codes = self.semantic_ids[items]
        x = sum(emb(codes[..., level]) for level, emb in enumerate(self.code_emb))
        if self.item_emb is not None:
            x = x + self.item_emb(items)
        return x * (items > 0)[..., None].to(x.dtype)

    def _run(self, hist_x: torch.Tensor, lengths: torch.Tensor, tail: torch.Tensor | None) -> torch.Tensor:
        """Backbone over [real history, tail] packed per row, positions added; returns states."""
        b, n, d = hist_x.shape
        if tail is not None:
            t = tail.shape[1]
            p = torch.arange(n + t, device=hist_x.device)[None, :]
            src = torch.where(p < lengths[:, None], p, (n + p - lengths[:, None]).clamp(max=n + t - 1))
            z = torch.cat([hist_x, tail.expand(b, t, d)], dim=1)
            hist_x = z.gather(1, src[..., None].expand(b, n + t, d))
            lengths = lengths + t
        pos = torch.arange(hist_x.shape[1], device=hist_x.device)
        x = self.drop(hist_x + self.pos_emb(pos)[None])
        return self.backbone(x * (pos[None, :] < lengths[:, None])[..., None].to(x.dtype), lengths)

    @staticmethod
    def _at(states: torch.Tensor, lengths: torch.Tensor, count: int) -> torch.Tensor:
        """States at positions lengths-1 .. lengths-1+count-1: [B, count, d]."""
        idx = lengths[:, None] - 1 + torch.arange(count, device=states.device)[None, :]
        return states.gather(1, idx[..., None].expand(-1, -1, states.shape[-1]))

    def prompt_states(self, hist_x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The prompt pass: the backbone over the history tokens and the placeholders; the states at the last history
        position and at the placeholders [B, L + 1, d]. NEZHA's whole use of the backbone for a request."""
        return self._at(self._run(hist_x, lengths, self.placeholders[None]), lengths, self.levels + 1)

    def lm_tail(self, codes: torch.Tensor) -> torch.Tensor:
        """Tokens fed to the backbone LM after the history: code t_l of level l, l < L ([..., L-1, d])."""
        return torch.stack([self.code_emb[i](codes[..., i]) + self.step_type[i]
                            for i in range(codes.shape[-1])], dim=-2)

    # ---- output heads -------------------------------------------------------------------------
    def level_logits(self, head: int, level: int, x: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
        """Logits [N, T_level] of `level`'s codes from states x [N, d]; head 0 is the draft head, 1 the LM.

        With `item_head` the last level scores the items of each row's prefix (`prefix`: its row in the index, from
        `prefix_rows`, or beam search's) by their output rows; a code naming no item gets -1e9, finite so that a
        zero soft target times its log-probability stays 0."""
        if self.item_out is None or level < self.levels - 1:
            return (self.draft_out, self.lm_out)[head][level](x)
        index = self.index()
        if not torch.is_grad_enabled():  # decoding: beams of different requests share prefixes
            shared = _item_logits_per_prefix(self.item_out[head], index, level, x, prefix)
            if shared is not None:
                return shared
        items = index.extend(level, prefix)  # [N, T]: dense item ids, -1 where the code names none
        rows = self.item_out[head](items.clamp(min=0))
        return torch.bmm(rows, x[:, :, None]).squeeze(-1).masked_fill(items < 0, -1e9)

    def prefix_rows(self, codes: torch.Tensor) -> torch.Tensor | None:
        """The index row of each target's prefix before the last level (what the item head needs), else None."""
        return self.index().prefix_rows(codes[:, :-1]) if self.item_out is not None else None

    # ---- training -----------------------------------------------------------------------------
    def draft_logits(self, h0: torch.Tensor, hs: torch.Tensor, codes: torch.Tensor) -> list[torch.Tensor]:
        """Teacher-forced draft head: h0 [B, d], placeholder states hs [B, L, d], true codes [B, L]."""
        s, out, prefix = h0, [], self.prefix_rows(codes)
        for level in range(self.levels):
            out.append(self.level_logits(0, level, hs[:, level] + s, prefix))
            if level < self.levels - 1:
                s = self.draft_rnn[level](self.draft_emb[level](codes[:, level]), s)
        return out

    def losses(self, history: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor,
               soft_targets: list[torch.Tensor] | None = None, soft_weight: float = 0.0) -> dict[str, torch.Tensor]:
        """Cross-entropy summed over levels for the draft head ("nezha") and the backbone LM ("lm").

        `soft_targets` (distillation): per level a [B, T_level] distribution over that level's codes given the true
        earlier codes (e.g. a dense teacher's item probabilities summed per code); each level's loss is then
        (1 - soft_weight) x cross-entropy with the true code + soft_weight x cross-entropy with the distribution."""
        history, lengths = recent(history, lengths.clamp(min=1), self.cfg.max_history)
        codes = self.semantic_ids[target]

        def level_loss(logits: torch.Tensor, level: int) -> torch.Tensor:
            hard = F.cross_entropy(logits, codes[:, level])
            if soft_targets is None or soft_weight == 0:
                return hard
            soft = -(soft_targets[level] * F.log_softmax(logits, dim=-1)).sum(-1).mean()
            return (1 - soft_weight) * hard + soft_weight * soft

        hx = self.item_tokens(history)
        states = self.prompt_states(hx, lengths)
        logits = self.draft_logits(states[:, 0], states[:, 1:], codes)
        out = {"nezha": sum(level_loss(lg, i) for i, lg in enumerate(logits))}
        if self.cfg.ar_weight > 0:
            tail = self.lm_tail(codes[:, :-1])
            states = self._at(self._run(hx, lengths, tail), lengths, self.levels)
            prefix = self.prefix_rows(codes)
            out["lm"] = sum(level_loss(self.level_logits(1, i, states[:, i], prefix), i) for i in range(self.levels))
        return out

    def loss(self, history: torch.Tensor, lengths: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        parts = self.losses(history, lengths, target)
        return parts["nezha"] + self.cfg.ar_weight * parts.get("lm", 0.0)

    # ---- decoding -----------------------------------------------------------------------------
    def _nezha_start(self, hx, lengths):
        states = self.prompt_states(hx, lengths)
        h0, hs = states[:, 0], states[:, 1:]
        state = {"s": h0, "req": torch.arange(len(h0), device=h0.device)}

        def step(level: int, parent: torch.Tensor, codes: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            s = self.draft_rnn[level - 1](self.draft_emb[level - 1](codes), state["s"][parent])
            req = state["req"][parent]
            state["s"], state["req"] = s, req
            return F.log_softmax(self.level_logits(0, level, hs[req, level] + s, prefix), dim=-1)

        return F.log_softmax(self.draft_out[0](hs[:, 0] + h0), dim=-1), step

    def _beam_start(self, hx, lengths):
        pos = torch.arange(hx.shape[1], device=hx.device)
        x = (hx + self.pos_emb(pos)[None]) * (pos[None, :] < lengths[:, None])[..., None].to(hx.dtype)
        out, cache = self.backbone.prefill(x, lengths)
        state = {"cache": cache}

        def step(level: int, parent: torch.Tensor, codes: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
            cache = self.backbone.reorder(state["cache"], parent)
            tok = self.code_emb[level - 1](codes) + self.step_type[level - 1] + self.pos_emb(cache["pos"])
            y, state["cache"] = self.backbone.step(tok[:, None], cache)
            return F.log_softmax(self.level_logits(1, level, y[:, 0], prefix), dim=-1)

        h0 = out[torch.arange(len(out), device=out.device), lengths - 1]
        return F.log_softmax(self.lm_out[0](h0), dim=-1), step

    @torch.no_grad()
    def decode(self, history: torch.Tensor, lengths: torch.Tensor, k: int, decoder: str = "nezha",
               exclude: list[set[int]] | None = None, verify: str = "step", beam_size: int | None = None
               ) -> BeamResult:
        """Beam search with `decoder` ("nezha" | "beam"); see `retrieve`. Also reports invalid beams."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        history, lengths = recent(history, lengths, self.cfg.max_history)
        if history.shape[1] == 0:
            history = history.new_zeros(len(history), 1)
        lengths = lengths.clamp(min=1)  # an empty history reads one padding token (cold start)
        # Room for excluded items: they may take up to min(|exclude|, k) of the final beams.
        extra = min(max((len(e) for e in exclude), default=0), k) if exclude else 0
        width = max(beam_size or self.cfg.beam_size, k) + extra
        start = self._nezha_start if decoder == "nezha" else self._beam_start
        first, step = start(self.item_tokens(history), lengths)
        return beam_search(first, step, self.index(), width, k, verify=verify, exclude=exclude)

    @torch.no_grad()
    def retrieve(self, history: torch.Tensor, lengths: torch.Tensor, k: int, decoder: str = "nezha",
                 exclude: list[set[int]] | None = None, *, verify: str = "step",
                 beam_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-k items for each history: dense ids [B, L] (1..num_items, 0 = padding, oldest first,
        right-padded) -> (items [B, k] dense ids, scores [B, k] summed log-probabilities). Only valid,
        distinct, non-excluded items; rows with fewer than k are padded with 0 / -inf."""
        if not self.training:  # switching modes walks every submodule: skip it on the serving path
            r = self.decode(history, lengths, k, decoder, exclude, verify, beam_size)
            return r.items, r.scores
        self.eval()
        try:
            r = self.decode(history, lengths, k, decoder, exclude, verify, beam_size)
        finally:
            self.train()
        return r.items, r.scores
