"""The cluster path, rehearsed on one machine: every stage through `ray job submit`, S3 and Redis real.

    python -m ray_jobs.rehearsal                        # make rehearse; writes bench/results/rehearsal.json
    python -m ray_jobs.rehearsal --events 15000 --out /tmp/rehearsal.json

What it starts (127.0.0.1 only, stopped by PID at the end; ray_jobs/local_cluster.py): an S3 server, Redis
with a password, a Ray head with no CPUs and two worker nodes. Then, as a platform team would against a
KubeRay cluster, with the `rehearsal` profile (config/profiles/rehearsal.yaml: lake, landing, checkpoints,
Ray Train storage, artifacts and the Feast registry on s3://, the online store in Redis):
1. a producer puts simulated live-stream logs into s3://<bucket>/landing;
2. ingest, features, samples: `ray job submit ... -- python -m ray_jobs.<stage> --config rehearsal`;
3. train: Ray Train workers on the worker nodes, checkpoints on S3. Once the first checkpoint is on S3, the
   worker node running a training worker is killed (all its processes at once, a lost pod) and a new one
   joins (KubeRay replacing the pod). The run must resume from the checkpoint and finish with every request
   scored and trained on exactly once (training.ranking checks it; the figures are recorded here);
4. train_retriever: in a Ray task on a worker node (the head has no CPUs), artifact on S3;
5. deploy: Serve loads both artifacts from s3://, a proxy on every node; the deploy job succeeds only when
   /healthz reports the artifacts' versions, and every node's proxy is asked for /healthz and /recommend;
6. a bad deploy (an artifact whose weights do not match its manifest) must fail the job and leave the old
   versions serving.
Each stage's wall time (submission to the job's end, the job's driver start-up included) and where its
outputs went are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

import storage
from ray_jobs.local_cluster import RayCluster, RedisServer, S3Server, free_port

REPO = Path(__file__).resolve().parents[1]
RAY_CLI = str(Path(sys.executable).with_name("ray"))
DEFAULT_OUT = REPO / "bench" / "results" / "rehearsal.json"


class StageFailed(RuntimeError):
    """A submitted stage ended in a state other than the one the rehearsal expects."""


class Rehearsal:
    def __init__(self, cluster: RayCluster, bucket: str, run: str, log=print):
        self.cluster, self.bucket, self.run, self.log = cluster, bucket, run, log
        self.stages: list[dict[str, Any]] = []
        from ray.job_submission import JobSubmissionClient

        self.jobs = JobSubmissionClient(cluster.dashboard_url)

    def s3(self, *parts: str) -> str:
        return storage.join(f"s3://{self.bucket}", *parts)

    def submit(self, module: str, *args: str, wait: bool = True) -> str:
        """`ray job submit` of `python -m <module> --config rehearsal <args>`; returns the submission id."""
        job_id = f"{module.rsplit('.', 1)[-1]}-{self.run}-{len(self.stages)}"
        # No working_dir upload: the code is installed on every node, as it is in the image on Kubernetes.
        cmd = [RAY_CLI, "job", "submit", f"--address={self.cluster.dashboard_url}", f"--submission-id={job_id}",
               *([] if wait else ["--no-wait"]), "--",
               sys.executable, "-m", module, "--config", "rehearsal", *args]
        for _ in range(30):  # right after start-up the head's job agent may not accept jobs yet
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
            if "No available agent" not in done.stdout + done.stderr:
                break
            time.sleep(2)
        if not wait and done.returncode:
            raise StageFailed(f"submitting {module} failed: {(done.stdout + done.stderr)[-2000:]}")
        return job_id

    def finish(self, job_id: str, expect: str = "SUCCEEDED", timeout_s: float = 1200) -> str:
        """Wait for a job's end; its logs. Raises unless it ended `expect`."""
        deadline = time.monotonic() + timeout_s
        while not (status := self.jobs.get_job_status(job_id)).is_terminal():
            if time.monotonic() > deadline:
                self.jobs.stop_job(job_id)
                raise StageFailed(f"job {job_id} still {status} after {timeout_s:.0f}s")
            time.sleep(1)
        logs = self.jobs.get_job_logs(job_id)
        if status.value != expect:
            raise StageFailed(f"job {job_id} {status}, expected {expect}:\n{logs[-4000:]}")
        return logs

    def stage(self, name: str, module: str, *args: str, outputs: dict[str, Any] | None = None) -> str:
        self.log(f"\n== {name}: ray job submit -- python -m {module} --config rehearsal {' '.join(args)}")
        t = time.perf_counter()
        logs = self.finish(self.submit(module, *args))
        self.record(name, time.perf_counter() - t, outputs or {})
        return logs

    def record(self, name: str, seconds: float, outputs: dict[str, Any]) -> None:
        self.stages.append({"stage": name, "seconds": round(seconds, 1), "outputs": outputs})
        self.log(f"   {name}: {seconds:.1f}s -> {json.dumps(outputs)}")


