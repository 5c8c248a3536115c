"""Training, evaluation and latency of the generative (semantic-ID) retriever, models/nezha.py.

One sample per (history prefix, next item) of the leave-one-out training sequences
(training/retrieval/data.py), in the shared epoch loop (training/retrieval/loop.py); the draft head and the
backbone LM are trained jointly with teacher forcing. Validation HR@10 of NEZHA decoding (verified each step)
on a fixed subsample of users picks the best epoch, with early stopping. `evaluate_decoder` ranks the
test item among the decoder's top-k (full catalogue: every valid semantic ID can be generated); with
`seen_excluded` the user's earlier items are excluded inside the decoder (its `exclude`, as serving excludes
them), the published SASRec figures' protocol. `refit_with_validation` trains again, for the chosen epochs,
on training + validation items.

>>> import numpy as np, torch
>>> from training.retrieval.data import leave_one_out, sequences_from_interactions
>>> from training.retrieval.semantic_ids import build_semantic_ids
>>> users = np.repeat(np.arange(1, 31), 8); items = (np.tile(np.arange(8), 30) + users) % 12 + 1
>>> split = leave_one_out(sequences_from_interactions(users, items, np.tile(np.arange(8), 30)), max_len=6)
>>> sid = build_semantic_ids(torch.randn(13, 4), codebook_sizes=(4, 4), iters=3)
>>> model = build_nezha(split.num_items, sid, d_model=16, num_blocks=1, max_history=5, dropout=0.0)[0]
>>> result = train_retriever(model, split, RetrieverTrainConfig(batch_size=32, max_epochs=2, eval_users=10))
>>> result.epochs, sorted(result.test["nezha_step"])
(2, ['eval_seconds', 'invalid_rate', 'n10', 'n5', 'r10', 'r5', 'returned_invalid', 'seen_excluded', 'users'])
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass

import numpy as np
import torch

from models.nezha import NezhaConfig, NezhaRetriever
from training.retrieval.data import LeaveOneOut, SequenceBatch, eval_histories, prefix_samples
from training.retrieval.loop import LoopConfig, TrainResult, refit_epochs, train_epochs
from training.retrieval.semantic_ids import SemanticIds

log = logging.getLogger(__name__)


def build_nezha(num_items: int, sid: SemanticIds, seed: int = 0, **kwargs) -> tuple[NezhaRetriever, NezhaConfig]:
    """A seeded NezhaRetriever over the semantic-ID table `sid`; kwargs are NezhaConfig fields."""
    torch.manual_seed(seed)
    cfg = NezhaConfig(num_items=num_items, codebook_sizes=tuple(sid.radices), **kwargs)
    model = NezhaRetriever(cfg)
    model.set_semantic_ids(sid.table)
    return model, cfg


@dataclass
class RetrieverTrainConfig(LoopConfig):
    """The generative recipe: training.retrieval.loop.LoopConfig plus validation and test decoding."""

    batch_size: int = 256
    max_epochs: int = 30
    patience: int = 3
    eval_users: int = 3000  # validation subsample (decoding every user each epoch costs too much CPU)
    k: int = 10
    test_decoders: tuple[str, ...] = ("nezha_step",)  # "<nezha|beam>_<step|end>", evaluated after training
    # Test users per decoder (a fixed random subsample; None = all): decoding every user with every
    # decoder is the longest part of a CPU run. "_end" decoders use end_users (they measure invalid IDs).
    test_users: int | None = None
    end_users: int | None = None
    # Distillation from a dense teacher (train_retriever's `teacher`): each level's loss mixes in, with this weight,
    # the teacher's distribution over that level's codes (`code_distributions`); 0 = off.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0  # of the teacher's item softmax


def code_distributions(item_probs: torch.Tensor, table: torch.Tensor, gold: torch.Tensor,
                       radices: list[int]) -> list[torch.Tensor]:
    """A teacher's item distribution as per-level code distributions, teacher-forced on the true codes.

    item_probs [B, N + 1] (column 0, padding, holds 0), table [N + 1, L] (each item's codes), gold [B, L] (the
    target's codes): level l's [B, radices[l]] sums the probabilities of the items that share the target's first l
    codes, by their l-th code, normalised. Level 0 is the teacher's mass per first code.

    >>> table = torch.tensor([[0, 0], [0, 0], [0, 1], [1, 0]])
    >>> probs = torch.tensor([[0.0, 0.5, 0.25, 0.25]])
    >>> [[round(p, 3) for p in d[0].tolist()] for d in code_distributions(probs, table, table[[2]], [2, 2])]
    [[0.75, 0.25], [0.667, 0.333]]
    """
    out, same_prefix = [], torch.ones_like(item_probs, dtype=torch.bool)
    for level, size in enumerate(radices):
        codes = table[:, level].expand(len(item_probs), -1)
        mass = item_probs.new_zeros(len(item_probs), size).scatter_add_(1, codes, item_probs * same_prefix)
        out.append(mass / mass.sum(1, keepdim=True).clamp_min(1e-12))
        same_prefix &= table[None, :, level] == gold[:, level: level + 1]
    return out


def _rows(items: np.ndarray, lengths: np.ndarray, rows: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    ln = lengths[rows]
    width = max(int(ln.max()), 1)
    return torch.from_numpy(items[rows, :width]).to(device), torch.from_numpy(ln).to(device)


def _bad_ids(items: torch.Tensor, num_items: int) -> int:
    """Returned ids that are no catalogue item, or repeat an earlier id of their row (0 = padding)."""
    srt = items.sort(1).values
    repeats = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] > 0)
    return int(((items < 0) | (items > num_items)).sum() + repeats.sum())


def decoder_ranks(model: NezhaRetriever, data: SequenceBatch, decoder: str = "nezha_step", k: int = 10,
                  batch_size: int = 256, rows: np.ndarray | None = None, beam_size: int | None = None,
                  seen_excluded: bool = False) -> tuple[np.ndarray, np.ndarray, dict[str, int]]:
    """(rows, ranks, counts): the rows of `data` that count (see `evaluate_decoder`), in the order decoded, the rank
    of each one's target among `decoder`'s top-k (k where it is not among them), and the counts of final beams,
    of beams naming no item before verification, and of returned ids naming no item."""
    kind, verify = decoder.split("_")
    items, lengths = eval_histories(data)
    rows = np.arange(len(lengths)) if rows is None else rows
    if seen_excluded:
        rows = rows[data.new_targets(rows)]
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    dev = model.semantic_ids.device
    ranks, counts = [], {"beams": 0, "invalid": 0, "bad": 0}
    was_training = model.training
    model.eval()
    for s in range(0, len(rows), batch_size):
        r = rows[s: s + batch_size]
        hist, ln = _rows(items, lengths, r, dev)
        exclude = [set(seen[seen > 0].tolist()) for seen in data.seen[r]] if seen_excluded else None
        res = model.decode(hist, ln, k, kind, exclude=exclude, verify=verify, beam_size=beam_size)
        target = torch.from_numpy(data.targets[r]).to(dev)
        hit = res.items == target[:, None]
        ranks.append(torch.where(hit.any(1), hit.float().argmax(1), torch.full_like(target, k)).cpu())
        counts["invalid"] += int(res.invalid.sum())
        counts["beams"] += res.width * len(r)
        counts["bad"] += _bad_ids(res.items, model.cfg.num_items)
    model.train(was_training)
    return rows, (torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)), counts


def evaluate_decoder(model: NezhaRetriever, data: SequenceBatch, decoder: str = "nezha_step", k: int = 10,
                     batch_size: int = 256, rows: np.ndarray | None = None,
                     beam_size: int | None = None, seen_excluded: bool = False) -> dict[str, float]:
    """R@5/10, N@5/10 of `data.targets` in the top-k of `decoder` ("nezha_step", "beam_end", ...), the
    share of final beams naming no item before verification, and of returned ids that name no item.

    `seen_excluded`: each user's earlier items (`data.seen`) are excluded by the decoder itself (the beam widens by
    up to k for them, as on the serving path), and users whose target is one of them are not counted ("users").
    """
    _, rk, counts = decoder_ranks(model, data, decoder, k, batch_size, rows, beam_size, seen_excluded)
    out = {f"r{c}": float((rk < c).mean()) for c in (5, 10) if c <= k}
    out.update({f"n{c}": float(np.where(rk < c, 1 / np.log2(rk + 2.0), 0).mean()) for c in (5, 10) if c <= k})
    out.update(invalid_rate=counts["invalid"] / max(counts["beams"], 1), returned_invalid=counts["bad"])
    return {**out, "users": len(rk)} if seen_excluded else out


def test_rows(n: int, users: int | None, seed: int = 0) -> np.ndarray | None:
    """The fixed random subsample of `users` test rows (sorted), or None for all of them."""
    return np.sort(np.random.default_rng(seed + 2).permutation(n)[:users]) if users else None


def train_retriever(model: NezhaRetriever, split: LeaveOneOut, cfg: RetrieverTrainConfig | None = None,
                    name: str = "nezha", teacher: torch.nn.Module | None = None,
                    refit: tuple[NezhaRetriever, torch.nn.Module | None] | None = None) -> TrainResult:
    """Train with early stopping on validation HR@10 (NEZHA, verified each step), restore the best
    epoch (with `refit_with_validation`: refit for that many epochs on training + validation items), then
    evaluate `cfg.test_decoders` on the test users under both protocols. `teacher`: a dense retriever
    (`score_all`) whose item distributions NEZHA distils with `cfg.distill_weight`.

    `refit`: (model, teacher) that the refit trains, from its current weights, instead of `model` and `teacher`,
    and that is then tested: a NEZHA built on a dense retriever refitted on the validation items, when `model` and
    `teacher` come from that retriever's selected weights, so that validation is not scored by a teacher that saw
    its items (training.retrieval.pipeline). The caller keeps using `refit[0]` when `result.refit` is set."""
    cfg = cfg or RetrieverTrainConfig()
    device = torch.device(cfg.device)
    model.to(device)
    refit_model, refit_teacher = refit or (model, teacher)
    initial = copy.deepcopy(refit_model.state_dict()) if cfg.refit_with_validation else None
    samples = prefix_samples(split.train, model.cfg.max_history)
    eval_rows = np.random.default_rng(cfg.seed + 1).permutation(len(split.valid))[: cfg.eval_users]
    log.info("%s: %d training samples, %d parameters", name, len(samples),
             sum(p.numel() for p in model.parameters()))

    def step_on(net: NezhaRetriever, tutor: torch.nn.Module | None, rows_of):
        distill = tutor is not None and cfg.distill_weight > 0
        if distill:
            tutor.to(device).eval()
        table, radices = net.semantic_ids, list(net.cfg.codebook_sizes)

        def soft_targets(hist: torch.Tensor, ln: torch.Tensor, target: torch.Tensor) -> list[torch.Tensor] | None:
            if not distill:
                return None
            with torch.no_grad():
                positions = torch.arange(hist.shape[1], device=device).expand_as(hist)
                probs = torch.softmax(tutor.score_all(hist, positions, ln) / cfg.distill_temperature, dim=-1)
                return code_distributions(probs, table, table[target], radices)

        def step(rows: np.ndarray) -> dict[str, torch.Tensor]:
            hist, ln = _rows(rows_of.items, rows_of.lengths, rows, device)
            target = torch.from_numpy(rows_of.targets[rows]).to(device)
            parts = net.losses(hist, ln, target, soft_targets(hist, ln, target), cfg.distill_weight)
            loss = parts["nezha"] + net.cfg.ar_weight * parts.get("lm", 0.0)
            return {"loss": loss, **{f"loss_{key}": value for key, value in parts.items()}}
        return step

    def validate() -> tuple[tuple[float, ...], dict[str, float]]:
        valid = evaluate_decoder(model, split.valid, "nezha_step", cfg.k, rows=eval_rows)
        return (valid["r10"], valid["n10"]), valid

    result = train_epochs(model, cfg, samples.lengths, step_on(model, teacher, samples), validate, name)
    if initial is not None and result.best_epoch > 0:
        rows = test_rows(len(split.test), cfg.test_users, cfg.seed)
        selected = evaluate_decoder(model, split.test, "nezha_step", cfg.k, rows=rows)
        log.info("%s selected (epoch %d) test nezha_step: %s", name, result.best_epoch, selected)
        refit_rows = prefix_samples(split.train_with_validation(), model.cfg.max_history)
        model = refit_model.to(device)
        run = refit_epochs(model, initial, cfg, result.best_epoch, refit_rows.lengths,
                           step_on(model, refit_teacher, refit_rows), f"{name}-refit")
        result.refit = {"epochs": run.epochs, "train_seconds": run.train_seconds,
                        "selected_test": {"nezha_step": selected},
                        # whose weights taught and built the model validation scored: the dense model's selected
                        # ones, or the same (refitted) ones as the refit's
                        "selection_teacher": "selected" if refit else "final"}
        result.train_seconds += run.train_seconds
    for decoder in cfg.test_decoders:
        t0 = time.perf_counter()
        rows = test_rows(len(split.test), cfg.end_users if decoder.endswith("_end") else cfg.test_users, cfg.seed)
        result.test[decoder] = evaluate_decoder(model, split.test, decoder, cfg.k, rows=rows)
        result.test[decoder]["seen_excluded"] = evaluate_decoder(model, split.test, decoder, cfg.k, rows=rows,
                                                                 seen_excluded=True)
        seconds = time.perf_counter() - t0
        result.test[decoder].update(eval_seconds=seconds, users=len(split.test) if rows is None else len(rows))
        result.eval_seconds += seconds
        log.info("%s test %s: %s", name, decoder, result.test[decoder])
    return result


@torch.no_grad()
def measure_latency(model: NezhaRetriever, data: SequenceBatch, decoder: str, batch: int = 1, requests: int = 200,
                    k: int = 10, seed: int = 0, warmup: int = 5) -> dict[str, float]:
    """Wall time per `retrieve` call of `batch` test histories (random users), after `warmup` calls:
    mean and p50/p99 in ms, and ms per request."""
    kind, verify = decoder.split("_")
    items, lengths = eval_histories(data)
    rng = np.random.default_rng(seed)
    model.eval()
    times = []
    for i in range(warmup + requests):
        r = rng.choice(len(lengths), size=batch, replace=len(lengths) < batch)
        hist, ln = _rows(items, lengths, r, model.semantic_ids.device)
        t0 = time.perf_counter()
        model.retrieve(hist, ln, k, decoder=kind, verify=verify)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1000)
    t = np.array(times)
    return {"mean_ms": float(t.mean()), "p50_ms": float(np.percentile(t, 50)), "p99_ms": float(np.percentile(t, 99)),
            "ms_per_request": float(t.mean() / batch)}
