"""Stage entrypoint: train a generative (semantic-ID, NEZHA-decoded) retriever on any sequential dataset
and save the artifact serving loads.

    python -m ray_jobs.train_retriever --dataset beauty
    python -m ray_jobs.train_retriever --dataset /data/MyShop.inter.json --item-source both --epochs 10
    python -m ray_jobs.train_retriever --dataset games --item-model data/artifacts/hstu-games-...

`--dataset` is a name (beauty, sports, yelp, games, nezha-beauty, ml-1m) under `datasets.root` or a
path to a `.txt` (user item item ...), `.dat` or LETTER `.inter.json` file. Every stage option is a
flag named after training.retriever_pipeline.PipelineConfig (tuples comma-separated). Writes
`<out>/nezha-<dataset>-<UTC time>/` (or exactly `--artifact`; training.artifact, with
semantic_ids.safetensors) and prints its metrics. `--source lake` trains on the configured lake's
`samples_retrieval` (the platform's own users) instead of a dataset file. Plain PyTorch in the driver:
runs locally and unchanged under `ray job submit`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

import config
from training.retriever_pipeline import PipelineConfig, run, save


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--out", default="data/artifacts", help="folder that receives the artifact folder")
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
    if args.source == "lake":
        from training.lake_sequences import export_retrieval_sequences

        exported = Path(args.out) / "_lake_sequences" / f"{datetime.now(UTC):%Y%m%dT%H%M%S}.txt"
        values["dataset"] = str(export_retrieval_sequences(platform, exported))
    elif not values["dataset"]:
        _parser().error("--dataset is required (or --source lake)")
    cfg = PipelineConfig(root=str(platform.datasets.root), **values)
    out = run(cfg)
    name = Path(cfg.dataset).name.split(".")[0]
    folder = Path(args.artifact) if args.artifact else (
        Path(args.out) / f"nezha-{name}-{datetime.now(UTC):%Y%m%dT%H%M%SZ}")
    manifest = save(folder, out)
    print(json.dumps({"artifact": str(folder), "version": manifest.version, "semantic_ids": out["sid"].stats,
                      **manifest.metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
