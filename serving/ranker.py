"""Ranking: candidates + online features -> per-task probabilities and one weighted score.

`RankerModel` loads a ranking artifact (metadata "ranking_features" = `RankingFeatures.to_dict()`, "tasks"):
sequence rankers (GenRank, HSTURanking) are scored with M-FALCON (prefill the history once, candidates in
micro-batches, per-user prefill cache); other rankers (DLRM, Zenith) with their forward on all candidates at
once. Inputs come from `serving.features.ranking_rows` + `training.ranking_batch.encode`, the conversion
training uses. Score = sum over tasks of weight * sigmoid(logit) (serving.task_weights or the deployment's
user_config task_weights; empty = every task weighs 1).

    m = RankerModel("data/artifacts/ranker"); [probs] = m.score(ranking_rows(features, now_ms)); m.combine(probs)
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from ray import serve

from features.online import FeatureStoreUnavailable, OnlineFeatureClient
from features.spec import FeatureStoreSpec
from models.heads import SequenceRanker
from models.mfalcon import MFalconScorer
from serving.common import BusyBatchWait, StageUnavailable, load_failed, platform_config, resolve
from serving.lookup import default_features, ranking_rows
from training.artifact import load_artifact
from training.ranking_batch import RankingFeatures, encode

log = logging.getLogger("ray.serve")


class RankerModel:
    def __init__(self, folder: str, task_weights: dict[str, float] | None = None, micro_batch: int = 256,
                 cache_size: int = 4096):
        self.model, manifest = load_artifact(folder)
        self.version = manifest.version
        meta = manifest.metadata
        if "ranking_features" not in meta:
            raise ValueError(f"{folder}: metadata lacks ranking_features (not a ranking artifact)")
        self.feats = RankingFeatures.from_dict(meta["ranking_features"])
        self.tasks = tuple(meta.get("tasks") or self.feats.tasks)
        self.set_weights(task_weights)
        self.scorer = (MFalconScorer(self.model, micro_batch=micro_batch, cache_size=cache_size)
                       if isinstance(self.model, SequenceRanker) else None)

    def set_weights(self, task_weights: dict[str, float] | None) -> None:
        unknown = set(task_weights or {}) - set(self.tasks)
        if unknown:
            raise ValueError(f"task_weights name unknown tasks {sorted(unknown)}; the model has {list(self.tasks)}")
        self.weights = np.array([(task_weights or {}).get(t, 0.0) if task_weights else 1.0 for t in self.tasks])

    @torch.no_grad()
    def score(self, rows: pa.Table) -> list[np.ndarray]:
        """Per request row, the [C, T] task probabilities of its candidates (all rows in one forward)."""
        counts = pc.list_value_length(rows["cand_item_ids"]).to_pylist()
        if not any(counts):
            return [np.zeros((0, len(self.tasks))) for _ in counts]
        inputs = encode(rows, self.feats)
        logits = self.scorer.score(inputs) if self.scorer is not None else self.model(inputs)
        probs = torch.sigmoid(logits.float()).numpy().astype(np.float64)
        return [probs[r, :n] for r, n in enumerate(counts)]

    def combine(self, probs: np.ndarray) -> np.ndarray:
        return probs @ self.weights


@serve.deployment
class Ranker:
    """Reads the candidates' features (its own online client: one hop less per request) and scores them.

    Concurrent requests are batched with `@serve.batch` (one encode and one M-FALCON call for the batch).
    user_config: artifact, task_weights, micro_batch, cache_size, batch_size, batch_wait_timeout_s,
    torch_threads, item_cache_ttl_s (candidates' stats kept that long: see features.online), overrides
    (config overrides, e.g. another online store). A new artifact is loaded in a
    thread and swapped in: requests keep being answered by the old model meanwhile, each response names the
    version that scored it."""

    def __init__(self, args: dict[str, Any] | None = None):
        self.args = args or {}
        self.cfg = platform_config(self.args)
        self.stat_names = FeatureStoreSpec.from_config(self.cfg.features).stat_names
        self.model: RankerModel | None = None
        self.artifact: str | None = None
        self.error: str | None = "no ranker artifact configured"
        self.client: OnlineFeatureClient | None = None
        self.store_error: str | None = None
        self.overrides: list[str] | None = None
        self.batch_wait = BusyBatchWait(self._batched)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        uc = user_config or {}
        if uc.get("torch_threads"):  # Serve's defaults leave torch on all cores; one thread scales better
            torch.set_num_threads(int(uc["torch_threads"]))
        self.batch_wait.configure(uc, default_size=8)
        overrides = list(uc.get("overrides") or [])
        item_ttl_s = float(uc.get("item_cache_ttl_s", 0.0))
        if overrides != self.overrides or self.client is None or item_ttl_s != self.client.item_ttl_s:
            self.overrides = overrides
            self.cfg = platform_config(self.args, overrides)
            try:
                self.client, self.store_error = OnlineFeatureClient(self.cfg, item_ttl_s=item_ttl_s), None
            except FeatureStoreUnavailable as err:
                self.client, self.store_error = None, type(err).__name__
                log.error("ranker: online store unavailable: %s", err)
        weights = uc.get("task_weights") or self.cfg.serving.task_weights
        artifact = resolve(uc.get("artifact"), self.args)
        if artifact is None:
            self.model, self.artifact, self.error = None, None, "no ranker artifact configured"
            return
        if artifact == self.artifact and self.model is not None:
            # Back to the artifact it serves (a rollback after a failed load): that load's error is over.
            self.model.set_weights(weights)
            self.error = None
            return
        try:
            model = await asyncio.to_thread(RankerModel, artifact, weights, int(uc.get("micro_batch", 256)),
                                            int(uc.get("cache_size", 4096)))
        except Exception as err:  # keep serving what is loaded (or nothing): /healthz says so, the log says why
            self.error = load_failed(err)
            log.error("ranker artifact %s: %s", artifact, err)
            return
        self.model, self.artifact, self.error = model, artifact, None

    async def rank(self, user_id: int, item_ids: list[int], request_ts_ms: int) -> dict[str, Any]:
        if self.model is None:
            raise StageUnavailable(self.error)
        self.batch_wait.before_request()
        return await self._batched((int(user_id), list(item_ids), int(request_ts_ms)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[tuple[int, list[int], int]]) -> list[dict[str, Any]]:
        """Concurrent requests share one forward: M-FALCON prefills their histories together. The batch runs
        in a thread, so the event loop keeps taking requests meanwhile: they form the next batch."""
        # One model for the whole batch, even if a new one is swapped in meanwhile.
        return await self.batch_wait.run(self._rank_batch, self.model, requests)

    def _rank_batch(self, model: RankerModel, requests: list[tuple[int, list[int], int]]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        rows, fallbacks = [], []
        for user_id, item_ids, request_ts_ms in requests:
            fallback = None
            try:
                if self.client is None:
                    raise FeatureStoreUnavailable(self.store_error or "no online store")
                features = self.client.get(user_id, item_ids)
            except FeatureStoreUnavailable:
                # Rank anyway, as for an unknown user with unknown items: better than no ranking at all.
                features, fallback = default_features(self.stat_names, user_id, item_ids), "default_features"
            rows.append(ranking_rows(features, request_ts_ms))
            fallbacks.append(fallback)
        t1 = time.perf_counter()
        probs = model.score(pa.concat_tables(rows))
        t2 = time.perf_counter()
        timings = {"ranking_features": round((t1 - t0) * 1000, 3), "ranking_model": round((t2 - t1) * 1000, 3),
                   "ranking_batch": len(requests)}
        return [{"probs": p.tolist(), "score": model.combine(p).tolist(), "tasks": list(model.tasks),
                 "version": model.version, "fallback": fallback, "timings_ms": timings}
                for p, fallback in zip(probs, fallbacks)]

    async def check(self) -> list[str]:
        problems = [] if self.model is not None and self.error is None else [f"ranker: {self.error}"]
        if self.client is None:
            problems.append(f"ranker: feature store unavailable ({self.store_error})")
        return problems

    async def loaded(self) -> dict[str, str | None]:
        """The version of the model answering now (a failed reload leaves the old one)."""
        return {"version": self.model.version if self.model else None}
