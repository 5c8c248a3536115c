"""The Ray Serve application: a FastAPI ingress over feature lookup, retrieval, ranking and event intake.

    serve run serving/config.yaml                      # or: python -m ray_jobs.deploy --config embedded ...
    curl -s localhost:8000/recommend -d '{"user_id": 7, "k": 10}' -H 'content-type: application/json'

/recommend: the user's history (read by the ingress itself from the online store: a hop less per request)
-> candidates (Retriever, batched; seen items excluded) -> M-FALCON ranking of the candidates (Ranker, batched;
it reads the candidates' features) -> top k. FeatureLookup keeps the trending list from the lake. Every
stage has a fallback and a time limit (serving.stage_timeout_s), so a broken or slow dependency degrades the
answer instead of failing it:
- unknown user / no usable history: trending items (from the windowed stats) are the candidates;
- feature store unavailable: trending candidates, ranked with default features;
- retriever unavailable or too slow: trending candidates;
- ranker unavailable: candidates in retrieval (or trending) order.
The response names the fallback(s) used, the model versions and per-stage timings. Overload is Serve's:
past max_ongoing_requests + max_queued_requests of the Ingress the proxy answers 503 at once.
"""

# No `from __future__ import annotations`: FastAPI must see the body models, not strings, on the ingress.
import asyncio
import hmac
import logging
import os
import time
from typing import Annotated, Any

import numpy as np
from fastapi import Body, FastAPI, HTTPException, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.datastructures import Headers

from features.online import FeatureStoreUnavailable, OnlineFeatureClient
from serving import common
from serving.common import Timer, platform_config
from serving.events import EventIntake
from serving.lookup import FeatureLookup
from serving.ranker import Ranker
from serving.retriever import Retriever
from serving.schemas import (
    MAX_EVENTS,
    BadJSON,
    Event,
    EventsAccepted,
    Health,
    RankRequest,
    RankResponse,
    RecommendRequest,
    RecommendResponse,
    ScoredItem,
    public_errors,
    strict_json,
)

log = logging.getLogger("ray.serve")
app = FastAPI(title="streamrec", version="1",
              description="Recommendations (generative retrieval + M-FALCON ranking) and event intake.")
api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required by POST /events and by /recommend with debug=true")
# The ingress's limits live in serving.common: Serve pickles the FastAPI app, and with it this module's
# functions by value (their globals copied), so a dict here would not be the one the Ingress sets.


def key_refusal(key: str | None) -> tuple[int, str] | None:
    """(status, reason) when `key` is not the configured API key; None when it is."""
    expected = common.INGRESS_LIMITS.get("api_key")
    if not expected:
        return 503, "no API key configured on the server"
    if key is None or not hmac.compare_digest(key.encode("utf-8", "replace"), expected.encode()):
        return 401, "missing or wrong X-API-Key"
    return None


def _refuse(status: int, msg: str, field: str = "body") -> JSONResponse:
    headers = {"WWW-Authenticate": "ApiKey"} if status == 401 else None
    return JSONResponse({"detail": [{"loc": [field], "msg": msg, "type": "request"}]}, status, headers=headers)


def _is_json(content_type: str | None) -> bool:
    """No content type counts as JSON (as FastAPI reads it); else application/json or */*+json, in UTF-8."""
    if content_type is None:
        return True
    media, *params = (part.strip().lower() for part in content_type.split(";"))
    charset = next((p.partition("=")[2].strip('" ') for p in params if p.startswith("charset=")), "utf-8")
    return (media == "application/json" or (media.startswith("application/") and media.endswith("+json"))) \
        and charset == "utf-8"


