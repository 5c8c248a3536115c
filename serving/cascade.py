"""Cascade mode (serving.mode=cascade): the Ingress replica retrieves and ranks in process.

A request reads the user once (the Ingress, on the event loop) and hands a `Job` to `Cascade.submit`. One
worker runs the queued jobs in batches of up to `batch_size`, in a thread (torch releases the GIL; the event loop
keeps taking requests, which form the next batch; an idle worker starts a lone job at once): one retrieval call
for the batch, then the candidates' features (`CandidateCache`: numpy takes, no Python per candidate), one
`batch_rows` table and one M-FALCON call. Each job has two futures, `retrieved` and `ranked`, so the Ingress
applies the stage time limit (serving.stage_timeout_s) and the fallbacks of split mode to each stage:
- no retriever model, or no candidate the retriever knows: the job's trending items are its candidates;
- retrieval later than the limit: the Ingress marks the job `retrieval_late`, and the worker ranks the
  trending items instead of what it retrieved (`trending:retriever_unavailable`);
- feature store unavailable for the candidates: default features (`default_features`);
- no ranker model or ranking later than the limit: candidates in retrieval order (the Ingress's fallback).

The models are the ones the Retriever and Ranker deployments' user_config names: the Ingress follows those
deployments (serving.common.SettingsBoard) and loads what they hold with `configure`, in a thread, swapping a
model in only once it is loaded (serving.common.ModelSlot); a batch uses the models it started with.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from features.online import FeatureStoreUnavailable
from serving.channels import merge_candidates
from serving.common import ModelSlot, StageUnavailable, resolve, setting
from serving.lookup import CandidateCache, UserFeatures, batch_rows, default_candidates
from serving.ranker import RankerModel, load_ranker
from serving.retriever import RetrievalChannels, channels_key


@dataclass
class Job:
    """One request's work. `user` None: the store was unavailable (ranked with default features). `n` > 0 asks
    for retrieval of n candidates; `cands` are given candidates (then nothing is retrieved)."""

    user: UserFeatures | None
    user_id: int
    now_ms: int
    n: int = 0
    exclude: set[int] = field(default_factory=set)
    trending: list[tuple[int, float]] = field(default_factory=list)
    quotas: dict[str, int] = field(default_factory=dict)  # retrieval.channels: each channel's share
    cands: list[int] = field(default_factory=list)
    cand_scores: list[float] = field(default_factory=list)
    channels: list[str] = field(default_factory=list)  # the retrieval channel of each candidate
    retrieval_late: bool = False
    retrieved: asyncio.Future | None = None  # -> (candidates, scores, retriever version, fallback reason or None)
    ranked: asyncio.Future | None = None  # -> {"probs", "score", "tasks", "version", "fallback", "timings_ms"}

    def use_trending(self) -> None:
        trend = [(i, s) for i, s in self.trending if i not in self.exclude][: self.n]
        self.cands, self.cand_scores = [i for i, _ in trend], [s for _, s in trend]
        self.channels = ["trending"] * len(self.cands)

    def use_channels(self, lists: dict[str, tuple[list[int], list[float]]]) -> bool:
        """The retrieved channel lists merged with this request's trending items as its candidates; False (and
        nothing changed) when no channel knew the history."""
        if not any(items for items, _ in lists.values()):
            return False
        self.cands, self.cand_scores, self.channels = merge_candidates(lists, self.trending, self.exclude,
                                                                       self.quotas, self.n)
        return True


def _settle(future: asyncio.Future, result: Any = None, error: BaseException | None = None) -> None:
    if not future.done():  # a request that went away leaves its futures to nobody
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class Cascade:
    def __init__(self, args: dict[str, Any], stat_names: tuple[str, ...]):
        self.args, self.stat_names = args, stat_names
        self.retriever, self.ranker = ModelSlot("retriever"), ModelSlot("ranker")
        self.batch_size = 8
        self.candidates: CandidateCache | None = None
        self.item_ttl_s = 0.0
        self.queue: list[Job] = []
        self._wake: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None

    def set_client(self, client) -> None:
        """The online client candidates are read with (None: the store is unavailable)."""
        self.candidates = CandidateCache(client, self.item_ttl_s) if client is not None else None

    async def configure(self, stage: str, uc: dict[str, Any], client, default_weights: dict[str, float]) -> None:
        """Apply a Retriever or Ranker deployment's user_config (the keys those deployments take); a bad value is
        a ValueError naming its key, and changes nothing."""
        threads = setting(uc, "torch_threads", 0, int)
        batch_size, ttl = setting(uc, "batch_size", 8, int), setting(uc, "item_cache_ttl_s", 0.0)
        if batch_size < 1 or ttl < 0 or threads < 0:
            raise ValueError(f"user_config batch_size={batch_size}, item_cache_ttl_s={ttl}, torch_threads={threads}:"
                             " want batch_size >= 1 and the others >= 0")
        if threads:
            torch.set_num_threads(threads)
        if stage == "retriever":
            decoder = uc.get("decoder", "nezha")
            await self.retriever.load(channels_key(uc, self.args), lambda key: RetrievalChannels(*key, decoder))
            return
        artifact = resolve(uc.get("artifact"), self.args)
        self.batch_size = batch_size
        if ttl != self.item_ttl_s or self.candidates is None:
            self.item_ttl_s = ttl
            self.set_client(client)
        await load_ranker(self.ranker, artifact, uc.get("task_weights") or default_weights, uc)

    def submit(self, job: Job) -> Job:
        loop = asyncio.get_running_loop()
        job.retrieved, job.ranked = loop.create_future(), loop.create_future()
        if self._wake is None:
            self._wake = asyncio.Event()
        if self._worker is None or self._worker.done():
            self._worker = loop.create_task(self._work())
        self.queue.append(job)
        self._wake.set()
        return job

    async def _work(self) -> None:
        while True:
            if not self.queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self.queue = self.queue[: self.batch_size], self.queue[self.batch_size:]
            try:
                await self._run(batch)
            except BaseException as err:  # never leave a request waiting on a future nobody settles
                for job in batch:
                    _settle(job.retrieved, error=StageUnavailable(f"cascade: {type(err).__name__}"))
                    _settle(job.ranked, error=StageUnavailable(f"cascade: {type(err).__name__}"))
                if not isinstance(err, Exception):
                    raise

    async def _run(self, batch: list[Job]) -> None:
        retriever, ranker = self.retriever.model, self.ranker.model  # the models the batch started with
        asking = [job for job in batch if job.n > 0]
        t0 = time.perf_counter()
        if asking:
            try:
                got = await asyncio.to_thread(self._retrieve, retriever, asking)
            except Exception:
                got = [None] * len(asking)
            for job, answer in zip(asking, got):
                known = answer is not None and job.use_channels(answer)
                reason = "retriever_unavailable" if answer is None else None if known else "no_known_history"
                _settle(job.retrieved, (job.cands, job.cand_scores, retriever and retriever.version, reason))
        retrieval_ms = round((time.perf_counter() - t0) * 1000, 3)
        if ranker is None:
            for job in batch:
                _settle(job.ranked, error=StageUnavailable(self.ranker.error))
            return
        try:
            results = await asyncio.to_thread(self._rank, ranker, batch)
        except Exception as err:
            for job in batch:
                _settle(job.ranked, error=err)
            return
        for job, result in zip(batch, results):
            result["timings_ms"]["retrieval_model"] = retrieval_ms
            _settle(job.ranked, result)

    @staticmethod
    def _retrieve(model: RetrievalChannels | None, jobs: list[Job]) -> list[dict[str, tuple] | None]:
        """Per job: each channel's (candidates, scores), empty when it knows none of the history; None without
        a model."""
        if model is None:
            return [None] * len(jobs)
        histories = [list(zip(j.user.sequence["item_ids"].tolist(), j.user.sequence["ts"].tolist())) for j in jobs]
        return model.retrieve(histories, [j.now_ms for j in jobs], [j.n for j in jobs], [j.exclude for j in jobs])

    def _rank(self, model: RankerModel, batch: list[Job]) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        users, cands, fallbacks = [], [], []
        for job in batch:
            if job.n > 0 and (job.retrieval_late or not job.cands):
                job.use_trending()  # what the Ingress falls back to: its answer must be ranked instead
            fallback = None
            try:
                if self.candidates is None:
                    raise FeatureStoreUnavailable("no online store")
                cand = self.candidates.get(job.cands)
            except FeatureStoreUnavailable:
                cand, fallback = default_candidates(self.stat_names, job.cands), "default_features"
            users.append(job.user or UserFeatures.default(self.stat_names, job.user_id))
            cands.append(cand)
            fallbacks.append(fallback if job.user is not None else "default_features")
        rows = batch_rows(users, cands, [job.now_ms for job in batch])
        t1 = time.perf_counter()
        probs = model.score(rows)
        t2 = time.perf_counter()
        timings = {"ranking_features": round((t1 - t0) * 1000, 3), "ranking_model": round((t2 - t1) * 1000, 3),
                   "ranking_batch": len(batch)}
        return [{"cands": job.cands, "cand_scores": job.cand_scores, "probs": p, "score": model.combine(p),
                 "tasks": list(model.tasks), "version": model.version, "fallback": fallback,
                 "timings_ms": dict(timings)}
                for job, p, fallback in zip(batch, probs, fallbacks)]

    def versions(self) -> dict[str, str | None]:
        return {"retriever": self.retriever.version, "ranker": self.ranker.version}

    def problems(self) -> list[str]:
        return self.retriever.problems() + self.ranker.problems()


def top(cands: list[int], ranked: dict, k: int) -> list[dict[str, Any]]:
    """The k best of the ranked candidates as response items (plain dicts: no model validation per item)."""
    score = np.asarray(ranked["score"], np.float64)
    order = np.argsort(-score, kind="stable")[:k]
    tasks, probs = ranked["tasks"], np.asarray(ranked["probs"], np.float64)[order].tolist()
    return [{"item_id": int(cands[j]), "score": float(score[j]), "scores": dict(zip(tasks, p))}
            for j, p in zip(order.tolist(), probs)]
