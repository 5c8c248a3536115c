"""The cluster path on one machine (ray_jobs/rehearsal.py): every stage through `ray job submit` to a Ray head
with no CPUs and two worker nodes, the lake, checkpoints, artifacts and Feast registry on a real S3 server,
the online store in a real Redis; a worker node killed during training; serving from s3:// artifacts.

It runs as a subprocess (the way `make rehearse` does) and is judged by the record it writes. It needs
redis-server (`make test` installs it) and never skips: the cluster path is what users deploy.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import REPO


def test_every_stage_runs_on_the_cluster_path(tmp_path, ray_local):
    # `ray_local`: another Ray runs on the host, as it does in the full suite. A job's driver resolves
    # address "auto" and must join the rehearsal cluster, not any GCS it finds (which it once did: the
    # stages then ran on the wrong cluster, without the S3 settings, and failed about half the time).
    out = tmp_path / "rehearsal.json"
    done = subprocess.run([sys.executable, "-m", "ray_jobs.rehearsal", "--events", "15000", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=1200)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-6000:]
    record = json.loads(out.read_text())
    stages = {s["stage"]: s for s in record["stages"]}
    assert list(stages) == ["produce", "ingest", "features", "samples", "train", "train_retriever", "deploy"]
    assert "15000 valid" in stages["ingest"]["outputs"]["report"]
    assert stages["features"]["outputs"]["redis_keys"] > 0

    # Ray Train lost a worker node after its first checkpoint on S3, resumed from it, and still trained on
    # and scored every request exactly once (rows scored after the checkpoint were set aside, not double-counted).
    loss = record["node_loss"]
    assert loss["restarts"] >= 1 and loss["resumed_line"]
    assert loss["killed_at_s"] >= loss["first_checkpoint_s"]
    assert loss["requests_scored_once"] == loss["requests_trained"] == loss["samples"] > 0
    assert all(c.startswith("checkpoint") for c in loss["checkpoints_on_s3"])
    assert stages["train"]["outputs"]["artifact"].startswith("s3://")

    # The retriever trained in a task on a worker node, not in the driver on the head.
    assert stages["train_retriever"]["outputs"]["node_id"] != loss["killed_node"]

    # Serving loaded both artifacts from S3; every node's proxy answered with their versions.
    deploy = stages["deploy"]["outputs"]
    versions = deploy["model_versions"]
    assert versions["ranker"] == stages["train"]["outputs"]["version"]
    # A proxy on the head and on every worker node holding a replica (Serve's EveryNode), each answering.
    assert "head" in deploy["proxies"] and len(deploy["proxies"]) == 1 + deploy["worker_nodes_with_replicas"] >= 2
    assert all(p["recommend"] == 200 and p["items"] > 0 for p in deploy["proxies"].values())

    # A deploy whose artifact cannot be loaded failed the job and left the old versions serving.
    bad = record["bad_deploy"]
    assert bad["job"] == "FAILED" and bad["still_serving"] == versions
    # ... and put the app config back, so a replica started later loads the old ranker, not the broken one.
    assert bad["config_restored_to"] == stages["train"]["outputs"]["artifact"]
    assert "sha256" in (bad["error"] or ""), bad
