"""The cluster's servers on one machine, on 127.0.0.1 only: an S3-compatible server, Redis, a multi-node Ray.

What a KubeRay deployment gives the stages, played by real processes so the cluster profile runs unchanged
(ray_jobs/rehearsal.py):
- `S3Server`: moto's standalone S3 server (a real S3 HTTP API; MinIO's place in dev, S3's in prod).
- `RedisServer`: Debian's redis-server with a password (the online store; the prod Redis has one too).
- `RayCluster`: a head with `num_cpus=0` (as in every RayJob/RayService of k8s/) plus worker nodes, each its own
  raylet on this host (`ray.cluster_utils.Cluster`). Nodes can be killed and added while jobs run, as when
  Kubernetes loses a pod and KubeRay creates another.
Each is started with its own ports and stopped by PID; nothing here calls `ray stop` (it would end every Ray
on the machine).

    with S3Server() as s3, RedisServer() as redis, RayCluster(workers=2, env=s3.env) as cluster:
        print(cluster.dashboard_url)
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Any
from unittest import mock

import httpx

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 not handed out before in this process (the kernel may offer one port twice
    while nothing listens on it yet, and Ray refuses one port for two of its components)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def _wait(check, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if check():
                return
        time.sleep(0.2)
    raise TimeoutError(f"{what} did not come up within {timeout_s:.0f}s")


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _serve(cmd: list[str], ready, what: str) -> subprocess.Popen:
    """Start a server and wait until `ready()`; a server that never gets ready is stopped, not left behind."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(ready, what)
    except BaseException:
        _stop(proc)
        raise
    return proc


