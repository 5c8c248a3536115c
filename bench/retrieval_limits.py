"""What limits the generative retriever's recall on a dataset: its decoding, or the semantic IDs it scores by.

    python -m bench.retrieval_limits --dataset beauty --nezha <nezha artifact> --dense <dense artifact>
    python -m bench.retrieval_limits --dataset beauty --dense <dense artifact> --widths 20   # codes only, quick

Both on the same fixed random test users (leave-one-out, full catalogue, nothing excluded; `--users`):
- **decoding**: NEZHA's R@10 / N@10 (step-verified) with beams of each `--widths` and with a beam as wide as the
  catalogue, where nothing is ever cut (every valid prefix is kept at every level): that last row is the model's
  own ranking of every item by probability, the most any decoder of this model can reach.
- **codes**: the dense retriever's user vectors scored against (a) its item table (the dense retriever itself),
  (b) the table's unit rows (what the tokeniser reads: `semantic_ids.item_embeddings` normalises them), and (c)
  those rows rebuilt from their semantic IDs (the sum of each item's RQ-KMeans centroids), the codes built as the
  pipeline builds them from the config's `retrieval.generative` (`--set` to change codebooks). (c) is the recall of
  a retriever that scores an item by its codes along the dense model's geometry; a NEZHA far below (a) and near
  (c) is limited by its codes, not by its decoder.
Writes bench/results/retrieval_limits.json (or `--out`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

import config
from bench.record import RESULTS, machine
from training.artifact import load_artifact
from training.metrics import hit_rate, ndcg, target_ranks
from training.retrieval.data import leave_one_out, load_sequences
from training.retrieval.dense import next_item_queries, padded_rows
from training.retrieval.generative import evaluate_decoder, test_rows
from training.retrieval.semantic_ids import build_semantic_ids, item_embeddings


def recall_at_10(users: torch.Tensor, table: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(R@10, N@10) of `targets` when items are ranked by users @ table.T, as the dense evaluation ranks them (row
    0, padding, never ranked; ties count against the target, so items sharing a rebuilt row are not flattered)."""
    ranks = target_ranks(users @ table.T, targets)
    return hit_rate(ranks, 10), ndcg(ranks, 10)


def code_ceiling(dense_dir: str, split, rows: np.ndarray, generative, seed: int) -> dict:
    dense, _ = load_artifact(dense_dir)
    dense.eval()
    table = dense.item_embeddings().detach()
    unit = item_embeddings(table, None)
    sid = build_semantic_ids(unit, generative.sid_method, tuple(generative.codebooks), generative.balanced, seed=seed)
    if sid.codebooks is None:
        raise ValueError(f"{generative.sid_method} codes have no centroids in the table's space: no rebuilt rows")
    rebuilt = sum(book[sid.table[:, level]] for level, book in enumerate(sid.codebooks))
    rebuilt[0] = 0
    with torch.no_grad():
        users = torch.cat([next_item_queries(dense, *padded_rows(split.test, rows[s: s + 256], table.device))
                           for s in range(0, len(rows), 256)])
    targets = torch.from_numpy(split.test.targets[rows])
    out = {"semantic_ids": sid.stats,
           "rebuilt_relative_error": float(((rebuilt[1:] - unit[1:]).norm(dim=1)).mean())}
    for name, tab in (("dense", table), ("unit_rows", unit), ("rebuilt_from_codes", rebuilt)):
        r10, n10 = recall_at_10(users, tab, targets)
        out[name] = {"r10": round(r10, 4), "n10": round(n10, 4)}
    return out


def decoding(nezha_dir: str, split, rows: np.ndarray, widths: list[int]) -> list[dict]:
    model, _ = load_artifact(nezha_dir)
    out = []
    for width in [*widths, model.cfg.num_items]:  # the last: no beam is ever cut
        t = time.perf_counter()
        r = evaluate_decoder(model, split.test, "nezha_step", k=10, rows=rows, beam_size=width,
                             batch_size=max(1, 4096 // width))
        out.append({"beam": width, "exhaustive": width >= model.cfg.num_items, "r10": round(r["r10"], 4),
                    "n10": round(r["n10"], 4), "seconds": round(time.perf_counter() - t, 1)})
        print(json.dumps(out[-1]), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--dataset", required=True, help="name (training.retrieval.data) or path")
    parser.add_argument("--dense", required=True, help="a dense retriever artifact (its item table is tokenised)")
    parser.add_argument("--nezha", default=None, help="a NEZHA artifact trained on the same dataset")
    parser.add_argument("--widths", default="10,20,50,100", help="beam widths before the exhaustive one")
    parser.add_argument("--users", type=int, default=3000, help="fixed random test users")
    parser.add_argument("--seed", type=int, default=0, help="of the semantic IDs (as the pipeline's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "retrieval_limits.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    platform = config.from_args(args)
    data = load_sequences(args.dataset, platform.datasets.root)
    split = leave_one_out(data, max_len=platform.retrieval.max_history + 1)
    rows = test_rows(len(split.test.targets), args.users)
    result = {"command": "python -m bench.retrieval_limits " + " ".join(sys.argv[1:] if argv is None else argv),
              "dataset": args.dataset, "users": len(rows), "dense_artifact": args.dense,
              "codes": code_ceiling(args.dense, split, rows, platform.retrieval.generative, args.seed)}
    print(json.dumps(result["codes"], indent=1), flush=True)
    if args.nezha:
        result["nezha_artifact"] = args.nezha
        result["decoding"] = decoding(args.nezha, split, rows, [int(w) for w in args.widths.split(",") if w])
    result.update(date=datetime.now(UTC).isoformat(timespec="seconds"), machine=machine())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
