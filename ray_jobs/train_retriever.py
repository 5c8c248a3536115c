"""Stage entrypoint: train a generative (semantic-ID, NEZHA-decoded) retriever on any sequential dataset
and save the artifact serving loads.

    python -m ray_jobs.train_retriever --dataset beauty
    python -m ray_jobs.train_retriever --dataset /data/MyShop.inter.json --item-source both --epochs 10
    python -m ray_jobs.train_retriever --dataset games --item-model data/artifacts/hstu-games-...

`--dataset` is a name (beauty, sports, yelp, games, nezha-beauty, ml-1m) under `datasets.root` or a
path to a `.txt` (user item item ...), `.dat` or LETTER `.inter.json` file. Every stage option is a
flag named after training.retrieval.pipeline.PipelineConfig (tuples comma-separated). Writes
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
from training.retrieval.pipeline import PipelineConfig, run, save


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--out", default=None,
                        help="folder (or s3:// URI) that receives the artifact folder; default training.artifact_dir")
    parser.add_argument("--artifact", default=None, help="write the artifact exactly here (the cluster pipeline)")
    parser.add_argument("--source", choices=("dataset", "lake"), default="dataset",
                        help="lake: train on the platform's own users (samples_retrieval of the configured lake)")
    for f in dataclasses.fields(PipelineConfig):
        if f.name == "root":
            continue  # from the platform config (datasets.root)
        flag = "--" + f.name.replace("_", "-")
        if f.name == "dataset":
            parser.add_argument(flag, default=None, help="dataset name or path (required unless --source lake)")
        elif isinstance(f.default, tuple):
            parser.add_argument(flag, default=",".join(map(str, f.default)), help=f"default {f.default}")
        elif isinstance(f.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            ints = ("threads", "test_users", "end_users")
            kind = type(f.default) if f.default is not None else (float if "minutes" in f.name else
                                                                    int if f.name in ints else str)
            parser.add_argument(flag, type=kind, default=f.default, help=f"default {f.default}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    platform = config.from_args(args)
    values = {}
    for f in dataclasses.fields(PipelineConfig):
        if f.name == "root":
            continue
        value = getattr(args, f.name)
        if isinstance(f.default, tuple):
            cast = int if f.name == "codebooks" else str
            value = tuple(cast(v) for v in str(value).split(",") if v)
        values[f.name] = value
    if args.source == "dataset" and not values["dataset"]:
        _parser().error("--dataset is required (or --source lake)")
    out = args.out or platform.training.artifact_dir
    if not platform.ray.address:
        summary = train_and_save(platform, values, args.source, args.artifact, out)
    else:
        import ray

        from ray_jobs.runtime import init_ray

        init_ray(platform.ray)
        gpus = 1 if platform.training.use_gpu else 0
        values["device"] = "cuda" if gpus else values.get("device", "cpu")
        task = ray.remote(num_cpus=platform.training.retriever_cpus, num_gpus=gpus)(train_and_save)
        summary = ray.get(task.remote(platform, values, args.source, args.artifact, out))
    print(json.dumps(summary, indent=1))
    return 0


def train_and_save(platform: PlatformConfig, values: dict[str, Any], source: str, artifact: str | None,
                   out: str) -> dict[str, Any]:
    """Train on a dataset file or the lake's sequences and write the artifact; returns what main prints."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="lake-sequences-") as scratch:
        if source == "lake":
            from training.retrieval.lake_sequences import export_retrieval_sequences

            exported = Path(scratch) / f"lake-{datetime.now(UTC):%Y%m%dT%H%M%S}.txt"
            values = {**values, "dataset": str(export_retrieval_sequences(platform, exported))}
        cfg = PipelineConfig(root=str(platform.datasets.root), **values)
        result = run(cfg)
    name = Path(cfg.dataset).name.split(".")[0]
    folder = artifact or storage.join(out, f"nezha-{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    manifest = save(folder, result)
    return {"artifact": folder, "version": manifest.version, "node_id": _ray_node_id(),
            "device": cfg.device, "semantic_ids": result["sid"].stats, **manifest.metrics}


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


if __name__ == "__main__":
    sys.exit(main())
