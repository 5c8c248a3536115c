"""The generative-retrieval pipeline for any sequential dataset (a name or a path): leave-one-out split
-> item embeddings (the item table of a dot-product HSTU retriever trained here, or of a saved one,
and/or item attributes) -> semantic IDs -> NEZHA retriever -> artifact. Used by
ray_jobs/train_retriever.py and bench/retrieval.py.

>>> PipelineConfig(dataset="beauty").codebooks
(256, 256, 256)
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from training.artifact import Manifest, load_artifact, save_artifact
from training.retrieval.data import leave_one_out, load_sequences, read_attributes
from training.retrieval.dense import RetrievalTrainConfig, build_retrieval_model, train_retrieval
from training.retrieval.generative import RetrieverTrainConfig, build_nezha, train_retriever
from training.retrieval.semantic_ids import attribute_embeddings, build_semantic_ids, item_embeddings

log = logging.getLogger(__name__)


@dataclass
class PipelineConfig:
    dataset: str
    root: str = "../shared/datasets"
    max_history: int = 50
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"  # "cuda" on a GPU worker (ray_jobs.train_retriever with training.use_gpu)
    # item embeddings
    item_source: str = "model"  # "model" | "attributes" | "both"
    item_model: str | None = None  # artifact folder of a trained dot-product retriever (else one is trained)
    dot_d_model: int = 64
    dot_dropout: float = 0.3
    dot_epochs: int = 60
    dot_patience: int = 4
    dot_minutes: float | None = None
    # semantic IDs
    sid_method: str = "rq-kmeans"
    codebooks: tuple[int, ...] = (256, 256, 256)
    balanced: bool = False
    # generative model
    backbone: str = "hstu"
    d_model: int = 64
    blocks: int = 2
    heads: int = 2
    dropout: float = 0.2
    beam_size: int = 20
    ar_weight: float = 1.0
    # code embeddings / output rows start at the RQ-KMeans centroids (when they are d_model wide)
    init_from_codebooks: bool = True
    epochs: int = 30
    patience: int = 3
    batch_size: int = 256
    lr: float = 1e-3
    minutes: float | None = None
    eval_users: int = 3000
    test_decoders: tuple[str, ...] = ("nezha_step",)
    test_users: int | None = None  # None = every test user
    end_users: int | None = None


def _dot_model(cfg: PipelineConfig, split, out: dict[str, Any]):
    """The dot-product HSTU retriever whose item table is tokenised: loaded, or trained here."""
    if cfg.item_model:
        model, manifest = load_artifact(cfg.item_model)
        if model.num_items != split.num_items:
            raise ValueError(f"{cfg.item_model} has {model.num_items} items, the dataset {split.num_items}")
        out["dot_result"] = {"test": manifest.metrics.get("test", {}), "artifact": str(cfg.item_model)}
        return model
    model, model_config = build_retrieval_model("hstu", split.num_items, d_model=cfg.dot_d_model,
                                                max_len=cfg.max_history + 1, dropout=cfg.dot_dropout, seed=cfg.seed)
    train_cfg = RetrievalTrainConfig(max_epochs=cfg.dot_epochs, patience=cfg.dot_patience, seed=cfg.seed,
                                     num_threads=cfg.threads, device=cfg.device,
                                     max_train_seconds=cfg.dot_minutes * 60 if cfg.dot_minutes else None)
    result = train_retrieval(model, split, train_cfg, name="hstu-dot")
    out["dot_result"] = result.to_dict()
    out["dot_config"] = model_config
    return model


def run(cfg: PipelineConfig) -> dict[str, Any]:
    """Run every stage; returns data, split, dot_model, dot_result, sid, model, model_config, result, seconds."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    out: dict[str, Any] = {"config": asdict(cfg)}
    data = load_sequences(cfg.dataset, cfg.root)
    split = leave_one_out(data, max_len=cfg.max_history + 1)
    out.update(data=data, split=split)
    log.info("%s: %d users, %d items, %d interactions", cfg.dataset, len(data.items), data.num_items,
             data.num_interactions)
    table = attrs = None
    if cfg.item_source in ("model", "both"):
        out["dot_model"] = _dot_model(cfg, split, out)
        table = out["dot_model"].item_embeddings().detach().cpu()
    if cfg.item_source in ("attributes", "both"):
        lists = read_attributes(cfg.dataset, cfg.root, data.item_vocab)
        if lists is None:
            raise FileNotFoundError(f"{cfg.dataset} has no X_item2attributes.json next to it")
        attrs = attribute_embeddings(lists)
    sid = build_semantic_ids(item_embeddings(table, attrs), cfg.sid_method, cfg.codebooks, cfg.balanced,
                             seed=cfg.seed)
    model, model_config = build_nezha(split.num_items, sid, seed=cfg.seed, backbone=cfg.backbone,
                                      d_model=cfg.d_model, num_blocks=cfg.blocks, num_heads=cfg.heads,
                                      max_history=cfg.max_history, dropout=cfg.dropout, beam_size=cfg.beam_size,
                                      ar_weight=cfg.ar_weight)
    if cfg.init_from_codebooks:
        if sid.codebooks is not None and sid.codebooks[0].shape[1] == cfg.d_model:
            model.init_from_codebooks(sid.codebooks)
        else:  # RQ-VAE latents, or attributes concatenated: no centroids in the model's space
            log.warning("init_from_codebooks skipped: the tokeniser's centroids are not %d-wide (%s, item source %s)",
                        cfg.d_model, cfg.sid_method, cfg.item_source)
    train_cfg = RetrieverTrainConfig(batch_size=cfg.batch_size, lr=cfg.lr, max_epochs=cfg.epochs,
                                     patience=cfg.patience, eval_users=cfg.eval_users, seed=cfg.seed,
                                     num_threads=cfg.threads, device=cfg.device,
                                     test_decoders=tuple(cfg.test_decoders),
                                     test_users=cfg.test_users, end_users=cfg.end_users,
                                     max_train_seconds=cfg.minutes * 60 if cfg.minutes else None)
    result = train_retriever(model, split, train_cfg)
    out.update(sid=sid, model=model, model_config=model_config, result=result,
               seconds=time.perf_counter() - t0)
    return out


def save(folder: str | Path, out: dict[str, Any]) -> Manifest:
    """Write the retriever of a `run` as an artifact (semantic-ID table included)."""
    data, result, cfg = out["data"], out["result"], out["config"]
    metadata = {"dataset": cfg["dataset"], "item_ids": data.item_vocab[1:].tolist(),
                "max_history": cfg["max_history"], "semantic_ids": out["sid"].stats,
                "protocol": "leave-one-out, full catalogue (every valid semantic ID), no exclusion",
                "pipeline": {k: v for k, v in cfg.items() if k != "root"}}
    metrics = {"test": result.test, "valid": result.valid, "best_epoch": result.best_epoch, "epochs": result.epochs}
    if "dot_result" in out:
        metrics["item_embedding_model"] = {"test": out["dot_result"].get("test", {})}
    name = f"nezha-{Path(cfg['dataset']).name.split('.')[0]}"
    return save_artifact(folder, out["model"].cpu(), out["model_config"], metadata, metrics, name=name,
                         semantic_ids=out["sid"].table)
