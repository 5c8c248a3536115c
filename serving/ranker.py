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
from serving.common import ModelSlot, StageDeployment, StageUnavailable, platform_config, resolve
from serving.lookup import CandidateCache, UserFeatures, batch_rows, default_candidates
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


async def load_ranker(slot: ModelSlot, artifact: str | None, weights: dict[str, float] | None,
                      uc: dict[str, Any]) -> None:
    """A Ranker user_config's model into `slot`: the same artifact only changes the task weights."""
    if artifact is not None and artifact == slot.artifact and slot.model is not None:
        slot.model.set_weights(weights)
    await slot.load(artifact, lambda path: RankerModel(path, weights, int(uc.get("micro_batch", 256)),
                                                       int(uc.get("cache_size", 4096))))


@serve.deployment
class Ranker(StageDeployment):
    """Reads the candidates' features (its own online client: one hop less per request) and scores them.

    Concurrent requests are batched with `@serve.batch` (one encode and one M-FALCON call for the batch).
    user_config: artifact, task_weights, micro_batch, cache_size, batch_size, batch_wait_timeout_s,
    torch_threads, item_cache_ttl_s (candidates' stats kept that long: see serving.lookup.CandidateCache), overrides
    (config overrides, e.g. another online store). A new artifact is loaded in a
    thread and swapped in: requests keep being answered by the old model meanwhile, each response names the
    version that scored it. In cascade mode (serving.mode) it loads nothing: the Ingress replicas follow its
    user_config (`follow`) and rank in process (serving.cascade)."""

    stage, does, default_batch_size = "ranker", "ranks", 8

    def __init__(self, args: dict[str, Any] | None = None):
        self.args = args or {}
        self.cfg = platform_config(self.args)
        self._init_stage(self.cfg.serving.mode == "cascade")
        self.stat_names = FeatureStoreSpec.from_config(self.cfg.features).stat_names
        self.client: OnlineFeatureClient | None = None
        self.candidates: CandidateCache | None = None
        self.store_error: str | None = None
        self.overrides: list[str] | None = None

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        uc = user_config or {}
        if self._published(uc):
            return
        overrides = list(uc.get("overrides") or [])
        item_ttl_s = float(uc.get("item_cache_ttl_s", 0.0))
        if overrides != self.overrides or self.client is None:
            self.overrides = overrides
            self.cfg = platform_config(self.args, overrides)
            try:
                self.client, self.store_error = OnlineFeatureClient(self.cfg), None
            except FeatureStoreUnavailable as err:
                self.client, self.store_error = None, type(err).__name__
                log.error("ranker: online store unavailable: %s", err)
            self.candidates = CandidateCache(self.client, item_ttl_s) if self.client is not None else None
        elif self.candidates is not None and self.candidates.ttl_s != item_ttl_s:
            self.candidates = CandidateCache(self.client, item_ttl_s)
        weights = uc.get("task_weights") or self.cfg.serving.task_weights
        await load_ranker(self.slot, resolve(uc.get("artifact"), self.args), weights, uc)

    async def rank(self, user_id: int, item_ids: list[int], request_ts_ms: int,
                   user: UserFeatures | None = None) -> dict[str, Any]:
        """`user`: the user's features as the caller read them (then not read again), else read here."""
        if self.slot.model is None:
            raise StageUnavailable(self.slot.error)
        self.batch_wait.before_request()
        return await self._batched((int(user_id), list(item_ids), int(request_ts_ms), user))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """Concurrent requests share one forward: M-FALCON prefills their histories together. The batch runs
        in a thread, so the event loop keeps taking requests meanwhile: they form the next batch."""
        # One model for the whole batch, even if a new one is swapped in meanwhile.
        return await self.batch_wait.run(self._rank_batch, self.slot.model, requests)

    def _rank_batch(self, model: RankerModel, requests: list[tuple]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        users, cands, fallbacks = [], [], []
        for user_id, item_ids, _, user in requests:
            fallback = None
            try:
                if self.client is None or self.candidates is None:
                    raise FeatureStoreUnavailable(self.store_error or "no online store")
                if user is None:
                    user = UserFeatures.read(self.client, user_id)
                cand = self.candidates.get(item_ids)
            except FeatureStoreUnavailable:
                # Rank anyway, as for an unknown user with unknown items: better than no ranking at all.
                user = UserFeatures.default(self.stat_names, user_id)
                cand, fallback = default_candidates(self.stat_names, item_ids), "default_features"
            users.append(user)
            cands.append(cand)
            fallbacks.append(fallback)
        rows = batch_rows(users, cands, [r[2] for r in requests])
        t1 = time.perf_counter()
        probs = model.score(rows)
        t2 = time.perf_counter()
        timings = {"ranking_features": round((t1 - t0) * 1000, 3), "ranking_model": round((t2 - t1) * 1000, 3),
                   "ranking_batch": len(requests)}
        return [{"probs": p.tolist(), "score": model.combine(p).tolist(), "tasks": list(model.tasks),
                 "version": model.version, "fallback": fallback, "timings_ms": timings}
                for p, fallback in zip(probs, fallbacks)]

    async def check(self) -> list[str]:
        if self.board is not None:  # the Ingress replicas report the models they load
            return []
        problems = self.slot.problems()
        if self.client is None:
            problems.append(f"ranker: feature store unavailable ({self.store_error})")
        return problems