def _train_worker_nodes(dashboard_url: str) -> set[str]:
    from ray.util.state import list_actors

    actors = list_actors(address=dashboard_url, filters=[("state", "=", "ALIVE")], limit=1000)
    return {a.node_id for a in actors if "TrainWorker" in (a.class_name or "")}


def _checkpoints(run_dir: str) -> list[str]:
    return sorted({f.split("/")[0] for f in storage.list_files(run_dir, recursive=True)
                   if f.startswith("checkpoint_") and "/" in f})


def _registered(run_dir: str) -> bool:
    """Ray Train has registered a checkpoint: its checkpoint manager wrote the run's snapshot (a checkpoint folder
    alone may not be registered yet, and a restart would then start from scratch; STACK.md)."""
    return storage.exists(storage.join(run_dir, "checkpoint_manager_snapshot.json"))


def train_with_node_loss(r: Rehearsal, run_name: str) -> dict[str, Any]:
    """The train stage, with the worker node of a training worker killed once a checkpoint is registered on S3."""
    run_dir = r.s3("train_runs", run_name)
    artifact = r.s3("artifacts", f"ranker-{r.run}")
    r.log(f"\n== train: ray job submit --no-wait -- python -m ray_jobs.train --config rehearsal (run {run_dir})")
    t = time.perf_counter()
    job_id = r.submit("ray_jobs.train", "--set", f"training.run_name={run_name}", "--artifact", artifact, wait=False)
    deadline = time.monotonic() + 900
    while not _registered(run_dir):
        if r.jobs.get_job_status(job_id).is_terminal():
            r.finish(job_id)  # raises if it failed; a run that ends before its first checkpoint proves nothing
            raise StageFailed("training ended before its first checkpoint: make the run longer")
        if time.monotonic() > deadline:
            raise StageFailed("no checkpoint on S3 after 900 s")
        time.sleep(0.5)
    first_checkpoint_s = time.perf_counter() - t
    victims = _train_worker_nodes(r.cluster.dashboard_url) - {r.cluster.head_node_id}
    if not victims:
        raise StageFailed("no training worker found on a worker node")
    victim = sorted(victims)[0]
    r.cluster.kill_worker(victim)
    killed_at = time.perf_counter() - t
    r.log(f"   killed worker node {victim[:12]} at {killed_at:.1f}s (first checkpoint at {first_checkpoint_s:.1f}s); "
          "a replacement node joins")
    r.cluster.add_worker()
    logs = r.finish(job_id)
    seconds = time.perf_counter() - t
    metrics = storage.read_json(storage.join(artifact, "metrics.json"))
    from deltalake import DeltaTable

    from training.stream import PredictionLog

    samples = DeltaTable(r.s3("lake", "samples_ranking")).to_pyarrow_table(columns=["sample_no"]).num_rows
    tasks = tuple(metrics["progressive"])
    kept = PredictionLog.read(storage.join(run_dir, "predictions"), tasks)
    rolled_back = PredictionLog.read(storage.join(run_dir, "predictions"), tasks, rolled_back=True)
    scored = len(set(kept["sample_no"].to_pylist()))
    kill = {"killed_node": victim, "first_checkpoint_s": round(first_checkpoint_s, 1),
            "killed_at_s": round(killed_at, 1), "restarts": metrics["restarts"], "steps": metrics["steps"],
            "samples": samples,
            "requests_trained": metrics["requests"], "requests_scored_once": scored,
            "score_rows_kept": kept.num_rows, "score_rows_rolled_back": rolled_back.num_rows,
            "checkpoints_on_s3": _checkpoints(run_dir), "resumed_line": _first(r"resumed at step \d+", logs),
            "auc": metrics["progressive"][tasks[0]].get("auc")}
    if metrics["restarts"] < 1 or scored != samples or metrics["requests"] != samples:
        raise StageFailed(f"the run did not resume into one clean pass: {kill}")
    r.record("train", seconds, {"artifact": artifact, "version": storage.read_json(storage.join(artifact,
             "manifest.json"))["version"], "run_dir": run_dir, "checkpoints": kill["checkpoints_on_s3"]})
    return kill


def _first(pattern: str, text: str) -> str | None:
    found = re.search(pattern, text)
    return found.group(0) if found else None


def _health(port: int) -> dict[str, Any]:
    return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=30).json()


def _corrupt_copy(src: str, dst: str) -> None:
    """`src` copied to `dst` with its weights changed after the manifest was written (a torn or tampered upload)."""
    for name in storage.list_files(src):
        data = storage.read_bytes(storage.join(src, name))
        if name == "weights.safetensors":
            data = data[:-64] + bytes(64)
        storage.write_bytes(storage.join(dst, name), data)


