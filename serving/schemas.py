"""The HTTP API's request and response bodies (pydantic): what the OpenAPI schema at /openapi.json describes.

A body is first read as strict JSON (`strict_json`: UTF-8, finite numbers, valid Unicode strings, bounded
nesting), then field bounds here validate it (FastAPI answers 422 naming the field); events are then
checked with the ingestion contract's row rules (`ingestion.contract.check_event`), so the API and the log
reader accept exactly the same events. Errors go out through `public_errors`: a few, short, and never with
the input in them (echoing it made error bodies huge or unencodable).

>>> RecommendRequest(user_id=7).k
10
>>> Event(event_id="e1", ts=1767571200000, user_id=7, item_id=3, action="click").author_id is None
True
>>> strict_json(b'{"user_id": 7}'), public_errors([{"loc": ("body", "\\ud800" * 9), "msg": "Extra inputs"}])
({'user_id': 7}, [{'loc': ['body', '(unknown field)'], 'msg': 'Extra inputs', 'type': 'value_error'}])
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ingestion.contract import ACTIONS, MAX_EVENT_ID_CHARS, MAX_REQUEST_ID_CHARS

INT64_MAX = 2**63 - 1
# Hard ceilings of the schema; the configured limits (serving.max_k, ...) are checked per request and may be lower.
MAX_K = 500
MAX_RANK_ITEMS = 500
MAX_EVENTS = 10_000
# A valid body nests at most 3 deep (a list of events of scalars); the margin only spares a clear message.
MAX_JSON_DEPTH = 16
# A body object has at most 8 fields; thousands of unknown keys would only buy the client thousands of errors.
MAX_OBJECT_KEYS = 64
MAX_ERRORS = 5  # per error response: a body of thousands of bad keys still gets a short answer
MAX_MSG_CHARS = 200

Action = Literal[ACTIONS]  # type: ignore[valid-type]


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RecommendRequest(_Body):
    user_id: int = Field(..., gt=0, le=INT64_MAX)
    k: int = Field(10, ge=1, le=MAX_K, description="items to return (at most serving.max_k)")
    exclude_seen: bool = Field(True, description="drop items in the user's engagement history")
    debug: bool = Field(False, description="also return the user's latest engagements (history_items); "
                                           "needs the X-API-Key")


class RankRequest(_Body):
    user_id: int = Field(..., gt=0, le=INT64_MAX)
    item_ids: list[Annotated[int, Field(gt=0, le=INT64_MAX)]] = Field(..., min_length=1, max_length=MAX_RANK_ITEMS,
                                description="candidates to score (at most serving.max_rank_items)")


class Event(_Body):
    """One interaction event (docs/design.md, "Interaction event")."""

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
    candidates_by_channel: dict[str, int] = Field(
        default_factory=dict, description="candidates each retrieval channel (generative, dense, trending) gave")
    fallback: str | None = Field(None, description="which fallback served this request, None when none did")
    model_versions: dict[str, str | None]
    timings_ms: dict[str, float]
    history_items: list[int] | None = Field(None, description="the user's latest engagements, newest first: "
                                                               "only with debug=true and the X-API-Key")
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
    features_updated: bool = Field(..., description="false when the online store could not be updated now")
    timings_ms: dict[str, float]


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    # A version ends with the weights' sha256 prefix (training.artifact), so it names the content, not a place:
    # deploys compare it, and neither this nor `problems` names a path or a host.
    model_versions: dict[str, str | None]
    problems: list[str] = Field(default_factory=list)


class BadJSON(ValueError):
    """A body that is not strict JSON; the message names the problem, never the input."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadJSON("numbers must be finite (1e999 overflows)")
    return value


def _no_constant(name: str) -> None:
    raise BadJSON(f"{name} is not JSON: numbers must be finite")


def strict_json(raw: bytes) -> Any:
    """The body parsed as JSON that every field can hold: UTF-8 (no BOM), no NaN/Infinity/overflowing
    numbers, no lone surrogates (a "\\ud800" escape) in keys or strings, at most MAX_JSON_DEPTH deep and
    MAX_OBJECT_KEYS keys per object.
    Python's json accepts all of these, and each one made a response fail to encode."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadJSON(f"body is not valid UTF-8 (byte {err.start})") from None
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except BadJSON:
        raise
    except json.JSONDecodeError as err:
        raise BadJSON(f"body is not valid JSON: {err.msg} (char {err.pos})") from None
    except RecursionError:
        raise BadJSON(f"body nests deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError:  # an integer of more digits than Python converts (sys.get_int_max_str_digits)
        raise BadJSON("a number has too many digits") from None
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise BadJSON(f"body nests deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(node, dict):
            if len(node) > MAX_OBJECT_KEYS:
                raise BadJSON(f"an object has more than {MAX_OBJECT_KEYS} keys")
            stack += [(k, depth) for k in node] + [(v, depth + 1) for v in node.values()]
        elif isinstance(node, list):
            stack += [(v, depth + 1) for v in node]
        elif isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                raise BadJSON("a string holds a lone surrogate (not valid Unicode)") from None
    return value


# What an error's loc may name: the bodies' own fields and union branches; any other key came from the client.
_KNOWN_LOCS = {"body", *(f"{kind}{m.__name__}{end}" for m in (RecommendRequest, RankRequest, Event)
                         for kind, end in (("", ""), ("list[", "]"))),
               *(f for m in (RecommendRequest, RankRequest, Event) for f in m.model_fields)}


def _clip(text: Any, limit: int = MAX_MSG_CHARS) -> str:
    text = str(text)
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return text.encode("utf-8", "replace").decode("utf-8")


def public_errors(errors: list[dict]) -> list[dict]:
    """Validation errors as answered: loc (known field names and list positions only), msg and type, at most
    MAX_ERRORS of them plus a count of the rest. pydantic's `input` and `ctx` are dropped: they are the input."""
    out = [{"loc": [p if isinstance(p, int) or p in _KNOWN_LOCS else "(unknown field)" for p in e.get("loc", ())][:8],
            "msg": _clip(e.get("msg", "invalid")), "type": _clip(e.get("type", "value_error"), 40)}
           for e in errors[:MAX_ERRORS]]
    if len(errors) > MAX_ERRORS:
        out.append({"loc": ["body"], "msg": f"{len(errors) - MAX_ERRORS} more errors not shown", "type": "truncated"})
    return out
