"""Hostile requests against the HTTP API: none may get a 5xx, a large answer or a slow one.

    python -m bench.hostile [--rounds 64] [--seed 0]

The requests go in process, through an ASGI client (httpx.ASGITransport), to the very FastAPI app the
Ingress serves: RequestGuard, validation, error handlers and the Ingress's route code. The stages behind
it (FeatureLookup, Retriever, Ranker, EventIntake, the online store) are stubs answering at once (`Stages`),
the event stub checking the contract's row rules and writing one landing file per accepted request; no Serve
proxy, no network. So it measures what the ingress's own code does with a hostile request, quickly enough to try
thousands; tests/security sends the same kinds through a served app.

Kinds (`KINDS`): non-finite and overflowing numbers, lone surrogates in values and keys, invalid UTF-8
under three content types, deep nesting, bodies over the byte cap with and without Content-Length
(chunked), false Content-Length headers, wrong content types, 60k extra keys, many errors (50 extra keys,
5,000 bad events), /events bodies without the
key, debug=true without the key, odd values (wrong types, huge integers, some valid), truncated JSON, random
bytes, an empty body, a GET with a body, and one valid request per endpoint. Each round sends every kind
against every endpoint it applies to, with fresh random parts.
Writes bench/results/hostile.json: requests, per kind the count, statuses, largest answer and slowest
response; the 5xx count; and whether the landing folder holds exactly the files of the 202s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import random
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
API_KEY = "hostile-bench-key"
ITEMS = list(range(1, 31))
NOW_MS = 1_767_571_200_000


class _Call:
    """What a DeploymentHandle's `.remote()` returns, as far as the Ingress uses it: awaitable, cancellable."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def __await__(self):
        async def run():
            return self.fn(*self.args)
        return run().__await__()

    def cancel(self) -> None:
        """Nothing to cancel: a stub answers at once."""


class _Handle:
    def __init__(self, target: Any):
        self.target = target

    def __getattr__(self, name: str) -> SimpleNamespace:
        fn = getattr(self.target, name)
        return SimpleNamespace(remote=lambda *args: _Call(fn, args))


@dataclass
class Stages:
    """Stub stages that answer at once; `ingested` counts the /events calls that reached event intake."""

    landing_dir: str
    ingested: int = 0
    landed: list[str] = field(default_factory=list)

    # FeatureLookup
    def trending(self) -> list[tuple[int, float]]:
        return [(i, float(100 - i)) for i in ITEMS]

    # Retriever
    def retrieve(self, history, now_ms: int, n: int, exclude: list[int]) -> dict[str, Any]:
        items = [i for i in ITEMS if i not in set(exclude)][:n]
        return {"channels": {"generative": (items, [1.0 / i for i in items])}, "version": "stub-retriever"}

    # Ranker
    def rank(self, user_id: int, items: list[int], now_ms: int, user=None) -> dict[str, Any]:
        probs = [[0.5 / (1 + j)] for j in range(len(items))]
        return {"probs": probs, "score": [p[0] for p in probs], "tasks": ["click"], "version": "stub-ranker",
                "fallback": None, "timings_ms": {}}

    # EventIntake: the contract's row rules, then one landing file per accepted request
    def ingest(self, events: list[dict]) -> dict[str, Any]:
        from ingestion.contract import EventTimeBounds, check_event

        self.ingested += 1
        bounds = EventTimeBounds(min_ts_ms=0, max_future_ms=86_400_000)
        problems = [{"loc": ["body", i], "msg": r, "type": "contract"} for i, e in enumerate(events)
                    if (r := check_event(e, bounds, int(time.time() * 1000))) is not None]
        if problems:
            return {"problems": problems}
        landed = Path(self.landing_dir) / f"hostile-{len(self.landed):06d}.jsonl"
        landed.write_text("".join(json.dumps(e) + "\n" for e in events))
        self.landed.append(str(landed))
        return {"accepted": len(events), "landing_file": str(landed), "features_updated": False, "timings_ms": {}}

    def check(self) -> list[str]:
        return []

    def loaded(self) -> dict[str, str]:
        return {"version": "stub"}


class _Store:
    """An online store where every user has the same three engagements."""

    def get(self, user_id: int, item_ids):
        from serving.lookup import default_features

        f = default_features(("n",), user_id, item_ids)
        f.sequence = {**f.sequence, "item_ids": np.array([3, 1, 2]), "ts": np.array([NOW_MS] * 3)}
        f.sequence_missing = f.user_missing = False
        return f


