"""The security review's findings on the HTTP API, one test each: through the served application (Serve's proxy
in front, as deployed) where the finding was made, in process where the test must see inside a request."""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from pathlib import Path

import pytest

from serving.deploy import set_user_config, wait_for_versions
from tests.security.conftest import ERROR_BYTES
from training.artifact import artifact_version

pytestmark = pytest.mark.timeout(300)

NOW_MS = int(time.time() * 1000)
EVENT = {"event_id": "sec-1", "ts": NOW_MS, "user_id": 5, "item_id": 4, "action": "like"}
VALID = {"/recommend": {"user_id": 1, "k": 5}, "/rank": {"user_id": 1, "item_ids": [1, 2]}, "/events": EVENT}
JSON = {"content-type": "application/json"}


def send(served, path: str, raw, headers: dict | None = None):
    """POST raw bytes as JSON, to /events with the key; `headers` add to those or, set to None, drop them."""
    merged = {**JSON, **({"X-API-Key": served.api_key} if path == "/events" else {}), **(headers or {})}
    return served.http.post(served.url + path, content=raw, headers={k: v for k, v in merged.items() if v})


def with_literal(path: str, field: str, literal: str) -> bytes:
    return json.dumps({**VALID[path], field: "__X__"}).replace('"__X__"', literal).encode()


def assert_short_error(r, status: int, words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:300])
    assert len(r.content) <= ERROR_BYTES and words in r.text, r.text[:300]


def landed(served) -> list[str]:
    return sorted(p.name for p in Path(served.cfg.ingest.landing_dir).iterdir())


def test_non_finite_numbers_are_refused_at_parse_time(served):
    for path, field in [("/recommend", "user_id"), ("/recommend", "k"), ("/rank", "user_id"), ("/events", "ts"),
                        ("/events", "value")]:
        for literal in ("NaN", "Infinity", "-Infinity", "1e999"):
            assert_short_error(send(served, path, with_literal(path, field, literal)), 400, "finite")


def test_lone_surrogates_in_values_and_keys_are_refused(served):
    for path in VALID:
        field = "event_id" if path == "/events" else "user_id"
        assert_short_error(send(served, path, with_literal(path, field, '"\\ud800"')), 400, "lone surrogate")
        key = json.dumps(VALID[path]).replace("{", '{"\\udfff": 1, ', 1).encode()
        assert_short_error(send(served, path, key), 400, "lone surrogate")


def test_invalid_utf8_is_refused_whatever_the_content_type(served):
    for path in VALID:
        raw = json.dumps(VALID[path]).encode().replace(b'"', b'"\xff', 1)
        assert_short_error(send(served, path, raw, {"content-type": "text/plain"}), 415, "content-type")
        assert_short_error(send(served, path, raw, {"content-type": None}), 400, "UTF-8")
        assert_short_error(send(served, path, raw), 400, "UTF-8")


def test_many_extra_keys_or_bad_events_get_a_short_answer_quickly(served):
    """0.8 MiB of 60k unknown keys was a 6 MB answer after 3 s of CPU: now refused while parsing. Fewer
    unknown keys, or thousands of bad events, get the first few errors and a count of the rest."""
    body = json.dumps({**VALID["/recommend"], **{f"x{i:06d}": 1 for i in range(60_000)}}).encode()
    assert 0.7 * 2**20 < len(body) < 2**20
    t = time.perf_counter()
    r = send(served, "/recommend", body)
    assert time.perf_counter() - t < 3.0
    assert_short_error(r, 400, "more than 64 keys")
    r = send(served, "/recommend", json.dumps({**VALID["/recommend"], **{f"x{i}": 1 for i in range(60)}}).encode())
    assert_short_error(r, 422, "55 more errors not shown")
    assert r.json()["detail"][0] == {"loc": ["body", "(unknown field)"], "msg": "Extra inputs are not permitted",
                                     "type": "extra_forbidden"}
    t = time.perf_counter()
    r = send(served, "/events", json.dumps([{**EVENT, "user_id": -1}] * 5000).encode())
    assert time.perf_counter() - t < 3.0
    assert_short_error(r, 422, "more errors not shown")


def test_validation_errors_name_the_field_without_echoing_the_input(served):
    body = {"user_id": "zq-marker-value", "k": [{"zq-marker-nested": 1}], "zq-marker-key": "zq-marker-value"}
    r = send(served, "/recommend", json.dumps(body).encode())
    assert_short_error(r, 422, "user_id")
    assert "zq-marker" not in r.text and {"k", "(unknown field)"} <= {p for d in r.json()["detail"] for p in d["loc"]}


