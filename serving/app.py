"""The Ray Serve application: a FastAPI ingress over feature lookup, retrieval, ranking and event intake.

    serve run serving/config.yaml                      # or: python -m ray_jobs.deploy --config embedded ...
    curl -s localhost:8000/recommend -d '{"user_id": 7, "k": 10}' -H 'content-type: application/json'

/recommend: the user's history (read once, by the ingress itself, from the online store) -> candidates
(retrieval, batched; seen items excluded) -> M-FALCON ranking of the candidates (batched; with the candidates'
features) -> top k. Where retrieval and ranking run is `serving.mode`: `cascade` (default) runs them in this
replica, in a thread (serving.cascade), `split` calls the Retriever and Ranker deployments. FeatureLookup keeps
the trending list from the lake. Every stage has a fallback and a time limit (serving.stage_timeout_s), so a
broken or slow dependency degrades the answer instead of failing it:
- unknown user / no usable history: trending items (from the windowed stats) are the candidates;
- feature store unavailable: trending candidates, ranked with default features;
- retriever unavailable or too slow: trending candidates;
- ranker unavailable: candidates in retrieval (or trending) order.
The response names the fallback(s) used, the model versions and per-stage timings. Overload is Serve's:
past max_ongoing_requests + max_queued_requests of the Ingress the proxy answers 503 at once.
"""

# No `from __future__ import annotations`: FastAPI must see the body models, not strings, on the ingress.
import asyncio
import logging
import os
import time
import uuid
from collections import Counter
from typing import Annotated, Any

from fastapi import Body, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import APIKeyHeader
from pydantic import Field
from pydantic_core import to_json
from ray import serve
from ray.serve.handle import DeploymentHandle

from features.online import FeatureStoreUnavailable, OnlineFeatureClient
from features.spec import FeatureStoreSpec
from serving import common
from serving.cascade import Cascade, Job, top
from serving.common import Timer, platform_config
from serving.events import EventIntake
from serving.guard import RequestGuard, key_refusal
from serving.lookup import FeatureLookup, UserFeatures
from serving.ranker import Ranker
from serving.retriever import Retriever
from serving.schemas import (
    MAX_EVENTS,
    Event,
    EventsAccepted,
    Health,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
    public_errors,
)

log = logging.getLogger("ray.serve")
app = FastAPI(title="streamrec", version="1",
              description="Recommendations (generative retrieval + M-FALCON ranking) and event intake.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required by POST /events and by /recommend with debug=true")
app.add_middleware(RequestGuard)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": public_errors(list(exc.errors()))}, 422)