def rehearse(events: int, log=print) -> dict[str, Any]:
    started = datetime.now(UTC)
    run = started.strftime("%Y%m%dt%H%M%S")
    machine = _machine()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rehearsal-") as scratch, S3Server() as s3, RedisServer() as redis:
        serve_port = free_port()
        env = {**s3.env, "STREAMREC_BUCKET": s3.bucket, "REDIS_CONNECTION_STRING": redis.connection_string,
               "STREAMREC_SCRATCH": scratch, "STREAMREC_SERVE_PORT": str(serve_port),
               "STREAMREC_API_KEY": os.urandom(12).hex(), "PYTHONUNBUFFERED": "1"}
        os.environ.update(env)  # this process reads S3 too (the checks below)
        with RayCluster(workers=2, cpus_per_worker=2, env=env) as cluster:
            os.environ.update(cluster.client_env)  # `ray job submit` and the job SDK below present the token
            servers_s = time.perf_counter() - t0
            log(f"servers up in {servers_s:.1f}s: S3 {s3.url} (bucket {s3.bucket}), Redis 127.0.0.1:{redis.port}, "
                f"Ray head (0 CPUs) + {len(cluster.workers)} worker nodes, dashboard {cluster.dashboard_url}")
            r = Rehearsal(cluster, s3.bucket, run, log)

            t = time.perf_counter()
            landing = _produce(events, r.s3("landing"))
            r.record("produce", time.perf_counter() - t, {"landing": r.s3("landing"), "files": landing,
                                                          "events": events})
            logs = r.stage("ingest", "ray_jobs.ingest", "--once", outputs={"events": r.s3("lake", "events")})
            r.stages[-1]["outputs"]["report"] = _first(r"ingest: .*", logs)
            r.stage("features", "ray_jobs.features", outputs={
                "tables": r.s3("lake", "features_*"), "feast_registry": r.s3("feast", "registry.db"),
                "online_store": f"redis 127.0.0.1:{redis.port}"})
            r.stages[-1]["outputs"]["redis_keys"] = _redis_keys(redis)
            r.stage("samples", "ray_jobs.samples", outputs={
                "ranking": r.s3("lake", "samples_ranking"), "retrieval": r.s3("lake", "samples_retrieval")})
            kill = train_with_node_loss(r, f"ranker-{run}")

            retriever = r.s3("artifacts", f"retriever-{run}")
            logs = r.stage("train_retriever", "ray_jobs.train_retriever", "--source", "lake", "--artifact", retriever,
                           "--set", "retrieval.dense.max_epochs=2", "--set", "retrieval.generative.max_epochs=2",
                           "--set", "retrieval.generative.codebooks=[8,8]", "--set", "retrieval.generative.d_model=32",
                           "--set", "retrieval.generative.eval_users=200", "--test-users", "200",
                           outputs={"artifact": retriever})
            node = _first(r'"node_id": "[0-9a-f]+"', logs)
            node_id = node.split('"')[3] if node else None
            if node_id is None or node_id == cluster.head_node_id:
                raise StageFailed(f"the retriever did not train on a worker node (node {node_id})")
            r.stages[-1]["outputs"]["node_id"] = node_id

            ranker = r.s3("artifacts", f"ranker-{run}")
            logs = r.stage("deploy", "ray_jobs.deploy", "--ranker", ranker, "--retriever", retriever)
            serving = _check_proxies(cluster, serve_port, ranker, retriever)
            r.stages[-1]["outputs"].update(serving)

            bad_deploy = deploy_broken_artifact(r, serve_port, ranker, retriever, serving["model_versions"])
    machine["load_at_end"] = _machine()["load_1_5_15"]
    return {"date": started.isoformat(timespec="seconds"), "machine": machine, "events": events,
            "servers_s": round(servers_s, 1), "total_s": round(time.perf_counter() - t0, 1), "stages": r.stages,
            "node_loss": kill, "bad_deploy": bad_deploy}


def deploy_broken_artifact(r: Rehearsal, serve_port: int, ranker: str, retriever: str,
                           serving: dict[str, str]) -> dict[str, Any]:
    """Deploy a copy of the ranker whose weights no longer match its manifest: the job must fail, the old
    models keep serving, and the app config must name the old ranker again."""
    bad = r.s3("artifacts", f"ranker-{r.run}-corrupt")
    _corrupt_copy(ranker, bad)
    r.log(f"\n== bad deploy: ranker {bad} (weights do not match its manifest)")
    t = time.perf_counter()
    logs = r.finish(r.submit("ray_jobs.deploy", "--ranker", bad, "--retriever", retriever), expect="FAILED")
    after = _health(serve_port)
    if after["model_versions"] != serving:
        raise StageFailed(f"a failed deploy changed what is served: {after}")
    details = r.cluster.dashboard_json("/api/serve/applications/")
    app = details["applications"]["streamrec"]["deployed_app_config"]
    configured = {d["name"]: (d.get("user_config") or {}).get("artifact") for d in app["deployments"]}
    if configured.get("Ranker") != ranker:
        raise StageFailed(f"after the failed deploy the app config names {configured.get('Ranker')}")
    result = {"artifact": bad, "job": "FAILED", "seconds": round(time.perf_counter() - t, 1),
              "error": _first(r"deploy failed: .*", logs), "still_serving": after["model_versions"],
              "config_restored_to": configured["Ranker"]}
    r.log(f"   bad deploy failed as it must: {result['error']}; still serving {after['model_versions']}")
    return result


