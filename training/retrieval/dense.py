"""Next-item retrieval training for HSTU and the SASRec baseline (MODELS.md §1, public protocol).

Multi-epoch training over the leave-one-out training sequences (`training.retrieval.data`): every
position predicts the next item, by default with a softmax over the whole catalogue (scored by the model's
similarity: dot product or cosine / temperature 0.05; sampled softmaxes remain as options,
`training.retrieval.losses`), in the shared epoch loop
(`training.retrieval.loop`: Adam, validation HR@10 with NDCG@10 breaking ties picks the best epoch, early
stopping); that epoch's weights are tested on the last item with full-catalogue ranking. Plain PyTorch,
deterministic by seed for a fixed thread count on the CPU.

>>> import numpy as np
>>> from training.retrieval.data import leave_one_out, sequences_from_interactions
>>> users = np.repeat(np.arange(1, 41), 12)
>>> items = (np.tile(np.arange(12), 40) + users) % 20 + 1        # each user walks the ring 1..20
>>> split = leave_one_out(sequences_from_interactions(users, items, np.tile(np.arange(12), 40)), max_len=10)
>>> model, _ = build_retrieval_model("hstu", split.num_items, d_model=16, max_len=10, dropout=0.0)
>>> result = train_retrieval(model, split, RetrievalTrainConfig(batch_size=16, max_epochs=3))
>>> result.epochs, sorted(result.test)
(3, ['hr@10', 'hr@50', 'mrr', 'ndcg@10', 'ndcg@50', 'seen_excluded'])
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from models.hstu import HSTUConfig
from models.retrieval import HSTURetrieval, SequentialRetriever
from models.sasrec import SASRec
from training.metrics import retrieval_metrics, target_ranks
from training.retrieval.data import LeaveOneOut, SequenceBatch
from training.retrieval.loop import LoopConfig, TrainResult, refit_epochs, train_epochs
from training.retrieval.losses import full_softmax, per_sequence_sampled_softmax

log = logging.getLogger(__name__)

MODEL_KINDS = ("hstu", "sasrec")
SOFTMAXES = ("full", "sampled_per_sequence", "sampled_per_batch")


def build_retrieval_model(kind: str, num_items: int, d_model: int = 50, num_blocks: int = 2, num_heads: int = 1,
                          max_len: int = 200, dropout: float = 0.2, variant: str = "research",
                          similarity: str = "cosine", seed: int = 0) -> tuple[SequentialRetriever, dict[str, Any]]:
    """A seeded HSTU ("hstu", HSTU block `variant`) or SASRec ("sasrec") retriever and its constructor
    kwargs (what `training.artifact.save_artifact` stores). Defaults: the ML-1M HSTU config (2 blocks,
    1 head, d = dqk = dv = 50, max length 200, dropout 0.2).

    >>> model, config = build_retrieval_model("sasrec", num_items=100, d_model=8, max_len=20)
    >>> type(model).__name__, config["num_items"]
    ('SASRec', 100)
    """
    torch.manual_seed(seed)
    if kind == "hstu":
        per_head = d_model // num_heads
        cfg = HSTUConfig(d_model=d_model, num_blocks=num_blocks, num_heads=num_heads, d_qk=per_head, d_v=per_head,
                         max_len=max_len, dropout=dropout, variant=variant)
        config: dict[str, Any] = {"cfg": cfg, "num_items": num_items, "similarity": similarity}
        return HSTURetrieval(**config), config
    if kind == "sasrec":
        config = {"num_items": num_items, "d_model": d_model, "num_blocks": num_blocks, "num_heads": num_heads,
                  "max_len": max_len, "dropout": dropout, "similarity": similarity}
        return SASRec(**config), config
    raise ValueError(f"unknown retrieval model kind {kind!r}; expected one of {MODEL_KINDS}")


@dataclass
class RetrievalTrainConfig(LoopConfig):
    """The dense recipe (training.retrieval.loop.LoopConfig plus the loss); defaults: full softmax, Adam 1e-3."""

    # "full": cross-entropy over the whole catalogue (training.retrieval.losses.full_softmax);
    # "sampled_per_sequence": num_negatives uniform negatives per training sequence;
    # "sampled_per_batch": the model's own loss, one set shared by the batch (learns far slower on ML-1M).
    softmax: str = "full"
    num_negatives: int = 128  # sampled softmaxes only
    eval_batch_size: int = 256
    def __post_init__(self) -> None:
        if self.softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, got {self.softmax!r}")


def padded_rows(data: SequenceBatch, rows: np.ndarray,
                device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a padded set as tensors on `device`, trimmed to the longest of them."""
    lengths = data.lengths[rows]
    width = int(lengths.max())
    arrays = (data.items[rows, :width], data.times[rows, :width], lengths)
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