def _bad(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


def _json(body: dict[str, Any]) -> Response:
    """The answer encoded once, without validating it again through its response model (the route still
    declares that model for the OpenAPI schema; tests check answers against it)."""
    return Response(to_json(body), media_type="application/json")


@serve.deployment
@serve.ingress(app)
class Ingress:
    """user_config: {"overrides": [...]} (config overrides, e.g. another online store) re-opens the feature client.
    In cascade mode it also follows the Retriever and Ranker deployments' user_config (their artifacts)."""

    def __init__(self, features: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle,
                 events: DeploymentHandle, args: dict[str, Any] | None = None):
        self.features, self.retriever, self.ranker, self.events = features, retriever, ranker, events
        self.args = args or {}
        cfg = platform_config(self.args)
        self.cfg = cfg.serving
        self.channel_quotas = dict(cfg.retrieval.channels)
        key = os.environ.get(self.cfg.api_key_env)
        common.INGRESS_LIMITS.update(max_body_bytes=self.cfg.max_body_bytes, api_key=key)
        self.trending: list = []
        self.trending_at = -1e9
        self.client: OnlineFeatureClient | None = None
        self.store_error: str | None = None
        self.cascade = (Cascade(self.args, FeatureStoreSpec.from_config(cfg.features).stat_names)
                        if self.cfg.mode == "cascade" else None)
        self.follower = f"ingress-{uuid.uuid4().hex[:12]}"
        self.following: list[asyncio.Task] = []
        self._open_store(None)

    def _open_store(self, overrides: list[str] | None) -> None:
        cfg = platform_config(self.args, overrides)
        try:
            self.client, self.store_error = OnlineFeatureClient(cfg), None
        except FeatureStoreUnavailable as err:  # serve trending items; /healthz says so, the log says why
            self.client, self.store_error = None, str(err)
            log.error("online store unavailable: %s", err)
        if self.cascade is not None:
            self.cascade.set_client(self.client)

    async def reconfigure(self, user_config: dict[str, Any]) -> None:
        self._open_store((user_config or {}).get("overrides"))
        if self.cascade is not None and not self.following:
            # Load the models before taking requests, then keep following their deployments' user_config.
            for stage, handle in (("retriever", self.retriever), ("ranker", self.ranker)):
                applied = await self._apply_settings(stage, handle, "")
                self.following.append(asyncio.get_running_loop().create_task(self._follow(stage, handle, applied)))

    async def _apply_settings(self, stage: str, handle: DeploymentHandle, applied: str) -> str:
        token, uc = await handle.follow.remote(self.follower, applied)
        if token != applied:
            try:
                await self.cascade.configure(stage, uc, self.client, self.cfg.task_weights)
            except ValueError as err:  # keep what is loaded; /healthz names the bad setting
                getattr(self.cascade, stage).error = f"bad user_config ({err})"
                log.error("%s user_config: %s", stage, err)
        return token

    async def _follow(self, stage: str, handle: DeploymentHandle, applied: str) -> None:
        while True:
            try:
                applied = await self._apply_settings(stage, handle, applied)
            except Exception as err:  # the stage's replica restarting: ask again shortly
                log.warning("following the %s settings: %s", stage, err)
                await asyncio.sleep(1.0)

    def _user(self, user_id: int) -> UserFeatures:
        """The user's stats and history, read once per request. In process, on the event loop: a local read is
        well under a millisecond, cheaper than a thread or a deployment hop; the store's timeout bounds a remote one."""
        if self.client is None:
            raise FeatureStoreUnavailable(self.store_error or "no online store")
        return UserFeatures.read(self.client, user_id)

    async def _call(self, response, timeout: float | None = None):
        """A stage's answer within its time limit; on timeout the request to it is cancelled."""
        try:
            return await asyncio.wait_for(response, timeout or self.cfg.stage_timeout_s)
        except TimeoutError:
            response.cancel()
            raise

    async def _trending(self) -> list:
        if not self.trending or time.monotonic() - self.trending_at > self.cfg.trending_refresh_s:
            try:
                self.trending = await self._call(self.features.trending.remote())
                self.trending_at = time.monotonic()
            except Exception:  # keep the last list
                pass
        return self.trending

    @app.post("/recommend", response_model=RecommendResponse,
              responses={401: {"description": "debug=true without the right X-API-Key"}})
    async def recommend(self, req: RecommendRequest, key: str | None = Security(api_key_header)) -> Response:
        if req.k > self.cfg.max_k:
            raise _bad("k", f"k must be <= {self.cfg.max_k}")
        # A user's engagements are theirs: shown only to a caller holding the key, and only when asked for.
        if req.debug and (refused := key_refusal(key)):
            raise HTTPException(refused[0], [{"loc": ["header", "X-API-Key"], "msg": f"debug: {refused[1]}",
                                              "type": "auth"}], headers={"WWW-Authenticate": "ApiKey"})
        now_ms, timer = int(time.time() * 1000), Timer()
        fallbacks: list[str] = []
        versions: dict[str, str | None] = {"retriever": None, "ranker": None}
        user = None
        with timer("features"):
            try:
                user = self._user(req.user_id)
            except FeatureStoreUnavailable:
                fallbacks.append("trending:feature_store_unavailable")
        history = user.sequence["item_ids"].tolist() if user is not None else []
        exclude = set(history) if req.exclude_seen else set()
        n = self.cfg.num_candidates if user is not None and history and not user.unknown else 0
        if user is not None and not n:
            fallbacks.append("trending:unknown_user" if user.unknown else "trending:cold_user")
        job = Job(user, req.user_id, now_ms, n, exclude, await self._trending(), self.channel_quotas)
        if not n:
            job.n = self.cfg.num_candidates
            job.use_trending()
            job.n = 0
        stages = self._cascaded if self.cascade is not None else self._split
        cands, items = await stages(job, req.k, timer, fallbacks, versions)
        timer.total()
        body = {"user_id": req.user_id, "items": items, "candidates_retrieved": len(cands),
                "candidates_by_channel": dict(Counter(job.channels)),
                "fallback": ",".join(dict.fromkeys(fallbacks)) or None, "model_versions": versions,
                "timings_ms": timer.ms, "history_items": history[::-1][:10] if req.debug else None,
                "request_ts_ms": now_ms}
        return _json(body)

    async def _cascaded(self, job: Job, k: int, timer: Timer, fallbacks: list[str], versions: dict) -> tuple:
        """Retrieval and ranking in this replica (serving.cascade), each stage within its time limit."""
        self.cascade.submit(job)
        if job.n:
            with timer("retrieval"):
                try:
                    _, _, versions["retriever"], reason = await asyncio.wait_for(asyncio.shield(job.retrieved),
                                                                                 self.cfg.stage_timeout_s)
                except Exception:
                    job.retrieval_late, reason = True, "retriever_unavailable"
            if reason:
                fallbacks.append(f"trending:{reason}")
        with timer("ranking"):
            try:
                ranked = await asyncio.wait_for(asyncio.shield(job.ranked), self.cfg.stage_timeout_s)
            except Exception:
                if job.retrieval_late or not job.cands:
                    job.use_trending()
                fallbacks.append("unranked:ranker_unavailable")
                return job.cands, [{"item_id": i, "score": s, "scores": {}} for i, s in
                                   zip(job.cands[:k], job.cand_scores)]
        versions["ranker"] = ranked["version"]
        timer.ms.update(ranked["timings_ms"])
        if ranked["fallback"]:
            fallbacks.append(f"{ranked['fallback']}:feature_store_unavailable")
        return ranked["cands"], top(ranked["cands"], ranked, k)

    async def _split(self, job: Job, k: int, timer: Timer, fallbacks: list[str], versions: dict) -> tuple:
        """Retrieval and ranking by the Retriever and Ranker deployments, each call within its time limit."""
        if job.n:
            history = list(zip(job.user.sequence["item_ids"].tolist(), job.user.sequence["ts"].tolist()))
            with timer("retrieval"):
                try:
                    got = await self._call(self.retriever.retrieve.remote(history, job.now_ms, job.n,
                                                                          sorted(job.exclude)))
                    versions["retriever"] = got["version"]
                    if not job.use_channels(got["channels"]):
                        fallbacks.append("trending:no_known_history")
                except Exception:
                    fallbacks.append("trending:retriever_unavailable")
            if not job.cands:
                job.use_trending()
        items = [{"item_id": i, "score": s, "scores": {}} for i, s in zip(job.cands[:k], job.cand_scores)]
        if job.cands:
            with timer("ranking"):
                try:
                    # The user as read here goes along: the Ranker does not read it again.
                    ranked = await self._call(self.ranker.rank.remote(job.user_id, job.cands, job.now_ms, job.user))
                    items = top(job.cands, ranked, k)
                    versions["ranker"] = ranked["version"]
                    timer.ms.update(ranked["timings_ms"])
                    if ranked["fallback"]:
                        fallbacks.append(f"{ranked['fallback']}:feature_store_unavailable")
                except Exception:
                    fallbacks.append("unranked:ranker_unavailable")
        return job.cands, items

    @app.post("/rank", response_model=RankResponse, responses={503: {"description": "no ranker loaded"}})
    async def rank(self, req: RankRequest) -> Response:
        if len(req.item_ids) > self.cfg.max_rank_items:
            raise _bad("item_ids", f"at most {self.cfg.max_rank_items} items")
        now_ms, timer = int(time.time() * 1000), Timer()
        with timer("ranking"):
            try:
                if self.cascade is not None:
                    try:
                        user = self._user(req.user_id)
                    except FeatureStoreUnavailable:
                        user = None
                    job = self.cascade.submit(Job(user, req.user_id, now_ms, cands=list(req.item_ids)))
                    ranked = await asyncio.wait_for(asyncio.shield(job.ranked), self.cfg.stage_timeout_s)
                else:
                    ranked = await self._call(self.ranker.rank.remote(req.user_id, req.item_ids, now_ms))
            except Exception as err:
                raise HTTPException(503, f"ranker unavailable: {type(err).__name__}") from None
        timer.ms.update(ranked["timings_ms"])
        timer.total()
        probs = [list(map(float, p)) for p in ranked["probs"]]
        items = [{"item_id": i, "score": float(s), "scores": dict(zip(ranked["tasks"], p))}
                 for i, s, p in zip(req.item_ids, ranked["score"], probs)]
        fallback = f"{ranked['fallback']}:feature_store_unavailable" if ranked["fallback"] else None
        return _json({"user_id": req.user_id, "items": items, "tasks": ranked["tasks"], "fallback": fallback,
                      "model_versions": {"ranker": ranked["version"]}, "timings_ms": timer.ms,
                      "request_ts_ms": now_ms})

    # RequestGuard checks the key before the body is read; the Security dependency puts it in the OpenAPI schema.
    @app.post("/events", status_code=202, response_model=EventsAccepted, dependencies=[Security(api_key_header)],
              responses={401: {"description": "missing or wrong X-API-Key"}, 413: {"description": "body too large"}})
    # max_length on the list: pydantic refuses a longer list before it validates (and names) every element,
    # which for a 1 MiB array of half a million bad items took seconds of CPU and a 500k-entry error list.
    async def post_events(self, body: Annotated[Event | Annotated[list[Event], Field(max_length=MAX_EVENTS)],
                                                Body()]) -> EventsAccepted:
        events = [body] if isinstance(body, Event) else body
        if not events:
            raise _bad("events", "at least one event")
        if len(events) > min(self.cfg.max_events, MAX_EVENTS):
            raise HTTPException(413, f"at most {self.cfg.max_events} events per request")
        try:
            got = await self._call(self.events.ingest.remote([e.model_dump(exclude_none=True) for e in events]),
                                   timeout=max(self.cfg.stage_timeout_s, 10.0))
        except Exception as err:
            raise HTTPException(503, f"event intake unavailable: {type(err).__name__}") from None
        if "problems" in got:
            raise HTTPException(422, public_errors(got["problems"]))
        return EventsAccepted.model_validate(got)  # what it keeps: no landing file name (it holds the host)

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        """Unauthenticated, so it names what is wrong but never where (no path, URI or host): the deployments'
        logs have the details. FeatureLookup, Retriever and Ranker word their checks so; EventIntake's text
        carries its errors verbatim, so only its subject (before the first colon) goes out."""
        checks = {"features": self.features.check, "events": self.events.check}
        if self.cascade is None:
            checks.update(retriever=self.retriever.check, ranker=self.ranker.check)
        problems = [] if common.INGRESS_LIMITS.get("api_key") else [f"events: no API key in ${self.cfg.api_key_env}"]
        try:
            self._user(1)
        except FeatureStoreUnavailable as err:
            problems.append(f"feature store: unavailable ({type(err).__name__})")
        for name, check in checks.items():
            try:
                got = await self._call(check.remote())
            except Exception as err:
                problems.append(f"{name}: {type(err).__name__}")
                continue
            got = [got] if isinstance(got, str) else list(got or [])
            if name == "events":
                got = [f"events: {p.split(':', 1)[0][:80]} (details in the EventIntake log)" for p in got]
            problems += got
        if self.cascade is not None:
            problems += self.cascade.problems()
            versions = self.cascade.versions()
        else:
            versions = {}
            for name, handle in (("retriever", self.retriever), ("ranker", self.ranker)):
                try:
                    versions[name] = (await self._call(handle.loaded.remote())).get("version")
                except Exception:
                    versions[name] = None
        return Health(status="degraded" if problems else "ok", model_versions=versions, problems=problems)


def build_app(args: dict[str, Any] | None = None):
    """The application for `serve run` / serveConfigV2 (import_path serving.app:build_app)."""
    args = dict(args or {})
    return Ingress.bind(FeatureLookup.bind(args), Retriever.bind(args), Ranker.bind(args), EventIntake.bind(args),
                        args)