def _produce(events: int, landing: str) -> int:
    """Simulated live-stream logs put into the landing prefix (and the oracle next to it), as a producer would."""
    import config
    from ingestion.simulator import simulate

    cfg = config.load("rehearsal")
    simulate(cfg.simulator.model_copy(update={"events": events}), landing)
    return len(storage.list_files(landing))


def _redis_keys(redis: RedisServer) -> int:
    import redis as redis_client

    return redis_client.Redis(host="127.0.0.1", port=redis.port, password=redis.password).dbsize()


def _check_proxies(cluster: RayCluster, head_port: int, ranker: str, retriever: str) -> dict[str, Any]:
    """/healthz and one /recommend through every Serve proxy: each must report the artifacts' versions.

    `proxy_location: EveryNode` puts a proxy on the head and on every node that holds a replica (Ray's
    ProxyLocation); the proxies Serve lists must be exactly those nodes."""
    from training.artifact import artifact_version

    expected = {"ranker": artifact_version(ranker), "retriever": artifact_version(retriever)}
    details = cluster.dashboard_json("/api/serve/applications/")
    replica_nodes = {r["node_id"] for app in details["applications"].values()
                     for d in app["deployments"].values() for r in d["replicas"] if r.get("node_id")}
    listed = {node for node, proxy in details["proxies"].items() if proxy["status"] == "HEALTHY"}
    if listed != replica_nodes | {cluster.head_node_id}:
        raise StageFailed(f"healthy proxies on {sorted(listed)}, replicas on {sorted(replica_nodes)} + the head")
    proxies = {}
    for node in sorted(listed):
        port = head_port if node == cluster.head_node_id else cluster.proxy_ports[node]
        name = "head" if node == cluster.head_node_id else f"worker-{node[:8]}"
        health = _health(port)
        if health["model_versions"] != expected:
            raise StageFailed(f"the proxy of node {name} (port {port}) serves {health['model_versions']}, "
                              f"expected {expected}")
        # A replica's first request can outlast the stage time limits on a busy machine (its trending list and
        # models are still cold) and get an empty, fallback-named answer: up to 3 tries, all of them recorded.
        tries = 0
        while True:
            tries += 1
            rec = httpx.post(f"http://127.0.0.1:{port}/recommend", json={"user_id": 1, "k": 10}, timeout=30)
            answer = rec.json() if rec.status_code == 200 else {}
            if rec.status_code != 200 or answer.get("items") or tries == 3:
                break
            time.sleep(2)
        proxies[name] = {"port": port, "healthz": health["status"], "recommend": rec.status_code,
                         "items": len(answer.get("items", [])), "fallback": answer.get("fallback"), "tries": tries,
                         "candidates_by_channel": answer.get("candidates_by_channel")}
        if rec.status_code != 200:
            raise StageFailed(f"/recommend through node {name}'s proxy: {rec.status_code} {rec.text[:300]}")
    return {"model_versions": expected, "proxies": proxies, "worker_nodes_with_replicas": len(replica_nodes)}


def _machine() -> dict[str, Any]:
    load = os.getloadavg()
    return {"host": platform.node(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "load_1_5_15": [round(x, 2) for x in load]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=15000, help="simulated live-stream events to put in landing")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON record of the run")
    args = parser.parse_args(argv)
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so every server and Ray node is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        result = rehearse(args.events)
    except StageFailed as err:
        print(f"\nREHEARSAL FAILED: {err}", file=sys.stderr)
        return 1
    storage.write_json(args.out, result)
    print("\n== rehearsal summary")
    for s in result["stages"]:
        print(f"   {s['stage']:<16} {s['seconds']:7.1f}s")
    k = result["node_loss"]
    print(f"   node loss: killed at {k['killed_at_s']}s, {k['restarts']} restart(s), {k['requests_scored_once']:,} of "
          f"{k['samples']:,} requests scored exactly once, {k['score_rows_rolled_back']:,} score rows rolled back")
    print(f"   bad deploy: {result['bad_deploy']['job']}, still serving {result['bad_deploy']['still_serving']}")
    print(f"   total {result['total_s']}s; record {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