@contextlib.contextmanager
def in_process_app(landing_dir: str, api_key: str = API_KEY) -> Iterator[tuple[Any, Stages]]:
    """serving.app's FastAPI app, its Ingress built on `Stages` (no Ray): (asgi_app, stages). The route
    methods get their `self` from Serve's replica context, which is pointed at that Ingress meanwhile."""
    import ray.serve

    from serving import app as serving_app
    from serving import common
    from serving.common import platform_config

    stages = Stages(landing_dir)
    ingress = object.__new__(serving_app.Ingress.func_or_class.__mro__[1])  # the class under Serve's wrapper
    handle = _Handle(stages)
    ingress.features = ingress.retriever = ingress.ranker = ingress.events = handle
    cfg = platform_config({})
    ingress.args, ingress.cfg, ingress.channel_quotas = {}, cfg.serving, dict(cfg.retrieval.channels)
    ingress.trending, ingress.trending_at = [], -1e9
    ingress.client, ingress.store_error, ingress.cascade = _Store(), None, None  # split mode, over the stubs
    saved_limits, saved_context = dict(common.INGRESS_LIMITS), ray.serve.get_replica_context
    common.INGRESS_LIMITS.update(max_body_bytes=ingress.cfg.max_body_bytes, api_key=api_key)
    ray.serve.get_replica_context = lambda: SimpleNamespace(servable_object=ingress)
    try:
        yield serving_app.app, stages
    finally:
        ray.serve.get_replica_context = saved_context
        common.INGRESS_LIMITS.clear()
        common.INGRESS_LIMITS.update(saved_limits)


@dataclass
class Hostile:
    kind: str
    method: str
    path: str
    content: bytes | None = None
    headers: dict[str, str | bytes] = field(default_factory=dict)
    chunks: list[bytes] | None = None  # sent chunked: no Content-Length

    async def send(self, client: httpx.AsyncClient) -> httpx.Response:
        content: Any = self.content
        if self.chunks is not None:
            async def stream() -> AsyncIterator[bytes]:
                for chunk in self.chunks:
                    yield chunk
            content = stream()
        return await client.request(self.method, self.path, content=content, headers=self.headers)


JSON = {"content-type": "application/json"}
KEY = {"X-API-Key": API_KEY}
VALID = {"/recommend": {"user_id": 7, "k": 5}, "/rank": {"user_id": 7, "item_ids": [1, 2, 3]},
         "/events": {"event_id": "e1", "ts": NOW_MS, "user_id": 7, "item_id": 3, "action": "click"}}
NUMBERS = {"/recommend": ["user_id", "k"], "/rank": ["user_id"], "/events": ["ts", "user_id", "item_id", "value"]}
NON_FINITE = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1E400"]


def _post(kind: str, path: str, raw: bytes | None, **headers: str | bytes) -> Hostile:
    """A JSON POST of `raw` (with the key on /events); `headers` add to or, set to "", drop JSON's and the key."""
    merged = {**JSON, **(KEY if path == "/events" else {}), **headers}
    return Hostile(kind, "POST", path, raw, {k: v for k, v in merged.items() if v})


def _with(path: str, field_name: str, literal: str) -> bytes:
    """The path's valid body with one field's value replaced by a raw JSON literal."""
    body = json.dumps({**VALID[path], field_name: "__X__"})
    return body.replace('"__X__"', literal).encode()