class S3Server:
    """moto's S3 server on 127.0.0.1 with one bucket; `env` is what a pod gets from its Secret and overlay."""

    def __init__(self, bucket: str = "streamrec-lake"):
        self.bucket, self.port = bucket, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # moto accepts any key pair; a random one proves nothing reads keys from a file.
        self.env = {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": secrets.token_hex(8),
                    "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16), "AWS_REGION": "us-east-1",
                    "AWS_ALLOW_HTTP": "true", "FEAST_S3_ENDPOINT_URL": self.url,
                    # Nothing may fall back to the cloud metadata address when a setting is missing: only loopback.
                    "AWS_EC2_METADATA_DISABLED": "true"}

    def __enter__(self) -> S3Server:
        import boto3

        def ready() -> bool:
            if httpx.get(self.url, timeout=2).status_code >= 500:
                return False
            boto3.client("s3", endpoint_url=self.url, region_name="us-east-1",
                         aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                         aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=self.bucket)
            return True

        self.proc = _serve([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)], ready,
                           f"S3 server at {self.url}")
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class RedisServer:
    """redis-server on 127.0.0.1 with a password and no persistence."""

    def __init__(self):
        if not shutil.which("redis-server"):
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.port, self.password = free_port(), secrets.token_hex(12)
        self.connection_string = f"127.0.0.1:{self.port},password={self.password}"

    def __enter__(self) -> RedisServer:
        import redis

        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password)
        self.proc = _serve(["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                            "--appendonly", "no", "--requirepass", self.password], client.ping,
                           f"redis-server on port {self.port}")
        return self

    def __exit__(self, *exc) -> None:
        _stop(self.proc)


class RayCluster:
    """A head (no CPUs: the drivers of submitted jobs run there, work goes to workers) and `workers` worker nodes.

    `env` reaches every Ray process (as a pod's environment does). Token authentication is on, as in the cluster
    manifests (KubeRay's authOptions mode token): a process that talks to this cluster needs `client_env` (the
    `ray` CLI and SDK read it) or `auth_headers` (plain HTTP to the dashboard). Ray 2.60 would otherwise pick
    the mode by itself: `ray.init()` turns token auth on for a new local cluster and saves ~/.ray/auth_token,
    after which any Ray started without RAY_AUTH_MODE on that machine requires that token. Each worker node's
    Serve proxy gets its own
    HTTP port (`proxy_ports`): on Kubernetes every pod has its own IP and they all use 8000; here the nodes share
    one address, and distinct ports let a test reach each node's proxy by itself.
    """

    def __init__(self, workers: int = 2, cpus_per_worker: int = 2, env: dict[str, str] | None = None,
                 object_store_mb: int = 200):
        self.n_workers, self.cpus, self.object_store = workers, cpus_per_worker, object_store_mb << 20
        self.token = secrets.token_hex(32)
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}
        self.auth_headers = {"Authorization": f"Bearer {self.token}"}
        self.env = {**(env or {}), **self.client_env}
        self.serve_port = free_port()
        self.proxy_ports: dict[str, int] = {}  # node id -> its Serve proxy's HTTP port
        self.workers: list = []

    def __enter__(self) -> RayCluster:
        import ray._private.utils as ray_utils
        from ray._raylet import AuthenticationTokenLoader, Config
        from ray.cluster_utils import Cluster

        # Ray's socket paths have a length limit: a short temp dir. The head starts with the cluster's env (its
        # job drivers inherit it); worker nodes get theirs through env_vars.
        self.temp = tempfile.mkdtemp(prefix="rc-", dir="/tmp")
        self.dashboard_port = free_port()
        saved = dict(os.environ)
        os.environ.update({**self.env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"})
        # This process read RAY_AUTH_MODE when it imported Ray; re-read it (and the token) as Ray's own tests do,
        # or it would start a token cluster and talk to it without the token.
        Config.initialize("")
        AuthenticationTokenLoader.instance().reset_cache()
        try:
            # cluster_utils writes the head's address to /tmp/ray/ray_current_cluster, the file that
            # `ray.init(address="auto")` of any process on the machine reads: write it into this cluster's own
            # temp dir instead. It must exist there: a submitted job's supervisor resolves "auto" from it, and
            # without it Ray falls back to any GCS process it finds on the host, which, with another Ray
            # running (the test session's), put a job's driver on the wrong cluster.
            write_address = ray_utils.write_ray_address
            with mock.patch("ray._private.utils.write_ray_address",
                            lambda address, temp_dir=None: write_address(address, self.temp)):
                self.cluster = Cluster(initialize_head=True, shutdown_at_exit=False, head_node_args={
                    "num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": True,
                    "dashboard_host": "127.0.0.1", "dashboard_port": self.dashboard_port, "temp_dir": self.temp,
                    "object_store_memory": self.object_store, "gcs_server_port": free_port(),
                    "ray_client_server_port": free_port(), "dashboard_agent_listen_port": free_port(),
                    "metrics_export_port": free_port(), "runtime_env_agent_port": free_port()})
            for _ in range(self.n_workers):
                self.add_worker()
        except BaseException:
            self.__exit__()
            raise
        finally:
            os.environ.clear()
            os.environ.update(saved)
        self.dashboard_url = f"http://127.0.0.1:{self.dashboard_port}"
        return self

    def dashboard_json(self, path: str) -> Any:
        """GET the dashboard's `path` (e.g. /api/serve/applications/) as JSON, with the cluster's token."""
        answer = httpx.get(f"{self.dashboard_url}{path}", headers=self.auth_headers, timeout=30)
        answer.raise_for_status()
        return answer.json()

    def add_worker(self):
        """A new worker node (what KubeRay does when a worker pod is gone)."""
        port = free_port()
        node = self.cluster.add_node(
            num_cpus=self.cpus, node_ip_address="127.0.0.1", object_store_memory=self.object_store,
            dashboard_agent_listen_port=free_port(), metrics_export_port=free_port(),
            runtime_env_agent_port=free_port(),
            env_vars={**self.env, "RAY_SERVE_WORKER_PROXY_HTTP_PORT": str(port)})
        self.proxy_ports[node.node_id] = port
        self.workers.append(node)
        return node

    def kill_worker(self, node_id: str) -> None:
        """Kill every process of one worker node at once (no graceful shutdown: a lost pod)."""
        node = next(n for n in self.workers if n.node_id == node_id)
        self.cluster.remove_node(node, allow_graceful=False)
        self.workers.remove(node)
        self.proxy_ports.pop(node_id, None)

    @property
    def head_node_id(self) -> str:
        return self.cluster.head_node.node_id

    def __exit__(self, *exc) -> None:
        cluster = getattr(self, "cluster", None)
        if cluster is not None:
            for node in list(cluster.worker_nodes):
                with contextlib.suppress(Exception):
                    cluster.remove_node(node, allow_graceful=False)
            if cluster.head_node is not None:
                with contextlib.suppress(Exception):
                    cluster.remove_node(cluster.head_node, allow_graceful=False)
        _kill_leftovers(self.temp)
        shutil.rmtree(self.temp, ignore_errors=True)


def _kill_leftovers(temp: str) -> None:
    """Job drivers and workers whose command line names this cluster's temp dir (they may outlive a raylet)."""
    import psutil

    mine = [p for p in psutil.process_iter(["cmdline"]) if any(temp in a for a in (p.info["cmdline"] or []))]
    for p in mine:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(mine, timeout=20)
