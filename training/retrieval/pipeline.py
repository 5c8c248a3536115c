"""The retrieval pipeline for any sequential dataset (a name or a path): leave-one-out split -> the dense
retriever (trained here with `retrieval.dense`, or a saved one) -> item embeddings (its item table and / or
item attributes) -> semantic IDs -> the NEZHA retriever (`retrieval.generative`; the dense model is its teacher
when `distill_weight` > 0) -> artifact. Used by
ray_jobs/train_retriever.py, the demo and bench/retrieval.py; every knob is in the platform config's
`retrieval` section (config/schema.py).

>>> from config.schema import RetrievalConfig
>>> RunOptions(dataset="beauty").test_decoders, RetrievalConfig().generative.codebooks
(('nezha_step',), [256])
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from config.schema import RetrievalConfig
from training.artifact import Manifest, load_artifact, save_artifact
from training.retrieval.data import leave_one_out, load_sequences, read_attributes
from training.retrieval.dense import RetrievalTrainConfig, build_retrieval_model, train_retrieval
from training.retrieval.generative import RetrieverTrainConfig, build_nezha, train_retriever
from training.retrieval.semantic_ids import (
    attribute_embeddings,
    build_semantic_ids,
    item_embeddings,
    principal_components,
)

log = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Where and how one run executes (the model knobs are in `RetrievalConfig`)."""

    dataset: str
    root: str = "../shared/datasets"
    item_model: str | None = None  # artifact folder of a trained dense retriever (else one is trained)
    seed: int = 0
    threads: int | None = 1
    device: str = "cpu"  # "cuda" on a GPU worker (ray_jobs.train_retriever with training.use_gpu)
    test_decoders: tuple[str, ...] = ("nezha_step",)
    test_users: int | None = None  # None = every test user
    end_users: int | None = None


def dense_train_config(cfg: RetrievalConfig, opts: RunOptions) -> RetrievalTrainConfig:
    """The dense section as the trainer's recipe."""
    d = cfg.dense
    return RetrievalTrainConfig(batch_size=d.batch_size, lr=d.lr, max_epochs=d.max_epochs, patience=d.patience,
                                eval_every=d.eval_every, softmax=d.softmax, num_negatives=d.num_negatives,
                                refit_with_validation=d.refit_with_validation,
                                seed=opts.seed, num_threads=opts.threads, device=opts.device,
                                max_train_seconds=d.max_minutes * 60 if d.max_minutes else None)


def build_dense(cfg: RetrievalConfig, num_items: int, seed: int = 0):
    """An untrained dense retriever of the configured shape and its constructor kwargs."""
    d = cfg.dense
    return build_retrieval_model(d.model, num_items, d_model=d.d_model, num_blocks=d.blocks, num_heads=d.heads,
                                 max_len=cfg.max_history + 1, dropout=d.dropout, similarity=d.similarity, seed=seed)


def _dense_models(cfg: RetrievalConfig, opts: RunOptions, split, out: dict[str, Any]):
    """The dense retriever whose item table is tokenised (loaded, or trained here) and, when it was refitted on the
    validation items, the weights validation selected before that refit (else None)."""
    if opts.item_model:
        model, manifest = load_artifact(opts.item_model)
        if model.num_items != split.num_items:
            raise ValueError(f"{opts.item_model} has {model.num_items} items, the dataset {split.num_items}")
        out["dense_result"] = {"test": manifest.metrics.get("test", {}), "artifact": str(opts.item_model)}
        try:
            selected, _ = load_artifact(opts.item_model, weights="selected")
        except ValueError as err:  # not refitted (nothing leaks), or saved before selected weights were kept
            selected = None
            log.warning("%s; if that model was refitted on the validation items, NEZHA's validation is optimistic",
                        err)
        return model, selected
    model, model_config = build_dense(cfg, split.num_items, opts.seed)
    result = train_retrieval(model, split, dense_train_config(cfg, opts), name=f"dense-{cfg.dense.model}")
    out["dense_result"] = result.to_dict()
    out["dense_config"], out["dense_selected_state"] = model_config, result.selected_state
    selected = None
    if result.selected_state is not None:
        selected = build_dense(cfg, split.num_items, opts.seed)[0]
        selected.load_state_dict(result.selected_state)
        selected.eval()
    return model, selected


