"""Next-item retrieval training for HSTU and the SASRec baseline (MODELS.md §1, public protocol).

Multi-epoch training over the leave-one-out training sequences (`training.retrieval.data`) with a
sampled-softmax loss (uniform negatives drawn per sequence by default, see `training.retrieval.losses`;
cosine / temperature 0.05, accidental hits masked) and Adam. Validation HR@10 (ties broken by
NDCG@10) after every `eval_every` epochs picks the best epoch, with early stopping after `patience`
evaluations without improvement; that epoch's weights are tested on the last item with
full-catalogue ranking. Plain PyTorch (Ray Train comes with the ranking trainer), deterministic by
seed for a fixed thread count on the CPU.

>>> import numpy as np
>>> from training.retrieval.data import leave_one_out, sequences_from_interactions
>>> users = np.repeat(np.arange(1, 41), 12)
>>> items = (np.tile(np.arange(12), 40) + users) % 20 + 1        # each user walks the ring 1..20
>>> split = leave_one_out(sequences_from_interactions(users, items, np.tile(np.arange(12), 40)), max_len=10)
>>> model, _ = build_retrieval_model("hstu", split.num_items, d_model=16, max_len=10, dropout=0.0)
>>> result = train_retrieval(model, split, RetrievalTrainConfig(batch_size=16, num_negatives=8, max_epochs=3))
>>> result.epochs, sorted(result.test)
(3, ['hr@10', 'hr@50', 'mrr', 'ndcg@10', 'ndcg@50'])
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from models.hstu import HSTUConfig
from models.retrieval import HSTURetrieval, SequentialRetriever
from models.sasrec import SASRec
from training.metrics import retrieval_metrics, target_ranks
from training.retrieval.data import LeaveOneOut, SequenceBatch
from training.retrieval.loop import BestEpoch
from training.retrieval.losses import full_softmax, per_sequence_sampled_softmax

log = logging.getLogger(__name__)

MODEL_KINDS = ("hstu", "sasrec")
SOFTMAXES = ("full", "sampled_per_sequence", "sampled_per_batch")


def build_retrieval_model(kind: str, num_items: int, d_model: int = 50, num_blocks: int = 2, num_heads: int = 1,
                          max_len: int = 200, dropout: float = 0.2, variant: str = "research",
                          seed: int = 0) -> tuple[SequentialRetriever, dict[str, Any]]:
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
        config: dict[str, Any] = {"cfg": cfg, "num_items": num_items}
        return HSTURetrieval(**config), config
    if kind == "sasrec":
        config = {"num_items": num_items, "d_model": d_model, "num_blocks": num_blocks, "num_heads": num_heads,
                  "max_len": max_len, "dropout": dropout}
        return SASRec(**config), config
    raise ValueError(f"unknown retrieval model kind {kind!r}; expected one of {MODEL_KINDS}")


@dataclass
class RetrievalTrainConfig:
    """Training recipe; defaults are MODELS.md §1's public-benchmark settings (MovieLens)."""

    batch_size: int = 128
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.0
    # "full": cross-entropy over the whole catalogue (training.retrieval.losses.full_softmax);
    # "sampled_per_sequence": num_negatives uniform negatives per training sequence;
    # "sampled_per_batch": the model's own loss, one set shared by the batch (learns far slower on ML-1M).
    softmax: str = "full"
    num_negatives: int = 128  # sampled softmaxes only
    max_epochs: int = 100
    patience: int = 5  # evaluations without a better validation HR@10 before stopping
    eval_every: int = 1  # epochs between validation runs
    eval_batch_size: int = 256
    # Batches of similar lengths (shuffled in windows of 16 batches, then sorted by length inside the
    # window) waste less compute on padding; ML-1M's training lengths average ~105 of 200.
    length_bucketing: bool = True
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads for the run; None leaves it alone
    max_train_seconds: float | None = None  # stop after the epoch that crosses this budget
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.softmax not in SOFTMAXES:
            raise ValueError(f"softmax must be one of {SOFTMAXES}, got {self.softmax!r}")


