"""The epoch loop both retrieval trainers run (dense.py, generative.py): Adam, length-bucketed batches,
validation every `eval_every` epochs, the best epoch kept by its validation score, early stopping by
patience or a time budget, the best weights restored at the end.

>>> import numpy as np, torch
>>> model = torch.nn.Linear(1, 1)
>>> x = torch.linspace(-1, 1, 64)[:, None]
>>> def step(rows):
...     return {"loss": ((model(x[rows]) - 3 * x[rows]) ** 2).mean()}
>>> def validate():
...     err = float(((model(x) - 3 * x) ** 2).mean())
...     return (-err,), {"mse": err}
>>> fit = train_epochs(model, LoopConfig(batch_size=16, lr=0.05, max_epochs=40, patience=2), np.ones(64, int), step,
...                    validate)
>>> fit.stopped in ("patience", "max_epochs"), fit.valid["mse"] < 0.01
(True, True)
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


@dataclass
class LoopConfig:
    """What every retrieval trainer shares; dense.py and generative.py extend it with their own knobs."""

    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    max_epochs: int = 100
    patience: int = 5  # validations without a better score before stopping
    eval_every: int = 1  # epochs between validations
    # Batches of similar lengths (shuffled in windows of 16 batches, then sorted by length inside the
    # window) waste less compute on padding.
    length_bucketing: bool = True
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads for the run; None leaves it alone
    max_train_seconds: float | None = None  # stop after the epoch that crosses this budget
    device: str = "cpu"
    # After validation chose epoch E: train again from the same initial weights for E epochs on the training rows
    # plus each user's validation item (`refit_epochs`), and test that model; the selected model's test is kept
    # beside it (dense: every metric; generative: nezha_step).
    refit_with_validation: bool = False


@dataclass
class TrainResult:
    """What a run did: best epoch by validation, its validation and test metrics, per-epoch history."""

    best_epoch: int
    epochs: int
    stopped: str  # "patience", "max_epochs" or "time_budget"
    valid: dict[str, float]
    train_seconds: float
    eval_seconds: float
    test: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    refit: dict[str, Any] = field(default_factory=dict)  # a refit after selection (dense.py), if any
    # The weights validation selected, kept when a refit replaced them (saved beside the final ones); not in to_dict
    selected_state: dict[str, Any] | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(replace(self, selected_state=None))  # not deep-copying the weights only to drop them
        del out["selected_state"]
        return out


class BestEpoch:
    """The best validation score so far (a tuple: later entries break ties), its epoch, metrics and a copy of the
    weights; `stop_reason` says when to stop; `restore` loads the best weights."""

    def __init__(self, patience: int):
        self.patience = patience
        self.score: tuple[float, ...] = (-float("inf"),)
        self.epoch, self.valid, self.state, self.bad_evals = 0, {}, None, 0

    def update(self, epoch: int, score: tuple[float, ...], valid: dict, model: torch.nn.Module) -> None:
        if score > self.score:
            self.score, self.epoch, self.valid, self.bad_evals = score, epoch, valid, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            self.bad_evals += 1

    def stop_reason(self, out_of_time: bool) -> str | None:
        """"patience" once `patience` validations in a row did not beat the best, else "time_budget" when out of
        time, else None (go on)."""
        if self.bad_evals >= self.patience:
            return "patience"
        return "time_budget" if out_of_time else None

    def restore(self, model: torch.nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)


def epoch_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator,
                  length_bucketing: bool = True) -> list[np.ndarray]:
    """One epoch of row indices, shuffled; with bucketing, rows of similar length share a batch.

    >>> sorted(np.concatenate(epoch_batches(np.array([5, 1, 3, 9]), 2, np.random.default_rng(0))).tolist())
    [0, 1, 2, 3]
    """
    rows = rng.permutation(len(lengths))
    if not length_bucketing:
        return [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    window = 16 * batch_size
    batches = []
    for start in range(0, len(rows), window):
        chunk = rows[start: start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def train_epochs(model: torch.nn.Module, cfg: LoopConfig, lengths: np.ndarray,
                 step: Callable[[np.ndarray], dict[str, torch.Tensor]],
                 validate: Callable[[], tuple[tuple[float, ...], dict[str, float]]],
                 name: str = "model") -> TrainResult:
    """Train `model` over the rows whose `lengths` are given, restore the best epoch and return the run.

    `step(rows)` returns named losses ("loss" is the one minimised; every entry is logged per epoch);
    `validate()` returns (score tuple, metrics): a higher score is better, later entries break ties.
    Seeds torch (dropout, sampling) and the batch order from `cfg.seed`: a run is reproducible for a fixed
    thread count on the CPU.
    """
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    best = BestEpoch(cfg.patience)
    history: list[dict[str, float]] = []
    train_s = eval_s = 0.0
    stopped, epoch = "max_epochs", 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        batches = epoch_batches(lengths, cfg.batch_size, rng, cfg.length_bucketing)
        for rows in batches:
            losses = step(rows)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for key, value in losses.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach())
        train_s += time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch, "train_seconds": train_s,
                                 **{key: value / max(len(batches), 1) for key, value in sums.items()}}
        out_of_time = cfg.max_train_seconds is not None and train_s >= cfg.max_train_seconds
        shown = "-"
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or out_of_time:
            t0 = time.perf_counter()
            model.eval()
            with torch.no_grad():
                score, valid = validate()
            eval_s += time.perf_counter() - t0
            row.update({f"valid_{key}": value for key, value in valid.items()})
            best.update(epoch, score, valid, model)
            shown = f"{score[0]:.4f}"
        history.append(row)
        log.info("%s epoch %d %s valid %s (%.0f s training)", name, epoch,
                 " ".join(f"{key} {row[key]:.4f}" for key in sums), shown, train_s)
        if reason := best.stop_reason(out_of_time):
            stopped = reason
            break
    best.restore(model)
    return TrainResult(best_epoch=best.epoch, epochs=epoch, stopped=stopped, valid=best.valid,
                       train_seconds=train_s, eval_seconds=eval_s, history=history)


def refit_epochs(model: torch.nn.Module, initial: dict[str, torch.Tensor], cfg: LoopConfig, epochs: int,
                 lengths: np.ndarray, step: Callable[[np.ndarray], dict[str, torch.Tensor]],
                 name: str = "model") -> TrainResult:
    """Train `model` again from the `initial` weights for exactly `epochs` (what validation chose) on other rows,
    with no validation and no time budget, and keep the last epoch: the refit on training + validation items."""
    model.load_state_dict(initial)
    cfg = replace(cfg, max_epochs=epochs, eval_every=epochs, patience=1, max_train_seconds=None)
    return train_epochs(model, cfg, lengths, step, lambda: ((0.0,), {}), name)