def _item_table(dense, width: int) -> torch.Tensor:
    """The dense retriever's item table at NEZHA's width."""
    table = dense.item_embeddings().detach().cpu()
    if table.shape[1] > width:
        # Choice: a dense table wider than NEZHA (256 against 64 by default) is tokenised in its top d_model
        # principal directions, so the centroids the code embeddings start at and the history item embeddings
        # live in NEZHA's width (without this both inits would be skipped).
        return principal_components(table, width)
    # Choice: a narrower table (a 128-wide NEZHA over the 64-wide default) is zero-padded to NEZHA's width.
    # Distances, hence the semantic IDs, are unchanged; the centroids and history item rows then fill the
    # first dims and the rest start at zero and are learned, so a larger backbone keeps both inits.
    return torch.nn.functional.pad(table, (0, width - table.shape[1]))


def _nezha(cfg: RetrievalConfig, opts: RunOptions, num_items: int, dense, attrs: torch.Tensor | None):
    """Semantic IDs of `dense`'s item table (and / or the attributes) and a NEZHA retriever started from them."""
    g = cfg.generative
    table = _item_table(dense, g.d_model) if g.item_source in ("model", "both") else None
    sid = build_semantic_ids(item_embeddings(table, attrs), g.sid_method, tuple(g.codebooks), g.balanced,
                             seed=opts.seed)
    model, model_config = build_nezha(num_items, sid, seed=opts.seed, backbone=g.backbone, d_model=g.d_model,
                                      num_blocks=g.blocks, num_heads=g.heads, max_history=cfg.max_history,
                                      dropout=g.dropout, beam_size=g.beam_size, ar_weight=g.ar_weight,
                                      item_embeddings=g.history_item_embeddings, draft_cell=g.draft_cell,
                                      item_head=g.item_head)
    if g.init_from_codebooks:
        if sid.codebooks is not None and sid.codebooks[0].shape[1] == g.d_model:
            model.init_from_codebooks(sid.codebooks)
        else:  # RQ-VAE latents, or attributes concatenated: no centroids in the model's space
            log.warning("init_from_codebooks skipped: the tokeniser's centroids are not %d-wide (%s, item source %s)",
                        g.d_model, g.sid_method, g.item_source)
    if g.history_item_embeddings:
        if table is not None:
            # Unit rows, as the tokeniser saw them: the code embeddings start at its centroids, so the residual
            # is taken at their scale whatever the dense model's similarity (a dot table's norms are not 1).
            model.init_from_item_table(torch.nn.functional.normalize(table, dim=1))
        else:
            log.warning("history item embeddings start at zero: no dense item table to start from")
    if g.item_head:
        if table is not None:
            model.init_item_head(table)  # the dense model's own rows: a dot-product table's norms carry popularity
        else:
            log.warning("the item head starts at random: no dense item table to start from")
    return model, model_config, sid


