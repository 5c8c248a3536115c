"""`ray job submit` of the whole pipeline to a Ray head started here (`ray start --head` on 127.0.0.1).

What a user does against a cluster, on one machine: start a head, submit `python -m ray_jobs.pipeline`
with the working directory uploaded, wait, and find the tables and the model artifact it wrote. The
head runs in its own temp dir and is stopped by killing its processes (never `ray stop`, which would
end every Ray on the machine; STACK.md).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
from deltalake import DeltaTable

from tests.conftest import REPO

RAY = str(Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin" / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_head():
    temp = tempfile.mkdtemp(prefix="rh-", dir="/tmp")  # short: Ray's socket paths have a length limit
    gcs, dashboard = free_port(), free_port()
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    subprocess.run([RAY if Path(RAY).exists() else "ray", "start", "--head", "--node-ip-address=127.0.0.1",
                    f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    "--include-dashboard=true", f"--ray-client-server-port={free_port()}", f"--temp-dir={temp}",
                    # Every fixed default port on its own free one: another Ray on the machine (the test
                    # session's) already holds the defaults, and a head whose job agent cannot bind never
                    # accepts a submission ("No available agent").
                    f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                    f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
                    f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}",
                    "--num-cpus=2", "--object-store-memory=300000000", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        mine = [p for p in psutil.process_iter(["cmdline"])
                if any(temp in a or f"127.0.0.1:{gcs}" in a for a in (p.info["cmdline"] or []))]
        for p in mine:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(mine, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_submitted_pipeline_writes_tables_and_an_artifact(ray_head, tmp_path):
    address, env = ray_head
    out = tmp_path / "out"
    overrides = [f"lake.root={out / 'lake'}", f"ingest.landing_dir={out / 'landing'}",
                 f"simulator.oracle_dir={out / 'oracle'}", "simulator.users=300", "simulator.streamers=40",
                 f"features.feast_dir={out / 'feast'}", f"features.online_store.path={out / 'feast' / 'online.db'}",
                 "features.partitions=2", "ray.address=auto", "training.model=dlrm", "training.batch_size=64",
                 "training.max_hist_len=16", f"training.storage_path={out / 'runs'}",
                 f"training.artifact_dir={out / 'artifacts'}", "training.run_name=submitted"]
    runtime_env = {"working_dir": str(REPO), "excludes": [".venv", "data", ".git", "bench/results", "*.png"]}
    cmd = [RAY if Path(RAY).exists() else "ray", "job", "submit", f"--address={address}",
           f"--runtime-env-json={json.dumps(runtime_env)}", "--", sys.executable, "-m", "ray_jobs.pipeline",
           "--simulate", "15000", "--stages", "ingest,features,samples,train",
           *[a for o in overrides for a in ("--set", o)]]
    t = time.perf_counter()
    for _ in range(24):  # right after `ray start` the dashboard's job agent may not be up yet
        done = subprocess.run(cmd, env={**env, "RAY_AUTH_MODE": "token"}, capture_output=True, text=True,
                              timeout=900)
        log = done.stdout + done.stderr
        if "No available agent to submit job" not in log:
            break
        time.sleep(5)
    assert done.returncode == 0, log[-4000:]
    assert "succeeded" in log.lower(), log[-4000:]
    assert "pipeline summary" in log and "FAILED" not in log.split("pipeline summary")[1], log[-3000:]
    assert DeltaTable(str(out / "lake" / "events")).to_pyarrow_table(columns=["event_id"]).num_rows == 15000
    samples = DeltaTable(str(out / "lake" / "samples_ranking")).to_pyarrow_table(columns=["sample_no"])
    assert samples.num_rows > 100
    manifest = json.loads((out / "artifacts" / "submitted" / "manifest.json").read_text())
    metrics = json.loads((out / "artifacts" / "submitted" / "metrics.json").read_text())
    assert manifest["model_class"] == "DLRM" and metrics["requests"] == samples.num_rows
    print(f"submitted pipeline finished in {time.perf_counter() - t:.0f}s")
