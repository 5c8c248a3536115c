"""The HTTP API's request and response bodies (pydantic): what the OpenAPI schema at /openapi.json describes.

Field bounds here are the first line of validation (FastAPI answers 422 naming the field); events are then
checked with the ingestion contract's row rules (`ingestion.contract.check_event`), so the API and the log
reader accept exactly the same events.

>>> RecommendRequest(user_id=7).k
10
>>> Event(event_id="e1", ts=1767571200000, user_id=7, item_id=3, action="click").author_id is None
True
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from ingestion.contract import ACTIONS, MAX_EVENT_ID_CHARS, MAX_REQUEST_ID_CHARS

INT64_MAX = 2**63 - 1
# Hard ceilings of the schema; the configured limits (serving.max_k, ...) are checked per request and may be lower.
MAX_K = 500
MAX_RANK_ITEMS = 500
MAX_EVENTS = 10_000

Action = Literal[ACTIONS]  # type: ignore[valid-type]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    user_id: int = Field(..., gt=0, le=INT64_MAX)
    k: int = Field(10, ge=1, le=MAX_K, description="items to return (at most serving.max_k)")
    exclude_seen: bool = Field(True, description="drop items in the user's engagement history")


class RankRequest(_Body):
    user_id: int = Field(..., gt=0, le=INT64_MAX)
    item_ids: list[Annotated[int, Field(gt=0, le=INT64_MAX)]] = Field(..., min_length=1, max_length=MAX_RANK_ITEMS,
                                description="candidates to score (at most serving.max_rank_items)")


class Event(_Body):
    """One interaction event (DESIGN.md, "Interaction event")."""

    event_id: str = Field(..., min_length=1, max_length=MAX_EVENT_ID_CHARS)
    ts: int = Field(..., description="event time, epoch milliseconds UTC", ge=-(2**63), le=INT64_MAX)
    user_id: int = Field(..., gt=0, le=INT64_MAX)
    item_id: int = Field(..., gt=0, le=INT64_MAX)
    author_id: int | None = Field(None, gt=0, le=INT64_MAX)
    request_id: str | None = Field(None, max_length=MAX_REQUEST_ID_CHARS)
    action: Action
    value: float | None = Field(None, allow_inf_nan=False)


class ScoredItem(BaseModel):
    item_id: int
    score: float = Field(..., description="the ranking score: weighted sum of the task probabilities")
    scores: dict[str, float] = Field(default_factory=dict, description="per-task probability")


class RecommendResponse(BaseModel):
    user_id: int
    items: list[ScoredItem]
    candidates_retrieved: int
    fallback: str | None = Field(None, description="which fallback served this request, None when none did")
    model_versions: dict[str, str | None]
    timings_ms: dict[str, float]
    history_items: list[int] = Field(default_factory=list, description="the user's latest engagements, newest first")
    request_ts_ms: int


class RankResponse(BaseModel):
    user_id: int
    items: list[ScoredItem] = Field(..., description="in the order of the request's item_ids")
    tasks: list[str]
    fallback: str | None = None
    model_versions: dict[str, str | None]
    timings_ms: dict[str, float]
    request_ts_ms: int


class EventsAccepted(BaseModel):
    accepted: int
    landing_file: str | None = Field(None, description="the landing file the events were written to")
    features_updated: bool = Field(..., description="false when the online store could not be updated now")
    timings_ms: dict[str, float]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    model_versions: dict[str, str | None]
    # Where each loaded model came from: a deploy checks both, since two artifacts can carry one version.
    model_artifacts: dict[str, str | None] = Field(default_factory=dict)
    problems: list[str] = Field(default_factory=list)
