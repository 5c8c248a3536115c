"""Feeding cost of one-pass ranking training: training samples/s and CPU-seconds per sample, old feed vs new.

    flock /tmp/streamrec-bench.lock python -m bench.feed                      # 200k simulated events, dlrm
    flock /tmp/streamrec-bench.lock python -m bench.feed --repeats 2 --model genrank

One simulator lake (simulate -> ingest -> features -> samples, kept under data/bench/feed and rebuilt only
when missing), then `python -m ray_jobs.train` on it, alternately from this tree (the feed of training/stream.py:
each worker reads its own `sample_no` ranges) and from `--baseline`, a commit whose tree is extracted with
`git archive` (default: the last commit with the Ray Data feed, `streaming_split` behind a SplitCoordinator).
Both get the same config, seed and rows.

Each run is a subprocess with its own local Ray; the benchmark polls its whole process tree (driver, GCS,
raylet, Train workers, Ray Data's actors and tasks) with psutil every 0.2 s and keeps each process's latest
user+system CPU time (a process's last < 0.2 s before it exits is missed). The pass is the window from rank 0's
"started" line to its "done" line in progress.log: its samples/s, its CPU-seconds per 1k samples and samples/s
per busy core (samples / CPU-seconds) exclude Ray's start-up and the artifact write. The machine's other CPU use
in the same window (psutil's system-wide busy time minus ours) and the load average are recorded too, since
other work on a shared machine slows the wall clock more than it changes CPU-seconds.
Writes bench/results/feed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil

import config
from bench.record import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]
ROOT = REPO / "data" / "bench" / "feed"
# The last commit whose training/stream.py fed the workers through Ray Data (streaming_split).
RAY_DATA_FEED_COMMIT = "16cc90c"
POLL_S = 0.2


def lake_overrides(events: int) -> list[str]:
    return [f"lake.root={ROOT / 'lake'}", f"ingest.landing_dir={ROOT / 'landing'}", f"simulator.events={events}",
            f"simulator.oracle_dir={ROOT / 'oracle'}", f"features.feast_dir={ROOT / 'feast'}",
            f"features.online_store.path={ROOT / 'feast' / 'online.db'}",
            f"training.storage_path={ROOT / 'runs'}", f"training.artifact_dir={ROOT / 'artifacts'}"]


def prepare(events: int) -> dict:
    """The lake and its samples, unless a previous run with the same event count left them."""
    marker = ROOT / "prepared.json"
    if marker.exists() and json.loads(marker.read_text()).get("events_simulated") == events:
        return json.loads(marker.read_text())
    shutil.rmtree(ROOT, ignore_errors=True)
    from features.job import FeatureJob
    from features.samples import SampleBuilder
    from ingestion.job import IngestJob
    from ingestion.simulator import simulate
    from ray_jobs.runtime import init_ray

    cfg = config.load(None, lake_overrides(events))
    init_ray(cfg.ray)
    simulate(cfg.simulator, cfg.ingest.landing_dir, fsync=False)
    ingest = IngestJob(cfg).run_once()
    FeatureJob(cfg).run(materialize=False)
    samples = SampleBuilder(cfg).run()
    info = {"events_simulated": events, "events": ingest.totals()["valid"], "requests": samples.requests,
            "candidates": samples.candidates}
    marker.write_text(json.dumps(info))
    return info


def extract(commit: str, into: Path) -> Path:
    """The tracked files of `commit`, as a plain folder (no worktree: nothing is added to .git)."""
    archive = subprocess.run(["git", "archive", "--format=tar", commit], cwd=REPO, check=True,
                             capture_output=True).stdout
    with tempfile.TemporaryFile() as f:
        f.write(archive)
        f.seek(0)
        with tarfile.open(fileobj=f) as tar:
            tar.extractall(into, filter="data")
    return into


class TreeCpu:
    """Latest user+system CPU seconds of every process seen under a root process, by (pid, start time), and
    what each process was (the first specific title Ray gave it)."""

    def __init__(self, pid: int):
        self.root = psutil.Process(pid)
        self.seen: dict[tuple[int, float], float] = {}
        self.kind: dict[tuple[int, float], str] = {}

    def poll(self) -> None:
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        for p in procs:
            try:
                with p.oneshot():
                    key, t = (p.pid, p.create_time()), p.cpu_times()
                    self.seen[key] = t.user + t.system
                    if key not in self.kind and (kind := _kind(p, p is self.root)):
                        self.kind[key] = kind
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue

    def snapshot(self) -> dict[tuple[int, float], float]:
        return dict(self.seen)

    def kind_of(self, key: tuple[int, float]) -> str:
        return self.kind.get(key, "other ray workers")


RAY_DATA = ("SplitCoordinator", "MapBatches", "ReadRange", "StatsActor", "AutoscalingRequester")


def _kind(p: psutil.Process, root: bool) -> str | None:
    """driver / train workers / ray data / ray system / other ray workers; None while a worker has no task yet."""
    if root:
        return "driver"
    args = p.cmdline()
    title = args[0] if args else p.name()
    if title.startswith("ray::"):
        if "RayTrainWorker" in title:
            return "train workers"
        if any(s in title for s in RAY_DATA):
            return "ray data"
        return None if "IDLE" in title else "other ray workers"  # e.g. Ray Train's controller
    return None if "default_worker.py" in " ".join(args[:3]) else "ray system"  # GCS, raylet, monitors


def _busy() -> float:
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def run_once(label: str, tree: Path, overrides: list[str], requests: int, timeout_s: float) -> dict:
    name = f"feed-{label}-{datetime.now(UTC):%H%M%S}"
    progress = ROOT / "runs" / name / "progress.log"
    cmd = [sys.executable, "-m", "ray_jobs.train", "--artifact", str(ROOT / "artifacts" / name)]
    for override in [*overrides, f"training.run_name={name}"]:
        cmd += ["--set", override]
    env = {**os.environ, "PYTHONPATH": str(tree), "PYTHONUNBUFFERED": "1"}
    load_before, t0 = os.getloadavg(), time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    cpu, marks = TreeCpu(proc.pid), {}
    output: list[str] = []
    reader = _drain(proc, output)
    while proc.poll() is None and time.perf_counter() - t0 < timeout_s:
        cpu.poll()
        text = progress.read_text() if progress.exists() else ""
        for mark, needle in (("start", "worker 0: started"), ("end", "\ndone ")):
            if mark not in marks and needle in text:
                marks[mark] = (time.perf_counter(), cpu.snapshot(), _busy())
        time.sleep(POLL_S)
    if proc.poll() is None:
        proc.kill()
    reader.join(timeout=10)
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or set(marks) != {"start", "end"}:
        raise RuntimeError(f"{label} run failed (rc {proc.returncode}, marks {sorted(marks)}):\n"
                           + "".join(output)[-3000:])
    (t_a, cpu_a, busy_a), (t_b, cpu_b, busy_b) = marks["start"], marks["end"]
    by_kind: dict[str, float] = {}
    for key, seconds in cpu_b.items():
        kind = cpu.kind_of(key)
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds - cpu_a.get(key, 0.0)
    pass_s, pass_cpu = t_b - t_a, sum(by_kind.values())
    metrics = json.loads((ROOT / "artifacts" / name / "metrics.json").read_text())
    t = config.load(None, overrides).training
    return {"feed": label, "run": name, "requests": metrics["requests"], "steps": metrics["steps"],
            "click_auc": round(metrics["progressive"]["click"]["auc"], 4),
            "wall_s": round(wall, 1), "run_cpu_s": round(sum(cpu.seen.values()), 1),
            "pass_s": round(pass_s, 1), "pass_cpu_s": round(pass_cpu, 1),
            "samples_per_s": round(requests / pass_s, 1),
            "cpu_s_per_1k_samples": round(1000 * pass_cpu / requests, 2),
            "samples_per_s_per_core": round(requests / pass_cpu, 1),
            "busy_cores": round(pass_cpu / pass_s, 2),
            "pass_cpu_s_by_process": {k: round(v, 1) for k, v in sorted(by_kind.items())},
            "time_skew": time_skew(ROOT / "runs" / name / "predictions", t.num_workers, t.batch_size),
            "machine_other_cpu_s": round(max(0.0, (busy_b - busy_a) - pass_cpu), 1),
            "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()]}


def time_skew(predictions: Path, workers: int, batch_size: int) -> dict:
    """How far each run broke time order across workers: for every request scored at step j, how many requests
    past it (in sample_no) the shared model had already trained on in steps < j. A worker's step j is the j-th
    `batch_size` requests of its scores (a run without restarts). Returns the largest skew and the share of
    requests scored with any."""
    import numpy as np
    import pyarrow.parquet as pq

    steps = []
    for rank in range(workers):
        files = sorted(predictions.glob(f"step-*-rank-{rank}.parquet"))
        nos = np.concatenate([pq.read_table(f, columns=["sample_no"])["sample_no"].to_numpy() for f in files])
        nos = nos[np.r_[True, nos[1:] != nos[:-1]]]  # one entry per request (its candidates are adjacent)
        steps.append([nos[i:i + batch_size] for i in range(0, len(nos), batch_size)])
    trained_max, worst, ahead, total = -1, 0, 0, 0
    for j in range(max(len(s) for s in steps)):
        scored = [s[j] for s in steps if j < len(s)]
        for rows in scored:
            skew = trained_max - rows
            worst, ahead, total = max(worst, int(skew.max())), ahead + int((skew > 0).sum()), total + len(rows)
        trained_max = max(trained_max, *(int(rows.max()) for rows in scored))
    return {"max_requests_ahead": worst, "share_scored_after_later_rows": round(ahead / total, 4)}


def _drain(proc: subprocess.Popen, into: list[str]):
    import threading

    thread = threading.Thread(target=lambda: into.extend(iter(proc.stdout.readline, "")), daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000, help="simulated events of the lake")
    parser.add_argument("--model", default="dlrm", help="a ranker of training.ranking_models")
    parser.add_argument("--repeats", type=int, default=1, help="runs of each feed, alternating")
    parser.add_argument("--baseline", default=RAY_DATA_FEED_COMMIT, help="commit whose feed is the baseline")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per training run")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    date, uptime_before = datetime.now(UTC).isoformat(timespec="seconds"), _uptime()
    lake = prepare(args.events)
    overrides = [*lake_overrides(args.events), f"training.model={args.model}", *args.set]
    baseline = subprocess.run(["git", "rev-parse", args.baseline], cwd=REPO, check=True, capture_output=True,
                              text=True).stdout.strip()
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, check=True, capture_output=True,
                          text=True).stdout.strip()
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        old_tree = extract(baseline, Path(tmp))
        for i in range(args.repeats):
            for label, tree in (("ray-data", old_tree), ("ranges", REPO)):
                print(f"run {i + 1}/{args.repeats}: {label} feed ...", flush=True)
                runs.append(run_once(label, tree, overrides, lake["requests"], args.timeout))
                print("  " + json.dumps(runs[-1]), flush=True)
    summary = {}
    for label in ("ray-data", "ranges"):
        mine = [r for r in runs if r["feed"] == label]
        summary[label] = {k: round(sum(r[k] for r in mine) / len(mine), 2)
                          for k in ("samples_per_s", "samples_per_s_per_core", "cpu_s_per_1k_samples", "busy_cores")}
    summary["per_core_ratio"] = round(summary["ranges"]["samples_per_s_per_core"]
                                      / summary["ray-data"]["samples_per_s_per_core"], 2)
    record = {"command": "python -m bench.feed " + " ".join(argv if argv is not None else sys.argv[1:]),
              "date": date, "machine": machine(), "uptime_before": uptime_before, "uptime_after": _uptime(),
              "commit": head, "baseline_commit": baseline, "lake": lake, "model": args.model,
              "overrides": args.set, "summary": summary, "runs": runs}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "feed.json").write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return 0


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
