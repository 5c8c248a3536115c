"""Next-item retrieval quality: a SASRec-style baseline vs HSTU on the public leave-one-out protocol.

    python -m bench.quality_retrieval --dataset ml-1m                  # ~18 min on 2 idle CPU cores
    python -m bench.quality_retrieval --dataset ml-1m --max-epochs 3   # a quick look

Both models get the same split, seed, recipe (MODELS.md §1: sampled softmax with 128 uniform
negatives drawn per training sequence (training/retrieval/losses.py says why), cosine / 0.05, Adam
1e-3 (0.9, 0.98), batch 128, dropout 0.2, max length 200) and size (ML-1M HSTU config: 2 blocks,
1 head, d = 50). Each trains until validation HR@10 stops improving (`--patience` evaluations) or
the same `--max-epochs` cap (or an optional time guard; `stopped` in the JSON says which);
the best validation epoch is tested on every user's last item against the full catalogue. Prints a
table and writes bench/results/quality_retrieval.json with `hstu_vs_sasrec_hr10_rel` (the goal:
>= +0.05). Published full-ML-1M numbers (HSTU paper) are a guide only: this repository's ml-1m
holds users 1..2999.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import torch

from training.artifact import save_artifact
from training.retrieval.data import leave_one_out, load_sequences
from training.retrieval.dense import SOFTMAXES, RetrievalTrainConfig, build_retrieval_model, train_retrieval

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quality_retrieval.json"
PUBLISHED_ML1M = {"sasrec": {"hr@10": 0.2853, "ndcg@10": 0.1603}, "hstu": {"hr@10": 0.3097, "ndcg@10": 0.1720}}
MODELS = ("sasrec", "hstu")


def machine() -> str:
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()}, {os.cpu_count()} cores{gpu}, {platform.platform()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def table(results: dict[str, dict]) -> str:
    head = (f"{'model':8} {'epochs':>6} {'best':>5} {'HR@10':>7} {'NDCG@10':>8} {'HR@50':>7} {'MRR':>7} "
            f"{'train s':>8} {'s/epoch':>8} stopped")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        t = r["test"]
        lines.append(f"{name:8} {r['epochs']:6d} {r['best_epoch']:5d} {t['hr@10']:7.4f} {t['ndcg@10']:8.4f} "
                     f"{t['hr@50']:7.4f} {t['mrr']:7.4f} {r['train_seconds']:8.0f} "
                     f"{r['train_seconds'] / r['epochs']:8.1f} {r['stopped']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.quality_retrieval", description=__doc__.split("\n")[0])
    parser.add_argument("--dataset", default="ml-1m", help="a name in training.retrieval.data.DATASETS")
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets"), help="datasets folder")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from: " + ", ".join(MODELS))
    parser.add_argument("--max-epochs", type=int, default=60,
                        help="cap per model: ~18 min for both on 2 idle cores (HSTU still improves at 60)")
    parser.add_argument("--max-train-minutes", type=float, default=None,
                        help="optional per-model guard for a busy machine: stop after the epoch that crosses it "
                             "(the models may then get different epoch counts)")
    parser.add_argument("--patience", type=int, default=5, help="evaluations without a better validation HR@10")
    parser.add_argument("--eval-every", type=int, default=2, help="epochs between validation runs")
    parser.add_argument("--d-model", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--negatives", type=int, default=128)
    parser.add_argument("--softmax", choices=SOFTMAXES, default="sampled_per_sequence",
                        help="the HSTU paper's protocol samples 128 negatives; 'full' is the whole catalogue")
    parser.add_argument("--variant", default="research", help="HSTU block form: research | production")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (the CI machine has 2 cores)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=str(RESULTS), help="JSON results file")
    parser.add_argument("--artifacts", default=None, help="also save each best model as an artifact under DIR")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    t0 = time.perf_counter()
    data = load_sequences(args.dataset, args.root)
    split = leave_one_out(data, max_len=args.max_len)
    print(f"{args.dataset}: {len(data.items)} users, {data.num_items} items, {data.num_interactions} interactions "
          f"({time.perf_counter() - t0:.1f} s to load); {split.skipped_users} users with < 3 items skipped")
    cfg = RetrievalTrainConfig(num_negatives=args.negatives, softmax=args.softmax, max_epochs=args.max_epochs,
                               patience=args.patience, eval_every=args.eval_every, seed=args.seed,
                               num_threads=args.threads, device=args.device,
                               max_train_seconds=args.max_train_minutes * 60 if args.max_train_minutes else None)
    results: dict[str, dict] = {}
    for name in args.models.split(","):
        model, model_config = build_retrieval_model(name, split.num_items, d_model=args.d_model,
                                                    num_blocks=args.blocks, num_heads=args.heads,
                                                    max_len=args.max_len, dropout=args.dropout,
                                                    variant=args.variant, seed=args.seed)
        result = train_retrieval(model, split, cfg, name=name)
        results[name] = result.to_dict()
        if args.artifacts:
            metadata = {"dataset": args.dataset, "max_len": args.max_len, "item_vocab": data.item_vocab.tolist(),
                        "protocol": "leave-one-out, full-catalogue ranking"}
            manifest = save_artifact(Path(args.artifacts) / f"{name}-{args.dataset}", model.cpu(), model_config,
                                     metadata, {"test": result.test, "valid": result.valid}, name=name)
            results[name]["artifact_version"] = manifest.version

    print(table(results))
    rel = None
    if "hstu" in results and "sasrec" in results:
        rel = results["hstu"]["test"]["hr@10"] / results["sasrec"]["test"]["hr@10"] - 1
        print(f"HSTU vs SASRec HR@10: {rel:+.1%} relative (goal >= +5%)")
    if args.dataset == "ml-1m":
        print("published, full ML-1M (guide only): " + ", ".join(
            f"{m} HR@10 {v['hr@10']:.4f} NDCG@10 {v['ndcg@10']:.4f}" for m, v in PUBLISHED_ML1M.items()))

    record = {
        "command": "python -m bench.quality_retrieval " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "dataset": args.dataset,
        "users": len(data.items), "items": data.num_items, "interactions": data.num_interactions,
        "protocol": "leave-one-out (last = test, second-to-last = validation), max length 200, full-catalogue "
                    "ranking excluding only padding; best epoch by validation HR@10",
        "hstu_variant": args.variant,
        "train_config": {k: v for k, v in vars(cfg).items()},
        "model_config": {"d_model": args.d_model, "num_blocks": args.blocks, "num_heads": args.heads,
                         "max_len": args.max_len, "dropout": args.dropout},
        args.dataset: results,
        "hstu_vs_sasrec_hr10_rel": rel,
        "wall_seconds": time.perf_counter() - t0,
    }
    if args.dataset == "ml-1m":
        record["published_full_ml1m"] = PUBLISHED_ML1M
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
