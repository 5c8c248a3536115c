"""Stage entrypoint: train a next-item retriever (HSTU or SASRec) on a sequential dataset, save an artifact.

    python -m ray_jobs.train_retrieval --dataset ml-1m --model hstu --max-epochs 30
    python -m ray_jobs.train_retrieval --dataset beauty --model sasrec --set datasets.root=/data/datasets

Reads `datasets.root` from the platform config, trains with the public leave-one-out recipe
(training.retrieval.dense), prints validation and test metrics and writes the best epoch's model to
`<out>/<model>-<dataset>-<UTC time>/` (training.artifact). Plain PyTorch in the driver process:
no Ray cluster is needed for this stage yet.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import config
from training.artifact import save_artifact
from training.retrieval.data import DATASETS, leave_one_out, load_sequences
from training.retrieval.dense import MODEL_KINDS, RetrievalTrainConfig, build_retrieval_model, train_retrieval


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)} or a .dat / .txt path")
    parser.add_argument("--model", choices=MODEL_KINDS, default="hstu")
    parser.add_argument("--out", default="data/artifacts", help="folder that receives the artifact folder")
    parser.add_argument("--d-model", type=int, default=50)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--negatives", type=int, default=128)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--patience", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = config.from_args(args)

    data = load_sequences(args.dataset, cfg.datasets.root)
    split = leave_one_out(data, max_len=args.max_len)
    model, model_config = build_retrieval_model(args.model, split.num_items, d_model=args.d_model,
                                                num_blocks=args.blocks, num_heads=args.heads, max_len=args.max_len,
                                                dropout=args.dropout, seed=args.seed)
    train_cfg = RetrievalTrainConfig(num_negatives=args.negatives, max_epochs=args.max_epochs, patience=args.patience,
                                     seed=args.seed, num_threads=args.threads, device=args.device)
    result = train_retrieval(model, split, train_cfg, name=args.model)
    dataset = Path(args.dataset).stem if args.dataset not in DATASETS else args.dataset
    folder = Path(args.out) / f"{args.model}-{dataset}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    metadata = {"dataset": args.dataset, "max_len": args.max_len, "item_vocab": data.item_vocab.tolist(),
                "protocol": "leave-one-out, full-catalogue ranking"}
    metrics = {"test": result.test, "valid": result.valid, "best_epoch": result.best_epoch, "epochs": result.epochs}
    manifest = save_artifact(folder, model.cpu(), model_config, metadata, metrics, name=f"{args.model}-{dataset}")
    print(json.dumps({"artifact": str(folder), "version": manifest.version, **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