@torch.no_grad()
def score_next_items(model: SequentialRetriever, items: torch.Tensor, times: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """Scores [B, num_items + 1] of every item as the next one (the model's similarity), read at the last
    history token.

    Position `lengths - 1` is the target slot (`SequenceBatch`): it only lends its time to the token
    before it (as that token's query time), and causal attention keeps its item id out of the state.
    """
    return next_item_queries(model, items, times, lengths) @ model.item_embeddings().T


def next_item_queries(model: SequentialRetriever, items: torch.Tensor, times: torch.Tensor,
                      lengths: torch.Tensor) -> torch.Tensor:
    """The vectors [B, d] that `score_next_items` scores items against: the states at the last history token."""
    return model(items, times, lengths)[torch.arange(len(lengths)), lengths - 2]


def _scored_batches(model: SequentialRetriever, data: SequenceBatch, batch_size: int):
    """(rows, scores [rows, num_items + 1]) over `data` in batches of similar lengths (less padding), in eval mode."""
    was_training = model.training
    model.eval()
    device = model.item_emb.weight.device
    order = np.argsort(data.lengths, kind="stable")
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start: start + batch_size]
            yield rows, score_next_items(model, *padded_rows(data, rows, device))
    finally:
        model.train(was_training)


def _seen_excluded_ranks(data: SequenceBatch, rows: np.ndarray, scores: torch.Tensor) -> torch.Tensor:
    """Target ranks of `rows` without each user's earlier items; rows whose target is one of them are left out."""
    keep = data.new_targets(rows)
    rows, device = rows[keep], scores.device
    return target_ranks(scores[torch.from_numpy(keep).to(device)], torch.from_numpy(data.targets[rows]).to(device),
                        torch.from_numpy(data.seen[rows]).to(device)).cpu()


