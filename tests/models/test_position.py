"""Position debiasing: the slot offsets absorb a display-position effect and leave item quality to the ranker."""

from __future__ import annotations

import torch
from torch import nn

from models.inputs import random_ranking_inputs
from models.position import PositionDebiasedRanker

SLOTS, ITEMS, SLOPE = 6, 40, -0.5


class ItemLogit(nn.Module):
    """The smallest ranker: one learned logit per item."""

    def __init__(self):
        super().__init__()
        self.logit = nn.Embedding(ITEMS + 1, 1)
        nn.init.zeros_(self.logit.weight)

    def forward(self, inputs):
        return self.logit(inputs.cand_item_ids)


def test_offsets_recover_a_slot_effect_that_the_item_logits_do_not_absorb():
    g = torch.Generator().manual_seed(0)
    quality = torch.randn(ITEMS + 1, generator=g)
    # A biased logging policy: better items are shown higher, so slot and item are confounded.
    model = PositionDebiasedRanker(ItemLogit(), num_slots=SLOTS, num_tasks=1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(400):
        inputs = random_ranking_inputs(batch_size=64, num_candidates=SLOTS, num_items=ITEMS, generator=g)
        inputs.num_candidates.fill_(SLOTS)
        order = quality[inputs.cand_item_ids].argsort(dim=1, descending=True)
        inputs.cand_item_ids = inputs.cand_item_ids.gather(1, order)
        true = quality[inputs.cand_item_ids] + SLOPE * torch.arange(SLOTS)
        clicks = torch.bernoulli(torch.sigmoid(true), generator=g)[..., None]
        loss = nn.functional.binary_cross_entropy_with_logits(model(inputs), clicks)
        opt.zero_grad()
        loss.backward()
        opt.step()
    offsets = model.position.offsets.detach()[:, 0]
    assert torch.allclose(offsets - offsets[0], SLOPE * torch.arange(SLOTS).float(), atol=0.25)
    # The ranker alone orders items by quality, not by where the logs showed them.
    learned = model.ranker.logit.weight.detach()[1:, 0]
    assert torch.corrcoef(torch.stack([learned, quality[1:]]))[0, 1] > 0.9
