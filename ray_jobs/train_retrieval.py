"""Stage entrypoint: train the dense next-item retriever on a sequential dataset and save an artifact.

    python -m ray_jobs.train_retrieval --dataset beauty
    python -m ray_jobs.train_retrieval --dataset ml-1m --set retrieval.dense.model=hstu --set retrieval.max_history=199
    python -m ray_jobs.train_retrieval --dataset /data/MyShop.txt --set datasets.root=/data/datasets

The recipe is the platform config's `retrieval.dense` section (model, width, dropout, softmax, epochs, ...) and
`retrieval.max_history`; change any of it with `--set`. Reads `datasets.root`, trains with the public
leave-one-out protocol (training.retrieval.dense), prints validation and test metrics and writes the best
epoch's model to `<out>/<model>-<dataset>-<UTC time>/` (training.artifact): what `bench.retrieval
--item-model` and `ray_jobs.train_retriever --item-model` tokenise. Plain PyTorch in the driver process.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import config
from training.retrieval.data import DATASETS, leave_one_out, load_sequences
from training.retrieval.dense import train_retrieval
from training.retrieval.pipeline import RunOptions, build_dense, dense_train_config, save_dense


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--dataset", required=True, help=f"one of {sorted(DATASETS)} or a .dat / .txt / .json path")
    parser.add_argument("--out", default="data/artifacts", help="folder that receives the artifact folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    cfg = config.from_args(args)
    retrieval = cfg.retrieval

    data = load_sequences(args.dataset, cfg.datasets.root)
    split = leave_one_out(data, max_len=retrieval.max_history + 1)
    opts = RunOptions(dataset=args.dataset, seed=args.seed, threads=args.threads or None, device=args.device)
    model, model_config = build_dense(retrieval, split.num_items, args.seed)
    result = train_retrieval(model, split, dense_train_config(retrieval, opts), name=retrieval.dense.model)
    dataset = Path(args.dataset).name.split(".")[0] if args.dataset not in DATASETS else args.dataset
    folder = Path(args.out) / f"{retrieval.dense.model}-{dataset}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}"
    manifest = save_dense(folder, model, model_config, result.to_dict(), args.dataset, data.item_vocab,
                          retrieval.model_dump(), selected_state=result.selected_state)
    metrics = manifest.metrics
    print(json.dumps({"artifact": str(folder), "version": manifest.version, **metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