def test_a_chunked_body_over_the_cap_gets_413(served):
    """No Content-Length to check: the bytes that arrive are counted (the proxy passes them on as they come)."""
    def chunks(total: int, tail: bytes = b""):
        for _ in range(total // 65536):
            yield b" " * 65536
        yield tail

    for path in VALID:
        assert_short_error(send(served, path, chunks(3 << 20, b"{}")), 413, "larger than")
    small = send(served, "/recommend", chunks(65536, json.dumps(VALID["/recommend"]).encode()))
    assert small.status_code == 200, small.text  # a chunked body under the cap is read as any other


def test_the_cap_counts_bytes_received_not_the_content_length_header(ingress):
    """A Content-Length that lies low does not let more bytes in."""
    async def body():
        for _ in range(32):
            yield b" " * 65536

    r = ingress.request("POST", "/recommend", content=body(), headers={**JSON, "content-length": "10"})
    assert_short_error(r, 413, "larger than")


def test_events_without_the_key_are_refused_before_the_body_is_read(ingress):
    """The ASGI app is called directly: without the key, /events answers 401 and never calls `receive`."""
    from serving.app import app

    def call(headers: list[tuple[bytes, bytes]]) -> tuple[int, int]:
        received, sent = [], []

        async def receive():
            received.append(1)
            return {"type": "http.request", "body": json.dumps(EVENT).encode(), "more_body": False}

        async def send_(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
                 "scheme": "http", "path": "/events", "raw_path": b"/events", "root_path": "", "query_string": b"",
                 "headers": [(b"content-type", b"application/json"), *headers], "server": ("test", 80),
                 "client": ("test", 1)}
        ingress.loop.run_until_complete(app(scope, receive, send_))
        return sent[0]["status"], len(received)

    assert call([]) == (401, 0)
    assert call([(b"x-api-key", b"wrong")]) == (401, 0)
    status, reads = call([(b"x-api-key", ingress.api_key.encode())])
    assert status == 202 and reads >= 1


def test_events_without_the_key_get_401_while_the_body_is_still_unsent(served):
    """Through the proxy: headers announcing 900 KB and not one body byte; the 401 comes anyway."""
    host, port = served.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=20) as conn:
        conn.sendall(b"POST /events HTTP/1.1\r\nHost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 900000\r\n\r\n")
        answer = conn.recv(4096)
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]


def test_rejected_events_leave_the_landing_folder_unchanged(served):
    before = landed(served)
    cases = [
        (json.dumps(EVENT).encode(), {"X-API-Key": None}, 401),
        (json.dumps(EVENT).encode(), {"X-API-Key": "wrong"}, 401),
        (with_literal("/events", "value", "NaN"), {}, 400),
        (with_literal("/events", "event_id", '"\\ud800"'), {}, 400),
        (json.dumps(EVENT).encode().replace(b"sec", b"\xff"), {}, 400),
        (json.dumps(EVENT).encode(), {"content-type": "text/plain"}, 415),
        (json.dumps({**EVENT, **{f"x{i}": 1 for i in range(50_000)}}).encode(), {}, 400),
        (json.dumps({**EVENT, **{f"x{i}": 1 for i in range(50)}}).encode(), {}, 422),
        (json.dumps([EVENT, {**EVENT, "user_id": -1}]).encode(), {}, 422),
        (json.dumps([EVENT, {**EVENT, "ts": 5}]).encode(), {}, 422),  # refused by the intake's contract check
        (json.dumps([EVENT] * 60_000).encode(), {}, 413),
        (b"[" * 5000 + b"]" * 5000, {}, 400),
    ]
    for raw, headers, status in cases:
        r = send(served, "/events", raw, headers)
        assert r.status_code == status and len(r.content) <= ERROR_BYTES, (status, r.status_code, r.text[:200])
    assert landed(served) == before


def test_history_items_need_debug_and_the_key(served):
    plain = served.post("/recommend", {"user_id": 1, "k": 5})
    assert plain.status_code == 200 and plain.json()["history_items"] is None
    assert served.post("/recommend", {"user_id": 1, "k": 5, "debug": True}).status_code == 401
    wrong = served.post("/recommend", {"user_id": 1, "k": 5, "debug": True}, headers={"X-API-Key": "wrong"})
    assert_short_error(wrong, 401, "X-API-Key")
    keyed = served.post("/recommend", {"user_id": 1, "k": 5}, headers={"X-API-Key": served.api_key})
    assert keyed.json()["history_items"] is None  # the key alone does not ask for it
    debug = served.post("/recommend", {"user_id": 1, "k": 5, "debug": True}, headers={"X-API-Key": served.api_key})
    assert debug.status_code == 200 and debug.json()["history_items"]


def _reveals_where(text: str, served) -> list[str]:
    places = [str(Path(served.cfg.ingest.landing_dir).parent), str(served.ranker), "/tmp", "s3://", "127.0.0.1",
              socket.gethostname()]
    return [p for p in places if p in text]


def test_healthz_and_202_name_no_path_or_host(served):
    health = served.http.get(served.url + "/healthz")
    assert health.status_code == 200 and set(health.json()) == {"status", "model_versions", "problems"}
    assert not _reveals_where(health.text, served), health.text
    r = served.post("/events", {**EVENT, "event_id": "sec-202"}, headers={"X-API-Key": served.api_key})
    assert r.status_code == 202 and set(r.json()) == {"accepted", "features_updated", "timings_ms"}, r.text
    assert not _reveals_where(r.text, served), r.text


def test_a_broken_artifact_is_named_without_its_path_and_fails_the_deploy_check(served, tmp_path):
    """A copy of the ranker whose weights no longer match its manifest: /healthz says the ranker's artifact
    failed to load and why, without a path, and still serves the old version; wait_for_versions raises at once."""
    bad = tmp_path / "ranker-corrupt"
    shutil.copytree(served.ranker, bad)
    weights = bad / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64] + bytes(64))
    good = artifact_version(str(served.ranker))
    sc = set_user_config(served.sc, "Ranker", artifact=str(bad))
    try:
        health = served.http.get(served.url + "/healthz")
        problem = "ranker: artifact failed to load (ValueError: sha256 does not match the manifest)"
        assert problem in health.json()["problems"], health.text
        assert health.json()["model_versions"]["ranker"] == good
        assert not _reveals_where(health.text, served) and str(bad) not in health.text, health.text
        t = time.perf_counter()
        with pytest.raises(RuntimeError, match=re.escape(problem)):
            wait_for_versions(served.url, {"ranker": artifact_version(str(bad))}, timeout_s=30)
        assert time.perf_counter() - t < 10
    finally:
        set_user_config(sc, "Ranker", artifact=str(served.ranker))
    assert wait_for_versions(served.url, {"ranker": good}, timeout_s=30)["model_versions"]["ranker"] == good
