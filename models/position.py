"""Position debiasing: a per-slot logit offset learned next to a ranker during training, dropped at serving.

A logged impression's outcome depends on where it was shown as well as on what it was: items further
down the list get fewer clicks whatever they are. A ranker trained on logs without the slot learns part
of that as "bad item" (the items the logging policy puts low) and mispredicts every logged outcome by
its slot. Our choice (the shallow position tower of YouTube's "Recommending What Video to Watch Next"
and PAL, reduced to its simplest form): training adds a learned offset per (slot, task) to the ranker's
logits, so the ranker is free to model relevance; serving ranks with the ranker alone, as if every
candidate were shown in the same slot (an offset common to all candidates would not change their order).

Slots are candidate indices: live-stream samples list a request's candidates in the order their
impressions were logged (features/sample_groups.py), which is display order. Slots past the table's
end share its last row.

>>> import torch
>>> from models.inputs import random_ranking_inputs
>>> from models.dlrm import DLRM, DLRMConfig
>>> from models.features import RankingInputSpec
>>> ranker = DLRM(DLRMConfig(RankingInputSpec(num_users=50, num_items=100, num_authors=20), num_tasks=2))
>>> model = PositionDebiasedRanker(ranker, num_slots=4, num_tasks=2)
>>> inputs = random_ranking_inputs(batch_size=3, num_candidates=6)
>>> with torch.no_grad():
...     _ = model.position.offsets.copy_(torch.tensor([[0.0, 0.0], [-1.0, 0.0], [-2.0, 0.0], [-3.0, 0.0]]))
...     shift = (model(inputs) - model.ranker(inputs))[0, :, 0]
>>> [round(x, 4) + 0.0 for x in shift.tolist()]  # float32: exact only to rounding (+ 0.0: no "-0.0")
[0.0, -1.0, -2.0, -3.0, -3.0, -3.0]
"""

from __future__ import annotations

import torch
from torch import nn

from models.inputs import RankingInputs


class PositionBias(nn.Module):
    """Learned logit offsets [num_slots, num_tasks], zero at the start (no position effect assumed)."""

    def __init__(self, num_slots: int, num_tasks: int):
        super().__init__()
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.offsets = nn.Parameter(torch.zeros(num_slots, num_tasks))

    def forward(self, num_candidates: int) -> torch.Tensor:
        """[1, C, T]: the offset of each candidate slot 0..C-1."""
        slots = torch.arange(num_candidates, device=self.offsets.device).clamp(max=self.offsets.shape[0] - 1)
        return self.offsets[slots][None]


class PositionDebiasedRanker(nn.Module):
    """`ranker(inputs) + position(C)`: what training fits to logged outcomes; `.ranker` is what serving loads."""

    def __init__(self, ranker: nn.Module, num_slots: int, num_tasks: int):
        super().__init__()
        self.ranker = ranker
        self.position = PositionBias(num_slots, num_tasks)

    def forward(self, inputs: RankingInputs) -> torch.Tensor:
        return self.ranker(inputs) + self.position(inputs.cand_item_ids.shape[1])
