"""The documented local entry point, `python -m ray_jobs.deploy`, serves through Ray Serve's HAProxy mode: an
haproxy process owns the HTTP port and /recommend answers there (serving.deploy.SERVE_PROCESS_ENV)."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time

import httpx
import psutil
import yaml

from serving.deploy import CONFIG_PATH, SERVE_PROCESS_ENV
from tests.redis_server import free_port
from tests.serving.conftest import ITEMS, KEY_ENV, prepare_app

REPO = CONFIG_PATH.parents[1]


def test_the_cluster_pods_get_the_same_serve_environment_and_haproxy_the_request_timeout():
    service = yaml.safe_load((REPO / "k8s" / "base" / "rayservice.yaml").read_text())
    spec = service["spec"]["rayClusterConfig"]
    groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for group in groups:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert SERVE_PROCESS_ENV.items() <= env.items()
    timeout = yaml.safe_load(CONFIG_PATH.read_text())["http_options"]["request_timeout_s"]
    assert float(SERVE_PROCESS_ENV["RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S"]) == timeout


def _haproxy_listening_on(root: psutil.Process, port: int) -> psutil.Process | None:
    for proc in root.children(recursive=True):
        try:
            if proc.name() == "haproxy" and any(c.laddr.port == port and c.status == psutil.CONN_LISTEN
                                                for c in proc.net_connections()):
                return proc
        except psutil.Error:
            continue
    return None


def test_local_deploy_serves_recommend_through_haproxy_on_the_http_port(feature_lake, tmp_path):
    # `feature_lake` is the serving package's (its conftest): importing it here would build a second lake with Ray
    # Data while the package's Serve app holds the test Ray's CPUs, and wait for them forever.
    app = prepare_app(feature_lake, tmp_path)
    port, key = free_port(), secrets.token_hex(16)
    env = {k: v for k, v in os.environ.items() if k not in SERVE_PROCESS_ENV and k != "RAY_ADDRESS"}
    env[KEY_ENV] = key
    cmd = [sys.executable, "-m", "ray_jobs.deploy", "--config", str(app.profile), "--set", f"serving.port={port}",
           "--ranker", str(app.ranker), "--retriever", str(app.retriever), "--blocking"]
    log = tmp_path / "deploy.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while "serving at" not in log.read_text():
            assert proc.poll() is None, f"ray_jobs.deploy exited {proc.returncode}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"not serving after 600 s:\n{log.read_text()[-4000:]}"
            time.sleep(1)
        url = f"http://127.0.0.1:{port}"
        assert _haproxy_listening_on(psutil.Process(proc.pid), port) is not None, "no haproxy owns the HTTP port"
        assert httpx.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
        got = httpx.post(f"{url}/recommend", json={"user_id": 1, "k": 5}, timeout=30)
        assert got.status_code == 200, got.text
        assert len(got.json()["items"]) == 5 and {i["item_id"] for i in got.json()["items"]} <= set(ITEMS)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
