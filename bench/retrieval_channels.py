"""Recall@200 of each retrieval channel and of their merge (serving/channels.py), on the same test users.

Called by bench/retrieval.py after training; `channel_latency` times the retrieval stage with one and with
every channel. Channels: "generative" (NEZHA decoding, verified every step, beam
= k), "dense" (exact top-k over the dense retriever's item table), "trending" (the most frequent items of the
training sequences: these public datasets have no usable timestamps, so popularity stands in for serving's
windowed engagement). Leave-one-out, nothing excluded, as in the rest of the benchmark.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from serving.channels import merge_channels
from training.retrieval.data import LeaveOneOut, eval_histories
from training.retrieval.dense import score_next_items


def _generative(model, split: LeaveOneOut, rows: np.ndarray, k: int, batch: int = 32) -> list[list[int]]:
    items, lengths = eval_histories(split.test)
    out = []
    for s in range(0, len(rows), batch):
        r = rows[s: s + batch]
        width = max(int(lengths[r].max()), 1)
        got = model.decode(torch.from_numpy(items[r, :width]), torch.from_numpy(lengths[r]), k, "nezha",
                           verify="step", beam_size=k).items
        out += [[i for i in row if i > 0] for row in got.tolist()]
    return out


def _dense(model, split: LeaveOneOut, rows: np.ndarray, k: int, batch: int = 256) -> list[list[int]]:
    model.eval()
    out = []
    for s in range(0, len(rows), batch):
        r = rows[s: s + batch]
        width = int(split.test.lengths[r].max())
        scores = score_next_items(model, *(torch.from_numpy(a[r, :width]) for a in (split.test.items,
                                                                                    split.test.times)),
                                  torch.from_numpy(split.test.lengths[r]))
        scores[:, 0] = float("-inf")
        out += scores[:, 1:].topk(min(k, scores.shape[1] - 1), dim=1).indices.add(1).tolist()
    return out


def trending(split: LeaveOneOut, k: int) -> list[int]:
    """The k most frequent items of the training sequences (ties: lower id)."""
    counts = np.bincount(split.train.items[split.train.items > 0], minlength=split.num_items + 1)
    return (np.argsort(-counts[1:], kind="stable")[:k] + 1).tolist()


@torch.no_grad()
def channel_recall(generative, dense, split: LeaveOneOut, quotas: dict[str, int], users: int, k: int = 200,
                   seed: int = 0) -> dict:
    """Recall@k of every channel and of the merge with `quotas`, over `users` random test users."""
    rows = np.sort(np.random.default_rng(seed + 3).permutation(len(split.test))[:users])
    targets = split.test.targets[rows]
    lists: dict[str, list[list[int]]] = {}
    seconds: dict[str, float] = {}
    for name, fn in (("generative", lambda: _generative(generative, split, rows, k)),
                     ("dense", lambda: _dense(dense, split, rows, k)),
                     ("trending", lambda: [trending(split, k)] * len(rows))):
        t0 = time.perf_counter()
        lists[name] = fn()
        seconds[name] = time.perf_counter() - t0

    def recall(candidates: list[list[int]]) -> float:
        return float(np.mean([t in set(c) for t, c in zip(targets, candidates)]))

    merges = [merge_channels({n: lists[n][j] for n in lists}, quotas, k) for j in range(len(rows))]
    shares = {n: sum(c == n for m in merges for _, c in m) / (len(rows) * k) for n in quotas}
    merged = recall([[i for i, _ in m] for m in merges])
    # The same lists merged with other shares (trending's kept): where the configured split stands.
    sweep = {}
    for g in range(0, k - quotas.get("trending", 0) + 1, max(k // 8, 1)):
        split_quotas = {"generative": g, "dense": k - quotas.get("trending", 0) - g,
                        "trending": quotas.get("trending", 0)}
        sweep[f"generative {g}"] = recall([[i for i, _ in merge_channels({n: lists[n][j] for n in lists},
                                                                          split_quotas, k)]
                                           for j in range(len(rows))])
    return {"k": k, "users": len(rows), "quotas": dict(quotas),
            "recall": {**{n: recall(c) for n, c in lists.items()}, "merged": merged},
            "merged_share": shares, "merged_recall_by_generative_share": sweep,
            "seconds": seconds}


@torch.no_grad()
def channel_latency(generative, dense, split: LeaveOneOut, quotas: dict[str, int], requests: int, k: int = 200,
                    seed: int = 0) -> dict[str, float]:
    """ms per request at batch 1 (one torch thread is the caller's choice) of the retrieval stage as serving runs
    it for k candidates: the generative channel alone, the dense channel alone, and every channel plus the merge.
    The models' calls only: no HTTP, no feature reads (bench.serve measures the whole request)."""
    rows = np.random.default_rng(seed + 4).choice(len(split.test), size=requests + 3)
    popular = trending(split, k)
    times: dict[str, list[float]] = {"generative": [], "dense": [], "all_channels": []}
    for n, r in enumerate(rows):
        one = np.array([r])
        t0 = time.perf_counter()
        gen = _generative(generative, split, one, k)[0]
        t1 = time.perf_counter()
        den = _dense(dense, split, one, k)[0]
        t2 = time.perf_counter()
        merge_channels({"generative": gen, "dense": den, "trending": popular}, quotas, k)
        t3 = time.perf_counter()
        if n >= 3:  # warm-up
            times["generative"].append(t1 - t0)
            times["dense"].append(t2 - t1)
            times["all_channels"].append(t3 - t0)
    return {name: float(np.mean(t) * 1000) for name, t in times.items()}
