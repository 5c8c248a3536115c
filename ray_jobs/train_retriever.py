"""Stage entrypoint: train a generative (semantic-ID, NEZHA-decoded) retriever on any sequential dataset
and save the artifact serving loads.

    python -m ray_jobs.train_retriever --dataset beauty
    python -m ray_jobs.train_retriever --dataset /data/MyShop.inter.json \
        --set retrieval.generative.item_source=both --set retrieval.generative.max_epochs=10
    python -m ray_jobs.train_retriever --dataset games --item-model data/artifacts/sasrec-games-...

`--dataset` is a name (training.retrieval.data.DATASETS) under `datasets.root` or a path to a `.txt`
(user item item ...), `.dat` or LETTER `.inter.json` file. The models' knobs are the platform config's
`retrieval` section (`--set retrieval.dense.dropout=0.3`, `--set retrieval.generative.codebooks=[128,128]`). Writes
`<out>/nezha-<dataset>-<UTC time>/` (or exactly `--artifact`; training.artifact, with
semantic_ids.safetensors; a local path or s3://) and prints its metrics. `--source lake` trains on the
configured lake's `samples_retrieval` (the platform's own users) instead of a dataset file.

Where it runs: plain PyTorch in this process on a local Ray (`ray.address` unset); on a cluster
(`ray.address` set, e.g. under `ray job submit`) in one Ray task with `training.retriever_cpus` CPUs and,
with `training.use_gpu`, one GPU (device cuda), so it lands on a worker node: the job's driver sits on the
head, which has no CPUs for work (`num-cpus: 0`) and no GPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import config
import storage
from config.schema import PlatformConfig
from training.retrieval.pipeline import RunOptions, run, save


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--dataset", default=None, help="dataset name or path (required unless --source lake)")
    parser.add_argument("--source", choices=("dataset", "lake"), default="dataset",
                        help="lake: train on the platform's own users (samples_retrieval of the configured lake)")
    parser.add_argument("--item-model", default=None,
                        help="a saved dense retriever (ray_jobs.train_retrieval) to tokenise instead of training one")
    parser.add_argument("--out", default=None,
                        help="folder (or s3:// URI) that receives the artifact folder; default training.artifact_dir")
    parser.add_argument("--artifact", default=None, help="write the artifact exactly here (the cluster pipeline)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--test-users", type=int, default=None, help="test users decoded at the end (default: all)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    platform = config.from_args(args)
    if args.source == "dataset" and not args.dataset:
        parser.error("--dataset is required (or --source lake)")
    opts = RunOptions(dataset=args.dataset or "", root=str(platform.datasets.root), item_model=args.item_model,
                      seed=args.seed, threads=args.threads or None, test_users=args.test_users)
    out = args.out or platform.training.artifact_dir
    if not platform.ray.address:
        summary = train_and_save(platform, opts, args.source, args.artifact, out)
    else:
        import ray

        from ray_jobs.runtime import init_ray

        init_ray(platform.ray)
        gpus = 1 if platform.training.use_gpu else 0
        opts.device = "cuda" if gpus else opts.device
        task = ray.remote(num_cpus=platform.training.retriever_cpus, num_gpus=gpus)(train_and_save)
        summary = ray.get(task.remote(platform, opts, args.source, args.artifact, out))
    print(json.dumps(summary, indent=1))
    return 0


def train_and_save(platform: PlatformConfig, opts: RunOptions, source: str, artifact: str | None,
                   out: str) -> dict[str, Any]:
    """Train on a dataset file or the lake's sequences and write the artifact; returns what main prints."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="lake-sequences-") as scratch:
        if source == "lake":
            from training.retrieval.lake_sequences import export_retrieval_sequences

            exported = Path(scratch) / f"lake-{datetime.now(UTC):%Y%m%dT%H%M%S}.txt"
            opts = dataclasses.replace(opts, dataset=str(export_retrieval_sequences(platform, exported)))
        result = run(platform.retrieval, opts)
    name = Path(opts.dataset).name.split(".")[0]
    folder = artifact or storage.join(out, f"nezha-{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    manifest = save(folder, result)
    return {"artifact": folder, "version": manifest.version, "node_id": _ray_node_id(),
            "device": opts.device, "semantic_ids": result["sid"].stats, **manifest.metrics}


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


if __name__ == "__main__":
    sys.exit(main())