class RequestGuard:
    """ASGI middleware run before FastAPI reads anything: POST /events without the right key is refused
    before its body is read; every body is read here counting the bytes that actually arrive (a chunked body
    has no Content-Length to trust) and refused with 413 past serving.max_body_bytes; a POST body must be
    strict JSON (serving.schemas.strict_json) or gets 400 (415 for another content type). Only then does the
    app see the body, replayed from memory."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = common.INGRESS_LIMITS["max_body_bytes"]
        refused = self._refused_unread(scope, limit)
        if refused is not None:
            return await _refuse(*refused)(scope, receive, send)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > limit:
                return await _refuse(413, f"request body larger than {limit} bytes")(scope, receive, send)
            if not message.get("more_body"):
                break
        if body and scope["method"] == "POST":
            try:
                strict_json(bytes(body))
            except BadJSON as err:
                return await _refuse(400, str(err))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)

    @staticmethod
    def _refused_unread(scope, limit: int) -> tuple[int, str, str] | None:
        """(status, reason, field) for a request refused on its headers alone."""
        headers, post = Headers(scope=scope), scope["method"] == "POST"
        route = scope["path"].removeprefix(scope.get("root_path", "")).rstrip("/")
        if post and route == "/events" and (refused := key_refusal(headers.get("x-api-key"))):
            return *refused, "X-API-Key"
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > limit):
            return 413, f"request body larger than {limit} bytes", "body"
        if post and not _is_json(headers.get("content-type")):
            return 415, "content-type must be application/json (UTF-8)", "content-type"
        return None


app.add_middleware(RequestGuard)


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse({"detail": public_errors(list(exc.errors()))}, 422)


def _bad(field: str, msg: str) -> HTTPException:
    return HTTPException(422, [{"loc": ["body", field], "msg": msg, "type": "value_error"}])


@serve.deployment
@serve.ingress(app)
class Ingress:
    """user_config: {"overrides": [...]} (config overrides, e.g. another online store) re-opens the feature client."""

    def __init__(self, features: DeploymentHandle, retriever: DeploymentHandle, ranker: DeploymentHandle,
                 events: DeploymentHandle, args: dict[str, Any] | None = None):
        self.features, self.retriever, self.ranker, self.events = features, retriever, ranker, events
        self.args = args or {}
        self.cfg = platform_config(self.args).serving
        key = os.environ.get(self.cfg.api_key_env)
        common.INGRESS_LIMITS.update(max_body_bytes=self.cfg.max_body_bytes, api_key=key)
        self.trending: list = []
        self.trending_at = -1e9
        self.client: OnlineFeatureClient | None = None
        self.store_error: str | None = None
        self.reconfigure({})

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        cfg = platform_config(self.args, (user_config or {}).get("overrides"))
        try:
            self.client, self.store_error = OnlineFeatureClient(cfg), None
        except FeatureStoreUnavailable as err:  # serve trending items; /healthz says so, the log says why
            self.client, self.store_error = None, str(err)
            log.error("online store unavailable: %s", err)

    def _user(self, user_id: int) -> dict[str, Any]:
        """The user's history, oldest first. Read in process, on the event loop: a local read is well under a
        millisecond, cheaper than a thread or a deployment hop; the store's own timeout bounds a remote one."""
        if self.client is None:
            raise FeatureStoreUnavailable(self.store_error or "no online store")
        f = self.client.get(int(user_id), [])
        return {"items": f.sequence["item_ids"].tolist(), "ts": f.sequence["ts"].tolist(),
                "missing": bool(f.sequence_missing and f.user_missing)}

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
    async def recommend(self, req: RecommendRequest,
                        key: str | None = Security(api_key_header)) -> RecommendResponse:
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
        exclude = set(user["items"]) if user and req.exclude_seen else set()
        n = self.cfg.num_candidates
        cands, cand_scores = [], []
        if user is not None and (user["missing"] or not user["items"]):
            fallbacks.append("trending:unknown_user" if user["missing"] else "trending:cold_user")
        elif user is not None:
            with timer("retrieval"):
                try:
                    got = await self._call(self.retriever.retrieve.remote(
                        list(zip(user["items"], user["ts"])), now_ms, n, sorted(exclude)))
                    cands, cand_scores, versions["retriever"] = got["items"], got["scores"], got["version"]
                    if not cands:
                        fallbacks.append("trending:no_known_history")
                except Exception:
                    fallbacks.append("trending:retriever_unavailable")
        if not cands:
            with timer("trending"):
                trend = [(i, s) for i, s in await self._trending() if i not in exclude][:n]
                cands, cand_scores = [i for i, _ in trend], [s for _, s in trend]
        items = [ScoredItem(item_id=i, score=s) for i, s in zip(cands[: req.k], cand_scores)]
        if cands:
            with timer("ranking"):
                try:
                    ranked = await self._call(self.ranker.rank.remote(req.user_id, cands, now_ms))
                    items = self._top(cands, ranked, req.k)
                    versions["ranker"] = ranked["version"]
                    timer.ms.update(ranked["timings_ms"])
                    if ranked["fallback"]:
                        fallbacks.append(f"{ranked['fallback']}:feature_store_unavailable")
                except Exception:
                    fallbacks.append("unranked:ranker_unavailable")
        timer.total()
        history = None
        if req.debug:
            history = user["items"][::-1][:10] if user else []
        return RecommendResponse(
            user_id=req.user_id, items=items, candidates_retrieved=len(cands),
            fallback=",".join(dict.fromkeys(fallbacks)) or None, model_versions=versions, timings_ms=timer.ms,
            history_items=history, request_ts_ms=now_ms)

    @staticmethod
    def _top(cands: list[int], ranked: dict, k: int) -> list[ScoredItem]:
        score = np.asarray(ranked["score"])
        order = np.argsort(-score, kind="stable")[:k]
        tasks = ranked["tasks"]
        return [ScoredItem(item_id=cands[j], score=float(score[j]),
                           scores=dict(zip(tasks, ranked["probs"][j]))) for j in order.tolist()]

    @app.post("/rank", response_model=RankResponse, responses={503: {"description": "no ranker loaded"}})
    async def rank(self, req: RankRequest) -> RankResponse:
        if len(req.item_ids) > self.cfg.max_rank_items:
            raise _bad("item_ids", f"at most {self.cfg.max_rank_items} items")
        now_ms, timer = int(time.time() * 1000), Timer()
        with timer("ranking"):
            try:
                ranked = await self._call(self.ranker.rank.remote(req.user_id, req.item_ids, now_ms))
            except Exception as err:
                raise HTTPException(503, f"ranker unavailable: {type(err).__name__}") from None
        timer.ms.update(ranked["timings_ms"])
        timer.total()
        items = [ScoredItem(item_id=i, score=s, scores=dict(zip(ranked["tasks"], p)))
                 for i, s, p in zip(req.item_ids, ranked["score"], ranked["probs"])]
        fallback = f"{ranked['fallback']}:feature_store_unavailable" if ranked["fallback"] else None
        return RankResponse(user_id=req.user_id, items=items, tasks=ranked["tasks"], fallback=fallback,
                            model_versions={"ranker": ranked["version"]}, timings_ms=timer.ms, request_ts_ms=now_ms)

    # RequestGuard checks the key before the body is read; the Security dependency puts it in the OpenAPI schema.
    @app.post("/events", status_code=202, response_model=EventsAccepted, dependencies=[Security(api_key_header)],
              responses={401: {"description": "missing or wrong X-API-Key"}, 413: {"description": "body too large"}})
    async def post_events(self, body: Annotated[Event | list[Event], Body()]) -> EventsAccepted:
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
        checks = {"features": self.features.check, "retriever": self.retriever.check,
                  "ranker": self.ranker.check, "events": self.events.check}
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