@dataclass
class RetrievalResult:
    """What a run did: best epoch by validation HR@10, its validation and test metrics, per-epoch history."""

    best_epoch: int
    epochs: int
    stopped: str  # "patience", "max_epochs" or "time_budget"
    valid: dict[str, float]
    test: dict[str, float]
    train_seconds: float
    eval_seconds: float
    history: list[dict[str, float]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tensors(data: SequenceBatch, rows: np.ndarray,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows of a padded set as tensors on `device`, trimmed to the longest of them."""
    lengths = data.lengths[rows]
    width = int(lengths.max())
    arrays = (data.items[rows, :width], data.times[rows, :width], lengths)
    return tuple(torch.from_numpy(a).to(device) for a in arrays)


def train_batches(data: SequenceBatch, batch_size: int, rng: np.random.Generator,
                  length_bucketing: bool) -> list[np.ndarray]:
    """One epoch of row indices: shuffled, optionally length-bucketed; rows without a target are left out.

    >>> lengths = np.array([5, 1, 3, 9, 2])
    >>> data = SequenceBatch(np.zeros((5, 9), dtype=np.int64), np.zeros((5, 9), dtype=np.int64), lengths)
    >>> sorted(np.concatenate(train_batches(data, 2, np.random.default_rng(0), True)).tolist())
    [0, 2, 3, 4]
    """
    rows = rng.permutation(np.flatnonzero(data.lengths >= 2))
    if not length_bucketing:
        return [rows[i: i + batch_size] for i in range(0, len(rows), batch_size)]
    window = 16 * batch_size
    batches = []
    for start in range(0, len(rows), window):
        chunk = rows[start: start + window]
        chunk = chunk[np.argsort(data.lengths[chunk], kind="stable")]
        batches += [chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@torch.no_grad()
def score_next_items(model: SequentialRetriever, items: torch.Tensor, times: torch.Tensor,
                     lengths: torch.Tensor) -> torch.Tensor:
    """Cosine scores [B, num_items + 1] of every item as the next one, read at the last history token.

    Position `lengths - 1` is the target slot (`SequenceBatch`): it only lends its time to the token
    before it (as that token's query time), and causal attention keeps its item id out of the state.
    """
    states = model(items, times, lengths)
    last = states[torch.arange(len(lengths)), lengths - 2]
    return last @ model.item_embeddings().T


def evaluate(model: SequentialRetriever, data: SequenceBatch, ks: tuple[int, ...] = (10, 50),
             batch_size: int = 256) -> dict[str, float]:
    """HR@K, NDCG@K and MRR of `data.targets` ranked against the whole catalogue (padding excluded)."""
    was_training = model.training
    model.eval()
    device = model.item_emb.weight.device
    order = np.argsort(data.lengths, kind="stable")  # similar lengths per batch: less padding
    ranks = []
    for start in range(0, len(order), batch_size):
        rows = order[start: start + batch_size]
        items, times, lengths = _tensors(data, rows, device)
        scores = score_next_items(model, items, times, lengths)
        ranks.append(target_ranks(scores, torch.from_numpy(data.targets[rows]).to(device)).cpu())
    model.train(was_training)
    return retrieval_metrics(torch.cat(ranks), ks)


def train_retrieval(model: SequentialRetriever, split: LeaveOneOut, cfg: RetrievalTrainConfig | None = None,
                    name: str = "model") -> RetrievalResult:
    """Train with early stopping on validation HR@10 (ties: NDCG@10), restore the best epoch, test it."""
    cfg = cfg or RetrievalTrainConfig()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)  # dropout
    rng = np.random.default_rng(cfg.seed)  # batch order
    negatives = torch.Generator().manual_seed(cfg.seed)  # on the CPU; the model moves the ids
    device = torch.device(cfg.device)
    model.to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)

    best = BestEpoch(cfg.patience)
    history: list[dict[str, float]] = []
    train_s = eval_s = 0.0
    stopped, epoch = "max_epochs", 0
    for epoch in range(1, cfg.max_epochs + 1):
        model.train()
        t0 = time.perf_counter()
        losses = []
        for rows in train_batches(split.train, cfg.batch_size, rng, cfg.length_bucketing):
            items, times, lengths = _tensors(split.train, rows, device)
            if cfg.softmax == "full":
                loss = full_softmax(model, items, times, lengths)
            elif cfg.softmax == "sampled_per_sequence":
                loss = per_sequence_sampled_softmax(model, items, times, lengths, cfg.num_negatives, negatives)
            else:
                loss = model.loss(items, times, lengths, num_negatives=cfg.num_negatives, generator=negatives)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
        train_s += time.perf_counter() - t0
        row: dict[str, float] = {"epoch": epoch, "loss": float(np.mean(losses)), "train_seconds": train_s}
        out_of_time = cfg.max_train_seconds is not None and train_s >= cfg.max_train_seconds
        if epoch % cfg.eval_every == 0 or epoch == cfg.max_epochs or out_of_time:
            t0 = time.perf_counter()
            valid = evaluate(model, split.valid, batch_size=cfg.eval_batch_size)
            eval_s += time.perf_counter() - t0
            row.update({f"valid_{k}": v for k, v in valid.items()})
            best.update(epoch, (valid["hr@10"], valid["ndcg@10"]), valid, model)  # NDCG breaks ties once HR saturates
        history.append(row)
        log.info("%s epoch %d loss %.4f valid hr@10 %s (%.0f s training)", name, epoch, row["loss"],
                 f"{row['valid_hr@10']:.4f}" if "valid_hr@10" in row else "-", train_s)
        if reason := best.stop_reason(out_of_time):
            stopped = reason
            break

    best.restore(model)
    t0 = time.perf_counter()
    test = evaluate(model, split.test, batch_size=cfg.eval_batch_size)
    eval_s += time.perf_counter() - t0
    log.info("%s best epoch %d: valid hr@10 %.4f, test hr@10 %.4f ndcg@10 %.4f", name, best.epoch, best.score[0],
             test["hr@10"], test["ndcg@10"])
    return RetrievalResult(best_epoch=best.epoch, epochs=epoch, stopped=stopped, valid=best.valid, test=test,
                           train_seconds=train_s, eval_seconds=eval_s, history=history)