def hostile_requests(rng: random.Random, limit: int) -> Iterator[Hostile]:
    """One round: every kind against every endpoint it applies to (and one valid request per endpoint)."""
    over_cap = [b" " * 65536] * (3 * limit // 65536)  # 3x the cap, in chunks
    for path, valid in VALID.items():
        text = json.dumps(valid).encode()
        yield _post("valid", path, json.dumps({**valid, "event_id": f"e{rng.getrandbits(64)}"}).encode()
                    if path == "/events" else text)
        for name in NUMBERS[path]:
            yield _post("non_finite", path, _with(path, name, rng.choice(NON_FINITE)))
        surrogate = f'"\\ud{rng.randrange(0x800, 0xfff):03x}"'
        yield _post("surrogate_value", path, _with(path, "event_id" if path == "/events" else "user_id", surrogate))
        yield _post("surrogate_key", path, text.replace(b"{", b"{" + surrogate.encode() + b": 1, ", 1))
        bad_utf8 = text.replace(b'"', b'"\xff\xfe', 1)
        for content_type in ("text/plain", "", "application/json"):
            yield _post("invalid_utf8", path, bad_utf8, **{"content-type": content_type})
        depth = rng.choice([17, 100, 5000, 200_000])
        yield _post("deep_nesting", path, b"[" * depth + b"]" * depth)
        yield _post("deep_nesting", path, b'{"a":' * depth + b"1" + b"}" * depth)
        yield _post("huge_body", path, b"[" + b"1," * (limit // 2 + rng.randrange(1, 1000)) + b"1]")
        chunked = _post("huge_chunked", path, None)
        chunked.chunks = [*over_cap, text]
        yield chunked
        yield _post("false_content_length", path, text + b" " * 4096,
                    **{"content-length": rng.choice(["-1", "1e3", "99999999999999999999", "abc"])})
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                             "application/json; charset=latin-1", "application/xml"):
            yield _post("wrong_content_type", path, text, **{"content-type": content_type})
        tag = f"{rng.getrandbits(16):x}"
        extra = {**valid, **{f"{tag}{i}": 0 for i in range(60_000)}}  # ~0.7 MiB: under the cap
        yield _post("extra_keys", path, json.dumps(extra, separators=(",", ":")).encode())
        yield _post("extra_keys", path, json.dumps({**valid, "\U0001F600" * 50: 1}).encode())
        yield _post("many_errors", path, json.dumps({**valid, **{f"{tag}{i}": 0 for i in range(50)}}).encode())
        for name in NUMBERS[path]:
            literal = rng.choice(['"7"', "true", "[1]", '{"a":1}', "null", "1" * 5000, str(2**64), "-5", "0.5"])
            yield _post("odd_values", path, _with(path, name, literal))
        yield _post("truncated_json", path, text[: rng.randrange(1, len(text))])
        yield _post("random_bytes", path, rng.randbytes(rng.randrange(1, 2048)))
        yield _post("empty_body", path, b"")
    yield _post("many_errors", "/events", json.dumps([{**VALID["/events"], "user_id": -1}] * 5000).encode())
    events = json.dumps([VALID["/events"]] * 4000).encode()
    yield _post("events_without_key", "/events", events, **{"X-API-Key": ""})
    yield _post("events_without_key", "/events", events,
                **{"X-API-Key": rng.choice(["wrong", b"\xc3\xa9\xff", API_KEY + "x"])})
    chunked = _post("events_without_key", "/events", None, **{"X-API-Key": ""})
    chunked.chunks = over_cap
    yield chunked
    yield _post("debug_without_key", "/recommend", json.dumps({**VALID["/recommend"], "debug": True}).encode())
    yield Hostile("get_with_body", "GET", "/healthz", b"\xff" * 1000, {"content-type": "text/plain"})


async def run(rounds: int, seed: int) -> dict[str, Any]:
    from serving.common import INGRESS_LIMITS

    rng = random.Random(seed)
    per_kind: dict[str, dict[str, Any]] = defaultdict(lambda: {"requests": 0, "statuses": Counter(),
                                                                "max_bytes": 0, "max_error_bytes": 0, "max_ms": 0.0})
    server_errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="hostile-") as landing, in_process_app(landing) as (app, stages):
        limit = INGRESS_LIMITS["max_body_bytes"]
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://hostile", timeout=60) as client:
            t0 = time.perf_counter()
            for _ in range(rounds):
                for request in hostile_requests(rng, limit):
                    t = time.perf_counter()
                    response = await request.send(client)
                    ms = (time.perf_counter() - t) * 1000
                    stats = per_kind[request.kind]
                    stats["requests"] += 1
                    stats["statuses"][response.status_code] += 1
                    stats["max_bytes"] = max(stats["max_bytes"], len(response.content))
                    if response.status_code >= 400:
                        stats["max_error_bytes"] = max(stats["max_error_bytes"], len(response.content))
                    stats["max_ms"] = max(stats["max_ms"], round(ms, 2))
                    if response.status_code >= 500:
                        server_errors.append(f"{request.kind} {request.path}: {response.status_code}")
            seconds = time.perf_counter() - t0
        landed = sorted(p.name for p in Path(landing).iterdir())
    accepted = sum(s["statuses"].get(202, 0) for s in per_kind.values())
    total = sum(s["requests"] for s in per_kind.values())
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
        "client": "in-process ASGI (httpx.ASGITransport) to serving.app's FastAPI app; stages stubbed, no Serve proxy",
        "seed": seed, "rounds": rounds, "requests": total, "seconds": round(seconds, 1),
        "server_errors": len(server_errors), "server_error_examples": server_errors[:5],
        "max_response_bytes": max(s["max_bytes"] for s in per_kind.values()),
        "max_error_response_bytes": max(s["max_error_bytes"] for s in per_kind.values()),
        "slowest_ms": max(s["max_ms"] for s in per_kind.values()),
        "accepted_202": accepted, "event_intake_calls": stages.ingested, "landing_files": len(landed),
        "landing_matches_202s": len(landed) == accepted,
        "kinds": {k: {**v, "statuses": {str(c): n for c, n in sorted(v["statuses"].items())}}
                  for k, v in sorted(per_kind.items())},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=64, help="rounds of every kind (86 requests each)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    result = asyncio.run(run(args.rounds, args.seed))
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "hostile.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"{result['requests']} hostile requests in {result['seconds']}s: {result['server_errors']} 5xx, largest "
          f"answer {result['max_response_bytes']} B (error: {result['max_error_response_bytes']} B), slowest "
          f"{result['slowest_ms']} ms, landing files "
          f"{result['landing_files']} = 202s {result['accepted_202']}: {result['landing_matches_202s']}")
    for name, stats in result["kinds"].items():
        print(f"  {name:22s} {stats['requests']:6d}  {stats['statuses']}  max {stats['max_bytes']} B "
              f"(error {stats['max_error_bytes']} B) {stats['max_ms']} ms")
    return 1 if result["server_errors"] or not result["landing_matches_202s"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
