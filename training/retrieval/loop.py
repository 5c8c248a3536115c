"""Early stopping for the multi-epoch trainers (training/retrieval/dense.py, training/retrieval/generative.py).

>>> import torch
>>> model = torch.nn.Linear(1, 1)
>>> best = BestEpoch(patience=2)
>>> for epoch, score in enumerate([(0.1, 0.0), (0.3, 0.1), (0.2, 0.0), (0.3, 0.0)], 1):
...     best.update(epoch, score, {"r10": score[0]}, model)
>>> best.epoch, best.valid, best.stop_reason(out_of_time=False)
(2, {'r10': 0.3}, 'patience')
"""

from __future__ import annotations

import torch


class BestEpoch:
    """The best validation score so far (a tuple: later entries break ties), its epoch, metrics and a copy of the
    weights; `stop_reason` says when to stop; `restore` loads the best weights."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score: tuple[float, ...] = (-1.0, -1.0)
        self.epoch, self.valid, self.state, self.bad_evals = 0, {}, None, 0

    def update(self, epoch: int, score: tuple[float, ...], valid: dict, model: torch.nn.Module) -> None:
        if score > self.score:
            self.score, self.epoch, self.valid, self.bad_evals = score, epoch, valid, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1

    def stop_reason(self, out_of_time: bool) -> str | None:
        """"patience" once `patience` evaluations in a row did not beat the best, else "time_budget" when out of
        time, else None (go on)."""
        if self.bad_evals >= self.patience:
            return "patience"
        return "time_budget" if out_of_time else None

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)
