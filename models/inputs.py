"""The one input contract every ranking model in `models/` takes.

A batch holds B recommendation requests. Each request has the user's engagement history
before the request time (right-padded with 0) and up to C candidate items (right-padded with 0).
Every ranking model (DLRM, HSTU, GenRank, Zenith) maps a `RankingInputs` to logits of shape
[B, C, T] for T binary tasks; padded candidates get arbitrary logits that losses must mask with
`candidate_mask()`.

Conventions (shared with `features/` and `training/`, which build these tensors):
- ids are already mapped to a dense vocabulary, 0 is padding, 1.. are real ids;
- `hist_actions` holds action indices from 1 (0 = padding); the vocabulary lives in
  `ingestion.contract.ACTIONS` and its size is passed to the models as `num_actions`;
- times are integer seconds (any epoch, only differences matter);
- dense features are already normalised (e.g. log1p of counts) by the feature pipeline.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class RankingInputs:
    user_ids: torch.Tensor  # [B] long
    request_ts: torch.Tensor  # [B] long, seconds
    hist_item_ids: torch.Tensor  # [B, L] long, 0 = padding, oldest first
    hist_author_ids: torch.Tensor  # [B, L] long
    hist_actions: torch.Tensor  # [B, L] long, 0 = padding
    hist_ts: torch.Tensor  # [B, L] long, seconds, non-decreasing within the valid prefix
    hist_lengths: torch.Tensor  # [B] long, number of valid history events
    cand_item_ids: torch.Tensor  # [B, C] long, 0 = padding
    cand_author_ids: torch.Tensor  # [B, C] long
    num_candidates: torch.Tensor  # [B] long, number of valid candidates
    cand_dense: torch.Tensor  # [B, C, F_item] float, per-candidate windowed stats as of request_ts
    user_dense: torch.Tensor  # [B, F_user] float, the user's windowed stats as of request_ts

    @property
    def batch_size(self) -> int:
        return int(self.user_ids.shape[0])

    def candidate_mask(self) -> torch.Tensor:
        """[B, C] bool, True where a candidate is real."""
        c = self.cand_item_ids.shape[1]
        return torch.arange(c, device=self.cand_item_ids.device)[None, :] < self.num_candidates[:, None]

    def history_mask(self) -> torch.Tensor:
        """[B, L] bool, True where a history event is real."""
        n = self.hist_item_ids.shape[1]
        return torch.arange(n, device=self.hist_item_ids.device)[None, :] < self.hist_lengths[:, None]

    def to(self, device: torch.device | str) -> RankingInputs:
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    def select_candidates(self, index: torch.Tensor) -> RankingInputs:
        """Keep only the candidates at `index` ([B, C'] long) for each request."""
        def take(t: torch.Tensor) -> torch.Tensor:
            if t.dim() == 2:
                return torch.gather(t, 1, index)
            return torch.gather(t, 1, index[..., None].expand(-1, -1, t.shape[-1]))

        c_new = index.shape[1]
        return replace(
            self,
            cand_item_ids=take(self.cand_item_ids),
            cand_author_ids=take(self.cand_author_ids),
            cand_dense=take(self.cand_dense),
            num_candidates=torch.clamp(self.num_candidates, max=c_new),
        )


def random_ranking_inputs(
    batch_size: int = 4,
    hist_len: int = 16,
    num_candidates: int = 8,
    num_items: int = 100,
    num_authors: int = 20,
    num_users: int = 50,
    num_actions: int = 9,
    item_dense_dim: int = 6,
    user_dense_dim: int = 4,
    generator: torch.Generator | None = None,
) -> RankingInputs:
    """Random but well-formed inputs for examples and tests (variable lengths included)."""
    g = generator or torch.Generator().manual_seed(0)
    b, n, c = batch_size, hist_len, num_candidates

    def ints(high: int, *shape: int) -> torch.Tensor:
        return torch.randint(1, high + 1, shape, generator=g)

    lengths = torch.randint(1, n + 1, (b,), generator=g)
    lengths[0] = n
    ncand = torch.randint(1, c + 1, (b,), generator=g)
    ncand[0] = c
    hmask = torch.arange(n)[None, :] < lengths[:, None]
    cmask = torch.arange(c)[None, :] < ncand[:, None]
    gaps = torch.randint(1, 3600, (b, n), generator=g)
    hist_ts = 1_700_000_000 + torch.cumsum(gaps, dim=1)
    request_ts = hist_ts.max(dim=1).values + 10
    return RankingInputs(
        user_ids=ints(num_users, b),
        request_ts=request_ts,
        hist_item_ids=ints(num_items, b, n) * hmask,
        hist_author_ids=ints(num_authors, b, n) * hmask,
        hist_actions=ints(num_actions, b, n) * hmask,
        hist_ts=hist_ts * hmask,
        hist_lengths=lengths,
        cand_item_ids=ints(num_items, b, c) * cmask,
        cand_author_ids=ints(num_authors, b, c) * cmask,
        num_candidates=ncand,
        cand_dense=torch.rand(b, c, item_dense_dim, generator=g) * cmask[..., None],
        user_dense=torch.rand(b, user_dense_dim, generator=g),
    )
