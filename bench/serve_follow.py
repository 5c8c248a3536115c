"""Freshness of the batch path: a landing file -> `ray_jobs.ingest --follow --push-features` -> the online store.

    python -m bench.serve_follow [--root data/demo] [--files 20] [--record]

The ingest job runs as its own process (its own local Ray, as in production) against a copy of the lake and of
the Feast folder, with the shipped settings (ingest.poll_interval_s included). Per file: one click of a user on an
item not in their history, written as producers write (ingestion.landing.LandingWriter: hidden temp file,
fsync, link to the final name); timed from the start of that write until an online read of the user shows the
item in their history and their click counter has counted it. A random pause before each file samples every
phase of the job's poll loop (right after a batch the job always sleeps a whole interval). Prints the figures;
bench.serve runs it after the Serve variants and records them in serve.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import config
from bench.serve_load import new_click
from features.online import OnlineFeatureClient
from features.repo import absolute_paths
from ingestion.landing import LandingWriter


def follow_freshness(root: Path, work: Path, n_items: int, users: list[int], files: int,
                     ready_timeout_s: float = 600.0, timeout_s: float = 30.0) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    # Without the Great Expectations project: the gate writes a fresh one (one made by an older version of the
    # suite does not load), and Data Docs are no part of what is timed here.
    shutil.copytree(root / "lake", work / "lake", ignore=shutil.ignore_patterns("_gx"))
    shutil.copytree(root / "feast", work / "feast", ignore=shutil.ignore_patterns("repo"))
    overrides = [f"lake.root={work / 'lake'}", f"features.feast_dir={work / 'feast'}",
                 f"features.online_store.path={work / 'feast' / 'online.db'}", f"ingest.landing_dir={work / 'landing'}"]
    cfg = absolute_paths(config.load(None, overrides))
    log = open(work / "ingest.log", "wb")  # noqa: SIM115 - the job writes it until it is stopped
    job = subprocess.Popen([sys.executable, "-m", "ray_jobs.ingest", "--follow", "--push-features",
                            *(a for o in overrides for a in ("--set", o))],
                           stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    client = OnlineFeatureClient(cfg)
    counter = client.stat_names.index(f"click_count_{client.spec.window_labels[-1]}")
    rng = random.Random(2)
    times, lost = [], 0
    try:
        # The first file also waits for the job's start (Ray, Great Expectations, the updater's replay).
        started = time.perf_counter()
        if _land_and_wait(job, client, counter, rng, users, n_items, work, ready_timeout_s) is None:
            tail = (work / "ingest.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"no file visible after {ready_timeout_s:.0f}s; the job's output ends:\n{tail}")
        startup_s = time.perf_counter() - started
        for _ in range(files):
            time.sleep(rng.uniform(0, cfg.ingest.poll_interval_s))
            ms = _land_and_wait(job, client, counter, rng, users, n_items, work, timeout_s)
            if ms is None:
                lost += 1
            else:
                times.append(ms)
    finally:
        _stop(job)
        log.close()
    return {"files": files, "not_visible": lost, "poll_interval_s": cfg.ingest.poll_interval_s,
            "first_file_s": round(startup_s, 1),
            **{f"p{q}_ms": round(float(np.percentile(times, q)), 1) if times else None for q in (50, 90, 99)},
            "max_ms": round(max(times), 1) if times else None}


def _land_and_wait(job, client, counter, rng, users, n_items, work, timeout_s) -> float | None:
    """Lands one click and waits until it is online: milliseconds, or None after `timeout_s`."""
    event, before = new_click(client, rng, users, n_items, f"follow-{time.time_ns()}")
    user, item = event["user_id"], event["item_id"]
    t = time.perf_counter()
    with LandingWriter(work / "landing", prefix="bench-follow") as writer:
        writer.write_event(event)
    while time.perf_counter() - t < timeout_s:
        if job.poll() is not None:
            tail = (work / "ingest.log").read_text(errors="replace")[-3000:]
            raise RuntimeError(f"the ingest job exited with {job.returncode}; its output ends:\n{tail}")
        now = client.get(user, [])
        if item in now.sequence["item_ids"].tolist() and now.user_stats[counter] > before.user_stats[counter]:
            return (time.perf_counter() - t) * 1000
        time.sleep(0.005)
    return None


def _stop(job: subprocess.Popen) -> None:
    """SIGINT ends --follow cleanly (its Ray with it); the whole session only if it hangs."""
    if job.poll() is None:
        job.send_signal(signal.SIGINT)
        try:
            job.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="folder with lake/ and feast/ (make demo writes it)")
    parser.add_argument("--files", type=int, default=20)
    parser.add_argument("--job-log", help="also keep the ingest job's log here (its per-batch phase times)")
    parser.add_argument("--record", action="store_true", help=(
        "replace the follow figures of bench/results/serve.json with this run's (marked with its own date, command "
        "and load; the serving figures there stay those of their own run)"))
    args = parser.parse_args(argv)
    from bench.serve import lake_facts

    load_before = os.getloadavg()
    root = Path(args.root).resolve()
    facts = lake_facts(absolute_paths(config.load(None, [f"lake.root={root / 'lake'}"])))
    work = Path(tempfile.mkdtemp(prefix="bench-serve-follow-"))
    try:
        got = follow_freshness(root, work, facts["items"], facts["users"], args.files)
    finally:
        if args.job_log and (work / "ingest.log").exists():
            shutil.copy(work / "ingest.log", args.job_log)
        shutil.rmtree(work, ignore_errors=True)
    got.update(command="python -m bench.serve_follow " + " ".join(argv if argv is not None else sys.argv[1:]),
               date=datetime.now(UTC).isoformat(timespec="seconds"), load_avg_before=load_before,
               load_avg_after=os.getloadavg())
    print(json.dumps(got, indent=1))
    if args.record:
        path = Path("bench/results/serve.json")
        record = json.loads(path.read_text())
        record["follow"] = {**got, "separate_run": True}
        record.update(freshness_follow_p50_ms=got["p50_ms"], freshness_follow_p99_ms=got["p99_ms"],
                      freshness_follow_not_visible=got["not_visible"])
        record.setdefault("goals", {})["freshness_follow_p99_ms<=2000"] = (not got["not_visible"]
                                                                            and got["p99_ms"] <= 2000)
        path.write_text(json.dumps(record, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
