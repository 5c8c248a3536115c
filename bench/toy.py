"""Small ranker and retriever artifacts (a few optimiser steps on random data) for tests, benchmarks, smoke runs.

They have the real artifact layout (training.artifact) and metadata serving reads, so everything downstream
of training is exercised without training for real. Scores carry no signal: do not read quality into them.

    python -m bench.toy --out data/artifacts --items 2000 --users 5000 --authors 500
    python -m ray_jobs.deploy --ranker data/artifacts/toy-ranker --retriever data/artifacts/toy-retriever

>>> import tempfile, config
>>> d = tempfile.mkdtemp()
>>> ranker_artifact(d + "/r", config.load(), num_users=9, num_items=30, num_authors=4).model_class
'GenRank'
>>> retriever_artifact(d + "/q", list(range(1, 31))).metadata["item_vocab"][:3]
[0, 1, 2]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from config.schema import TrainingConfig
from features.samples import ranking_tasks
from features.spec import FeatureStoreSpec
from models.hstu import HSTUConfig
from models.inputs import random_ranking_inputs
from models.retrieval import HSTURetrieval
from training.artifact import Manifest, save_artifact
from training.ranking_batch import RankingFeatures
from training.ranking_models import RANKERS, build_ranker


def ranker_artifact(folder: str | Path, cfg, *, num_users: int, num_items: int, num_authors: int,
                    kind: str = "genrank", max_hist_len: int = 32, d_model: int = 32, steps: int = 3,
                    seed: int = 0, name: str | None = None) -> Manifest:
    """A ranker of `kind` (training.ranking_models.RANKERS: genrank takes serving's M-FALCON path, dlrm its plain
    forward) over the live-stream tasks of `cfg`'s features."""
    torch.manual_seed(seed)
    stat_names = FeatureStoreSpec.from_config(cfg.features).stat_names
    tasks = ranking_tasks("livestream")
    feats = RankingFeatures(kind="livestream", tasks=tasks, stat_names=stat_names, num_users=num_users,
                            num_items=num_items, num_authors=num_authors, max_hist_len=max_hist_len)
    model, config = build_ranker(kind, feats, TrainingConfig(model=kind, d_model=d_model, num_heads=2, embed_dim=16,
                                                              dropout=0.0, max_hist_len=max_hist_len))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):  # a few steps so the weights are not the initialisation
        inp = random_ranking_inputs(batch_size=8, hist_len=max_hist_len, num_candidates=8, num_items=num_items,
                                    num_authors=max(num_authors, 1), num_users=num_users,
                                    num_actions=feats.num_actions, item_dense_dim=feats.item_dense_dim,
                                    user_dense_dim=feats.user_dense_dim, generator=g)
        labels = torch.randint(0, 2, (*inp.cand_item_ids.shape, len(tasks)), generator=g).float()
        opt.zero_grad()
        out = model.loss(inp, labels)
        (out[0] if isinstance(out, tuple) else out).backward()
        opt.step()
    model.eval()
    metadata = {"ranking_features": feats.to_dict(), "tasks": list(tasks), "toy": True}
    return save_artifact(folder, model, config, metadata, {"toy": True}, name=name or f"toy-{kind}")


def retriever_artifact(folder: str | Path, item_ids: list[int], *, max_len: int = 64, d_model: int = 32,
                       steps: int = 3, seed: int = 0, name: str = "toy-hstu") -> Manifest:
    """An HSTURetrieval over `item_ids` (dense id i+1 = item_ids[i]; metadata item_vocab, as train_retrieval)."""
    torch.manual_seed(seed)
    cfg = HSTUConfig(d_model=d_model, num_blocks=1, num_heads=1, d_qk=d_model, d_v=d_model, max_len=max_len,
                     dropout=0.0)
    n = len(item_ids)
    model = HSTURetrieval(cfg, num_items=n)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(1, n + 1, (8, max_len), generator=g)
        ts = torch.cumsum(torch.randint(1, 600, (8, max_len), generator=g), dim=1)
        opt.zero_grad()
        model.loss(ids, ts, torch.full((8,), max_len), num_negatives=16, generator=g).backward()
        opt.step()
    model.eval()
    metadata = {"item_vocab": [0, *map(int, item_ids)], "max_len": max_len, "toy": True}
    return save_artifact(folder, model, {"cfg": cfg, "num_items": n}, metadata, {"toy": True}, name=name)


def main(argv: list[str] | None = None) -> int:
    import config

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--out", default="data/artifacts")
    parser.add_argument("--items", type=int, default=2000, help="item ids 1..items")
    parser.add_argument("--users", type=int, default=5000)
    parser.add_argument("--authors", type=int, default=500)
    parser.add_argument("--ranker", default="genrank", choices=list(RANKERS))
    args = parser.parse_args(argv)
    cfg = config.from_args(args)
    out = Path(args.out)
    r = ranker_artifact(out / f"toy-{args.ranker}", cfg, num_users=args.users, num_items=args.items,
                        num_authors=args.authors, kind=args.ranker)
    q = retriever_artifact(out / "toy-retriever", list(np.arange(1, args.items + 1)))
    print(f"ranker {r.folder} ({r.version})\nretriever {q.folder} ({q.version})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
