"""The serving stage of `make demo`: deploy the app, send a handful of requests, print what came back, shut down.

    from ray_jobs.serve_demo import serve_and_query
    serve_and_query(cfg, "data/demo/artifacts/ranker", "data/demo/artifacts/retriever")

`cfg` is the demo's PlatformConfig (its lake and online store must hold the feature job's output).
"""

from __future__ import annotations

import os
import secrets
import tempfile
import time
from pathlib import Path

import httpx
import yaml

from config.schema import PlatformConfig


def _users(cfg: PlatformConfig, n: int) -> list[int]:
    """The most active users of the lake (they have histories to retrieve from)."""
    from features.offline import duckdb_connection

    con = duckdb_connection()
    try:
        rows = con.execute(f"SELECT user_id FROM delta_scan('{cfg.lake.events}') WHERE action <> 'impression' "
                           "GROUP BY user_id ORDER BY count(*) DESC, user_id LIMIT ?", [n]).fetchall()
    finally:
        con.close()
    return [int(r[0]) for r in rows]


def _show(title: str, body: dict) -> None:
    items = ", ".join(f"{it['item_id']}({it['score']:.3f})" for it in body.get("items", [])[:10])
    timings = " ".join(f"{k}={v:.1f}" for k, v in body.get("timings_ms", {}).items())
    print(f"   {title}: [{items}]")
    print(f"      retrieved={body.get('candidates_retrieved', '-')} fallback={body.get('fallback')} "
          f"versions={body.get('model_versions')} ms: {timings}")


def serve_and_query(cfg: PlatformConfig, ranker_dir: str | Path, retriever_dir: str | Path,
                    keep_serving: bool = False, users: list[int] | None = None,
                    dense_dir: str | Path | None = None) -> dict:
    """Deploy, query (recommend, rank, one event, recommend again, an unknown user), print; returns the last
    responses. `dense_dir`: a dense retriever artifact, the dense retrieval channel beside the generative one.
    With `keep_serving`, serve until Ctrl-C/SIGTERM before shutting down."""
    from features.repo import absolute_paths
    from ray_jobs.runtime import init_ray
    from serving.deploy import base_url, deploy, serve_config, shutdown

    cfg = absolute_paths(cfg)
    init_ray(cfg.ray)
    profile = Path(tempfile.mkdtemp(prefix="streamrec-serve-")) / "profile.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The ingress reads the /events key from its environment (a Kubernetes Secret on the cluster).
    key = os.environ.get(cfg.serving.api_key_env) or secrets.token_hex(16)
    sc = serve_config(config=str(profile), ranker=str(Path(ranker_dir).resolve()),
                      retriever=str(Path(retriever_dir).resolve()), host=cfg.serving.host, port=cfg.serving.port,
                      dense_retriever=str(Path(dense_dir).resolve()) if dense_dir else None,
                      deployments={"Ingress": {"ray_actor_options": {
                          "num_cpus": 0.2, "runtime_env": {"env_vars": {cfg.serving.api_key_env: key}}}}})
    t = time.perf_counter()
    deploy(sc)
    url = base_url(sc)
    print(f"   deployed at {url} in {time.perf_counter() - t:.1f}s (OpenAPI docs: {url}/docs)")
    out: dict = {}
    try:
        with httpx.Client(base_url=url, timeout=30) as http:
            print(f"   GET /healthz -> {http.get('/healthz').json()}")
            users = users or _users(cfg, 3)
            for user in users:
                _show(f"POST /recommend user {user}", http.post("/recommend", json={"user_id": user, "k": 10}).json())
            user = users[0]
            first = http.post("/recommend", json={"user_id": user, "k": 5}).json()
            items = [it["item_id"] for it in first["items"]]
            ranked = http.post("/rank", json={"user_id": user, "item_ids": items}).json()
            _show(f"POST /rank user {user} items {items}", ranked)
            event = {"event_id": f"demo-{secrets.token_hex(6)}", "ts": int(time.time() * 1000), "user_id": user,
                     "item_id": items[0], "action": "click"}
            r = http.post("/events", json=event, headers={"X-API-Key": key})
            print(f"   POST /events {event} -> {r.status_code} {r.json()}")
            # debug + key: the response then carries the user's history, to show the click in it.
            after = http.post("/recommend", json={"user_id": user, "k": 10, "debug": True},
                              headers={"X-API-Key": key}).json()
            print(f"   history of user {user} now starts with {after['history_items'][:5]} "
                  f"(clicked {items[0]}: {'seen' if after['history_items'][:1] == [items[0]] else 'NOT seen'})")
            _show(f"POST /recommend user {user} after the click", after)
            _show("POST /recommend unknown user 987654321",
                  http.post("/recommend", json={"user_id": 987654321, "k": 10}).json())
            out = {"first": first, "ranked": ranked, "after": after}
        if keep_serving:
            print(f"   serving at {url} until interrupted (Ctrl-C)")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    finally:
        shutdown()
    return out