def run(cfg: RetrievalConfig, opts: RunOptions) -> dict[str, Any]:
    """Every stage; returns data, split, dense_model, dense_result, sid, model, model_config, result, seconds.

    With a refit (`refit_with_validation`) and a dense retriever that was refitted too, validation selects NEZHA's
    epochs on a NEZHA built from, and distilling, the dense model's selected weights (which never trained on the
    validation items), and the refit trains one built from the refitted dense model: the dense model's own protocol.
    Otherwise one model is selected and refitted (its validation optimistic when its teacher saw the items)."""
    if opts.threads:
        torch.set_num_threads(opts.threads)
    t0 = time.perf_counter()
    g = cfg.generative
    out: dict[str, Any] = {"config": cfg.model_dump(), "options": asdict(opts)}
    data = load_sequences(opts.dataset, opts.root)
    split = leave_one_out(data, max_len=cfg.max_history + 1)
    out.update(data=data, split=split)
    log.info("%s: %d users, %d items, %d interactions", opts.dataset, len(data.items), data.num_items,
             data.num_interactions)
    dense = selected = attrs = None
    if g.item_source in ("model", "both") or g.distill_weight > 0:  # the tokeniser's table and / or the teacher
        dense, selected = _dense_models(cfg, opts, split, out)
        out["dense_model"] = dense
    if g.item_source in ("attributes", "both"):
        lists = read_attributes(opts.dataset, opts.root, data.item_vocab)
        if lists is None:
            raise FileNotFoundError(f"{opts.dataset} has no X_item2attributes.json next to it")
        attrs = attribute_embeddings(lists)
    model, model_config, sid = _nezha(cfg, opts, split.num_items, dense, attrs)
    refit = final = None
    if g.refit_with_validation and selected is not None:
        refit, final = (model, dense), (model, model_config, sid)
        model, model_config, sid = _nezha(cfg, opts, split.num_items, selected, attrs)
    train_cfg = RetrieverTrainConfig(batch_size=g.batch_size, lr=g.lr, max_epochs=g.max_epochs, patience=g.patience,
                                     eval_users=g.eval_users, seed=opts.seed, num_threads=opts.threads,
                                     device=opts.device, test_decoders=tuple(opts.test_decoders),
                                     test_users=opts.test_users, end_users=opts.end_users,
                                     refit_with_validation=g.refit_with_validation,
                                     distill_weight=g.distill_weight, distill_temperature=g.distill_temperature,
                                     max_train_seconds=g.max_minutes * 60 if g.max_minutes else None)
    result = train_retriever(model, split, train_cfg, teacher=selected if refit else dense, refit=refit)
    if final is not None and result.refit:  # else nothing was selected: the selection's own model stays
        model, model_config, sid = final
    out.update(sid=sid, model=model, model_config=model_config, result=result,
               seconds=time.perf_counter() - t0)
    return out


def save_dense(folder: str | Path, model, model_config: dict[str, Any], result: dict[str, Any], dataset: str,
               item_vocab, retrieval: dict[str, Any], selected_state: dict[str, Any] | None = None) -> Manifest:
    """Write a dense retriever (`result`: its TrainResult as a dict) as an artifact: serving's dense channel.
    `selected_state`: the weights validation selected before the refit (the NEZHA pipeline's honest teacher)."""
    metadata = {"dataset": dataset, "max_len": retrieval["max_history"] + 1, "item_vocab": item_vocab.tolist(),
                "protocol": "leave-one-out, full-catalogue ranking", "retrieval": retrieval}
    metrics = {k: result[k] for k in ("test", "valid", "best_epoch", "epochs", "stopped", "train_seconds")}
    kind = retrieval["dense"]["model"]
    name = f"{kind}-{Path(dataset).name.split('.')[0]}"
    return save_artifact(folder, model.cpu(), model_config, metadata, metrics, name=name,
                         selected_weights=selected_state)


def save(folder: str | Path, out: dict[str, Any], dense_folder: str | Path | None = None) -> Manifest:
    """Write the retriever of a `run` as an artifact (semantic-ID table included); with `dense_folder`, also the
    dense retriever the run trained (the dense channel; nothing when it was loaded with `item_model`)."""
    data, result, cfg, opts = out["data"], out["result"], out["config"], out["options"]
    metadata = {"dataset": opts["dataset"], "item_ids": data.item_vocab[1:].tolist(),
                "max_history": cfg["max_history"], "semantic_ids": out["sid"].stats,
                "protocol": "leave-one-out, full catalogue (every valid semantic ID), no exclusion",
                "retrieval": cfg, "options": {k: v for k, v in opts.items() if k != "root"}}
    metrics = {"test": result.test, "valid": result.valid, "best_epoch": result.best_epoch, "epochs": result.epochs}
    if "dense_result" in out:
        metrics["item_embedding_model"] = {"test": out["dense_result"].get("test", {})}
    name = f"nezha-{Path(opts['dataset']).name.split('.')[0]}"
    if dense_folder is not None and "dense_config" in out:
        save_dense(dense_folder, out["dense_model"], out["dense_config"], out["dense_result"], opts["dataset"],
                   data.item_vocab, cfg, out.get("dense_selected_state"))
    return save_artifact(folder, out["model"].cpu(), out["model_config"], metadata, metrics, name=name,
                         semantic_ids=out["sid"].table)
