"""Candidate retrieval: an adapter over any retriever artifact, and the batched Ray Serve deployment.

`RetrieverModel` loads an artifact and answers "the k best unseen items after this history" in raw item ids:
- a model with `retrieve(history, lengths, k, decoder=, exclude=)` (the NEZHA generative retriever) is asked
  directly, with its decoder;
- otherwise (HSTURetrieval, SASRec: `score_all`-style dot-product retrievers) the history gets a target slot at
  the request time, as in training (training/retrieval/dense.py `score_next_items`: the slot lends its time as the
  last token's query time), every catalogue item is scored at the last history state, seen items are masked
  and the top k taken.
Dense ids map to raw ids through metadata `item_ids` (NEZHA: dense id i at index i-1) or `item_vocab`
(dot-product retrievers: index = dense id, 0 = padding). Raw ids outside the vocabulary are dropped from the
history; a history with nothing left raises `StageUnavailable` (the ingress then serves trending items).

    m = RetrieverModel("data/artifacts/retriever"); m.retrieve([[(3, 1767571200000)]], [now_ms], [10], [set()])
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from ray import serve

from serving.common import StageDeployment, StageUnavailable, platform_config, resolve
from training.artifact import load_artifact


class RetrieverModel:
    def __init__(self, folder: str, decoder: str = "nezha"):
        self.model, manifest = load_artifact(folder)
        self.version = manifest.version
        self.decoder = decoder
        meta = manifest.metadata
        if "item_ids" in meta:
            vocab = np.r_[0, np.asarray(meta["item_ids"], np.int64)]
        elif "item_vocab" in meta:
            vocab = np.asarray(meta["item_vocab"], np.int64)
        else:
            raise ValueError(f"{folder}: metadata has neither item_ids nor item_vocab")
        self.vocab = vocab  # dense id -> raw id
        self.dense = {int(raw): i for i, raw in enumerate(vocab.tolist()) if i > 0}
        cfg = getattr(self.model, "cfg", None)
        self.max_len = int(meta.get("max_len") or getattr(cfg, "max_len", 0) or 200)
        self.generative = callable(getattr(self.model, "retrieve", None))

    @torch.no_grad()
    def retrieve(self, histories: list[list[tuple[int, int]]], now_ms: list[int], ks: list[int],
                 excludes: list[set[int]]) -> list[tuple[list[int], list[float]]]:
        """Per request: (raw item, ts ms) history oldest first -> (raw items, scores), best first."""
        hist = [[(self.dense[i], t) for i, t in h if i in self.dense] for h in histories]
        keep = self.max_len - (0 if self.generative else 1)  # room for the target slot
        hist = [h[-keep:] for h in hist]
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in hist]
        rows = [r for r, h in enumerate(hist) if h]
        if not rows:
            return out
        lengths = torch.tensor([len(hist[r]) for r in rows])
        width = int(lengths.max()) + (0 if self.generative else 1)
        items = torch.zeros(len(rows), width, dtype=torch.long)
        times = torch.zeros(len(rows), width, dtype=torch.long)
        for j, r in enumerate(rows):
            n = len(hist[r])
            items[j, :n] = torch.tensor([i for i, _ in hist[r]])
            times[j, :n] = torch.tensor([t // 1000 for _, t in hist[r]])
            if not self.generative:
                times[j, n] = now_ms[r] // 1000
        dense_excl = [{self.dense[i] for i in excludes[r] if i in self.dense} for r in rows]
        k = max(ks[r] for r in rows)
        if self.generative:
            got, scores = self.model.retrieve(items, lengths, k=k, decoder=self.decoder, exclude=dense_excl)
        else:
            states = self.model(items, times, lengths + 1)
            last = states[torch.arange(len(rows)), lengths - 1]
            all_scores = last @ self.model.item_embeddings().T
            all_scores[:, 0] = float("-inf")
            for j, ex in enumerate(dense_excl):
                if ex:
                    all_scores[j, list(ex)] = float("-inf")
            scores, got = all_scores.topk(min(k, all_scores.shape[1] - 1), dim=1)
        raw, scores = self.vocab[got.numpy()], scores.numpy()
        keep = (got.numpy() > 0) & np.isfinite(scores)
        for j, r in enumerate(rows):
            ok = keep[j]
            out[r] = (raw[j][ok][: ks[r]].tolist(), scores[j][ok][: ks[r]].tolist())
        return out


class RetrievalChannels:
    """The retrieval channels one replica runs: user_config `artifact` (the NEZHA retriever: the "generative"
    channel; a dense model there is the "dense" channel) and, when `dense_artifact` is set, "dense" (a
    SASRec-class model: exact top-k over its item table). Answers each channel's own list; the Ingress merges
    them with the trending list (serving.channels.merge_candidates).

    `version` names both models ("<generative>+<dense>") when there are two."""

    def __init__(self, artifact: str, dense_artifact: str | None = None, decoder: str = "nezha"):
        main = RetrieverModel(artifact, decoder)
        self.models = {"generative" if main.generative else "dense": main}
        if dense_artifact:
            if not main.generative:
                raise ValueError(f"dense_artifact is set but artifact {artifact} is a dense retriever too: "
                                 "artifact names the generative channel")
            dense = RetrieverModel(dense_artifact)
            if dense.generative:
                raise ValueError(f"dense_artifact {dense_artifact} holds a generative retriever, not a dense one")
            self.models["dense"] = dense
        self.version = "+".join(m.version for m in self.models.values())

    def retrieve(self, histories: list[list[tuple[int, int]]], now_ms: list[int], ks: list[int],
                 excludes: list[set[int]]) -> list[dict[str, tuple[list[int], list[float]]]]:
        """Per request: {channel: (raw items, scores)}, each list best first and without excluded items."""
        answers = {name: model.retrieve(histories, now_ms, ks, excludes) for name, model in self.models.items()}
        return [{name: got[r] for name, got in answers.items()} for r in range(len(histories))]


def channels_key(uc: dict[str, Any], args: dict[str, Any]) -> tuple[str, str | None] | None:
    """What a Retriever user_config asks to serve: (generative artifact, dense artifact or None), resolved."""
    artifact = resolve(uc.get("artifact"), args)
    return None if artifact is None else (artifact, resolve(uc.get("dense_artifact"), args))


@serve.deployment
class Retriever(StageDeployment):
    """Requests are batched with `@serve.batch`: one model call for up to batch_size concurrent users.

    user_config: artifact (path: the generative retriever), dense_artifact (optional: the dense channel), decoder,
    batch_size, batch_wait_timeout_s (the wait while a batch runs, see serving.common.BusyBatchWait),
    torch_threads. A new artifact is
    loaded in a thread while the old one keeps answering, then swapped in (no failed request). In cascade mode
    (serving.mode) it loads nothing: the Ingress replicas follow its user_config and retrieve in process."""

    stage, does, default_batch_size = "retriever", "retrieves", 16

    def __init__(self, args: dict[str, Any] | None = None):
        self.args = args or {}
        self._init_stage(platform_config(self.args).serving.mode == "cascade")

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        uc = user_config or {}
        if self._published(uc):
            return
        decoder = uc.get("decoder", "nezha")
        # Explicitly none: answer StageUnavailable (the ingress serves trending items).
        await self.slot.load(channels_key(uc, self.args), lambda key: RetrievalChannels(*key, decoder))

    async def retrieve(self, history: list[tuple[int, int]], now_ms: int, k: int,
                       exclude: list[int]) -> dict[str, Any]:
        if self.slot.model is None:
            raise StageUnavailable(self.slot.error)
        self.batch_wait.before_request()
        return await self._batched((history, now_ms, k, set(exclude)))

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def _batched(self, requests: list[tuple]) -> list[dict[str, Any]]:
        """The batch runs in a thread, so the event loop keeps taking requests meanwhile (the next batch)."""
        model = self.slot.model  # one model for the whole batch, even if a new one is swapped in meanwhile
        got = await self.batch_wait.run(model.retrieve, [r[0] for r in requests], [r[1] for r in requests],
                                        [r[2] for r in requests], [r[3] for r in requests])
        return [{"channels": channels, "version": model.version, "batch": len(requests)} for channels in got]

    async def check(self) -> list[str]:
        return [] if self.board is not None else self.slot.problems()
