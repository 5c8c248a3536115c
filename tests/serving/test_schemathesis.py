"""Property-based API testing: schemathesis generates requests from the served OpenAPI schema (valid ones and
ones that break it); none may get a 5xx (and none may hang: every call has a timeout)."""

from __future__ import annotations

from collections import Counter

import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode

# Requests per (operation, mode): 1,200 in all, so at least 1,000 even if hypothesis runs out of distinct cases.
EXAMPLES = {
    ("POST", "/recommend"): {GenerationMode.POSITIVE: 250, GenerationMode.NEGATIVE: 150},
    ("POST", "/rank"): {GenerationMode.POSITIVE: 200, GenerationMode.NEGATIVE: 100},
    ("POST", "/events"): {GenerationMode.POSITIVE: 300, GenerationMode.NEGATIVE: 150},
    ("GET", "/healthz"): {GenerationMode.POSITIVE: 50},
}


def test_generated_requests_get_no_server_error(served):
    schema = schemathesis.openapi.from_url(served.url + "/openapi.json")
    calls: Counter = Counter()
    server_errors: list[str] = []
    def fuzz(op, mode, n: int) -> None:
        @settings(max_examples=n, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck), phases=[Phase.generate])
        @given(case=op.as_strategy(generation_mode=mode))
        def call(case):
            # Half of the /events cases carry the key, so the contract checks behind the auth get fuzzed too.
            headers = {"X-API-Key": served.api_key} if op.path == "/events" and calls[op.path] % 2 else None
            response = case.call(base_url=served.url, headers=headers, timeout=30)
            calls[op.path] += 1
            if response.status_code >= 500:
                server_errors.append(f"{op.method} {op.path} {mode}: {response.status_code} {response.text[:200]}"
                                     f" for {case.body!r:.200}")

        call()

    for result in schema.get_all_operations():
        op = result.ok()
        for mode, n in EXAMPLES[(op.method.upper(), op.path)].items():
            fuzz(op, mode, n)
    assert sum(calls.values()) >= 1000, calls
    assert not server_errors, server_errors[:5]
    print(f"schemathesis: {sum(calls.values())} requests {dict(calls)}, 0 server errors")