def evaluate(model: SequentialRetriever, data: SequenceBatch, ks: tuple[int, ...] = (10, 50),
             batch_size: int = 256, seen_excluded: bool = False) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of `data.targets` ranked against the whole catalogue (padding excluded).

    `seen_excluded`: the protocol of the published SASRec + sampled softmax figures (eSASRec's benchmark, RecTools'
    `filter_viewed` and the splitter's `filter_already_seen`): the items a user had before the target are removed
    from that user's ranking, and users whose target is one of them are not counted ("users" says how many were).
    Our own tables use the default, nothing excluded.
    """
    ranks = []
    for rows, scores in _scored_batches(model, data, batch_size):
        ranks.append(_seen_excluded_ranks(data, rows, scores) if seen_excluded else
                     target_ranks(scores, torch.from_numpy(data.targets[rows]).to(scores.device)).cpu())
    ranks = torch.cat(ranks)
    metrics = retrieval_metrics(ranks, ks)
    return {**metrics, "users": len(ranks)} if seen_excluded else metrics


def evaluate_both_protocols(model: SequentialRetriever, data: SequenceBatch, batch_size: int) -> dict[str, Any]:
    """`evaluate`'s metrics with nothing excluded and, under "seen_excluded", the published protocol's: one pass."""
    ranks, seen_ranks = [], []
    for rows, scores in _scored_batches(model, data, batch_size):
        ranks.append(target_ranks(scores, torch.from_numpy(data.targets[rows]).to(scores.device)).cpu())
        seen_ranks.append(_seen_excluded_ranks(data, rows, scores))
    seen_ranks = torch.cat(seen_ranks)
    return {**retrieval_metrics(torch.cat(ranks)),
            "seen_excluded": {**retrieval_metrics(seen_ranks), "users": len(seen_ranks)}}


def train_retrieval(model: SequentialRetriever, split: LeaveOneOut, cfg: RetrievalTrainConfig | None = None,
                    name: str = "model") -> TrainResult:
    """Train with early stopping on validation HR@10 (ties: NDCG@10), restore the best epoch, test it; with
    `refit_with_validation`, refit for that many epochs on training + validation items and test the refit."""
    cfg = cfg or RetrievalTrainConfig()
    device = torch.device(cfg.device)
    model.to(device)
    initial = copy.deepcopy(model.state_dict()) if cfg.refit_with_validation else None
    result = _fit(model, split.train, cfg, name, lambda: evaluate(model, split.valid, batch_size=cfg.eval_batch_size))
    t0 = time.perf_counter()
    result.test = evaluate_both_protocols(model, split.test, cfg.eval_batch_size)
    result.eval_seconds += time.perf_counter() - t0
    log.info("%s best epoch %d: valid hr@10 %.4f, test hr@10 %.4f ndcg@10 %.4f", name, result.best_epoch,
             result.valid.get("hr@10", float("nan")), result.test["hr@10"], result.test["ndcg@10"])
    if initial is not None and result.best_epoch > 0:
        result.selected_state = copy.deepcopy(model.state_dict())
        lengths, step = _steps(model, split.train_with_validation(), cfg)
        refit = refit_epochs(model, initial, cfg, result.best_epoch, lengths, step, f"{name}-refit")
        test = evaluate_both_protocols(model, split.test, cfg.eval_batch_size)
        result.refit = {"epochs": refit.epochs, "train_seconds": refit.train_seconds, "selected_test": result.test}
        result.test, result.train_seconds = test, result.train_seconds + refit.train_seconds
        log.info("%s refitted on training + validation items for %d epochs: test hr@10 %.4f ndcg@10 %.4f "
                 "(seen items excluded: %.4f / %.4f)", name, refit.epochs, test["hr@10"], test["ndcg@10"],
                 test["seen_excluded"]["hr@10"], test["seen_excluded"]["ndcg@10"])
    return result


def _steps(model: SequentialRetriever, rows: SequenceBatch,
           cfg: RetrievalTrainConfig) -> tuple[np.ndarray, Callable[[np.ndarray], dict[str, torch.Tensor]]]:
    """The trainable rows' lengths and the training step over them with cfg's loss."""
    device = torch.device(cfg.device)
    negatives = torch.Generator().manual_seed(cfg.seed)  # on the CPU; the model moves the ids
    trainable = np.flatnonzero(rows.lengths >= 2)  # a row needs a next item to learn from

    def step(batch: np.ndarray) -> dict[str, torch.Tensor]:
        items, times, lengths = padded_rows(rows, trainable[batch], device)
        if cfg.softmax == "full":
            return {"loss": full_softmax(model, items, times, lengths)}
        if cfg.softmax == "sampled_per_sequence":
            return {"loss": per_sequence_sampled_softmax(model, items, times, lengths, cfg.num_negatives, negatives)}
        return {"loss": model.loss(items, times, lengths, num_negatives=cfg.num_negatives, generator=negatives)}

    return rows.lengths[trainable], step


def _fit(model: SequentialRetriever, rows: SequenceBatch, cfg: RetrievalTrainConfig, name: str,
         validate: Callable[[], dict[str, float]]) -> TrainResult:
    """The epoch loop on `rows` with cfg's loss, validation HR@10 (ties: NDCG@10) picking the epoch."""
    lengths, step = _steps(model, rows, cfg)

    def score() -> tuple[tuple[float, ...], dict[str, float]]:
        valid = validate()
        return (valid["hr@10"], valid["ndcg@10"]), valid  # NDCG breaks ties once HR saturates

    return train_epochs(model, cfg, lengths, step, score, name)
