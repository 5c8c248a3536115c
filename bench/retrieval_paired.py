"""Is the generative retriever better than the dense one? Both saved models on the same test users, user by user.

    python -m bench.retrieval_paired --dataset beauty --nezha <nezha artifact> --dense <dense artifact>

`bench.retrieval` reports each model's R@10 / N@10; a difference of one standard error (about .003 on 10,000
Beauty users) between two such figures proves nothing by itself. The two models answer the same users, though,
so their difference can be measured per user: for every test user (the same fixed random `--users` as
`bench.retrieval --test-users`, leave-one-out, full catalogue), NEZHA's hit and NDCG at 10 (decoded as configured,
verified every step) and the dense retriever's (its exact ranking of every item), under both protocols (nothing
excluded; each user's earlier items excluded, as the published figures). Reported: both means, the mean paired
difference and its 95% interval from a bootstrap over users (`--resamples`), and how many users only one model hit.
Writes bench/results/retrieval_paired.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.record import RESULTS, machine
from training.artifact import load_artifact
from training.metrics import target_ranks
from training.retrieval.data import leave_one_out, load_sequences
from training.retrieval.dense import padded_rows, score_next_items
from training.retrieval.generative import decoder_ranks, test_rows


def dense_ranks(dense, data, rows: np.ndarray, seen_excluded: bool) -> np.ndarray:
    """The rank of each row's target in the dense retriever's ranking of the whole catalogue."""
    out = []
    with torch.no_grad():
        for s in range(0, len(rows), 256):
            r = rows[s: s + 256]
            scores = score_next_items(dense, *padded_rows(data, r, torch.device("cpu")))
            seen = torch.from_numpy(data.seen[r]) if seen_excluded else None
            out.append(target_ranks(scores, torch.from_numpy(data.targets[r]), seen).numpy())
    return np.concatenate(out)


def per_user(ranks: np.ndarray) -> dict[str, np.ndarray]:
    return {"r10": (ranks < 10).astype(float), "n10": np.where(ranks < 10, 1 / np.log2(ranks + 2.0), 0.0)}


def paired(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> dict[str, float]:
    """Means of a and b, the mean of a - b and its 95% bootstrap interval (users resampled with replacement)."""
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)])
    low, high = np.percentile(means, [2.5, 97.5])
    return {"nezha": round(float(a.mean()), 4), "dense": round(float(b.mean()), 4),
            "difference": round(float(diff.mean()), 4), "ci95": [round(float(low), 4), round(float(high), 4)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="name (training.retrieval.data) or path")
    parser.add_argument("--root", default=str(Path(__file__).resolve().parents[2] / "shared" / "datasets"))
    parser.add_argument("--nezha", required=True, help="a NEZHA artifact (bench.retrieval --save)")
    parser.add_argument("--dense", required=True, help="the dense retriever artifact on the same dataset")
    parser.add_argument("--users", type=int, default=10000, help="fixed random test users (0: all)")
    parser.add_argument("--seed", type=int, default=0, help="of the user sample, as bench.retrieval's")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "retrieval_paired.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    nezha, manifest = load_artifact(args.nezha)
    dense, _ = load_artifact(args.dense)
    max_history = manifest.metadata["max_history"]
    split = leave_one_out(load_sequences(args.dataset, args.root), max_len=max_history + 1)
    if nezha.cfg.num_items != split.num_items or dense.num_items != split.num_items:
        raise ValueError(f"{args.dataset} has {split.num_items} items; NEZHA {nezha.cfg.num_items}, "
                         f"dense {dense.num_items}: not models of this dataset")
    sample = test_rows(len(split.test), args.users or None, args.seed)
    sample = np.arange(len(split.test)) if sample is None else sample
    out = {"dataset": args.dataset, "nezha": args.nezha, "dense": args.dense, "users": len(sample),
           "resamples": args.resamples}
    for protocol, seen_excluded in (("nothing_excluded", False), ("seen_excluded", True)):
        rows, ranks, _ = decoder_ranks(nezha, split.test, "nezha_step", 10, rows=sample, seen_excluded=seen_excluded)
        ours, theirs = per_user(ranks), per_user(dense_ranks(dense, split.test, rows, seen_excluded))
        out[protocol] = {m: paired(ours[m], theirs[m], args.resamples, args.seed) for m in ("r10", "n10")}
        out[protocol]["users"] = len(rows)
        out[protocol]["only_nezha_hit"] = int(((ours["r10"] == 1) & (theirs["r10"] == 0)).sum())
        out[protocol]["only_dense_hit"] = int(((ours["r10"] == 0) & (theirs["r10"] == 1)).sum())
        print(protocol, json.dumps(out[protocol]), flush=True)
    out.update(command="python -m bench.retrieval_paired " + " ".join(sys.argv[1:] if argv is None else argv),
               date=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine())
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
