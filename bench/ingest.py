"""Ingestion benchmark: the whole job vs a plain `write_deltalake`, and kill/re-run trials.

    python -m bench.ingest                 # 1M simulator events, 20 kill/re-run trials
    python -m bench.ingest --events 100000 --trials 3   # a quick look

Prints a table and writes bench/results/ingest.json. The baseline is measured in the same run:
the same events, already parsed into the `events` Arrow table, written with one plain
`write_deltalake` call (no reading, parsing, checking, de-duplication or quarantine).
Ray start-up is excluded from the job's time and reported on its own line.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable, write_deltalake

import config
from config.schema import SimulatorConfig
from ingestion.audit import audit_lake
from ingestion.contract import EVENTS_PARTITION_BY

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}, Python {platform.python_version()}"


def run_ingest(overrides: list[str], kill_after: float | None = None) -> int | None:
    """Run `python -m ray_jobs.ingest --once` in its own process group; SIGKILL it after `kill_after` s.

    Returns the exit code, or None when it was killed. The new session makes the kill take Ray's
    own processes down with the driver, like a lost pod.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, "-m", "ray_jobs.ingest", "--once", *[p for o in overrides for p in ("--set", o)]]
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        try:
            code = proc.wait(timeout=kill_after if kill_after is not None else 900)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return None
        if code:  # say why (a test shows this on failure)
            log.seek(0)
            print(f"ray_jobs.ingest exited {code}:\n{log.read()[-4000:]}", file=sys.stderr)
        return code


def throughput(events: int, work: Path) -> dict:
    from ingestion.job import IngestJob
    from ingestion.parse import PARSED_SCHEMA  # noqa: F401  (import cost outside the timing)
    from ray_jobs.runtime import init_ray

    landing, lake = work / "landing", work / "lake"
    t0 = time.perf_counter()
    from ingestion.simulator import simulate

    sim = simulate(SimulatorConfig(events=events, oracle_dir=str(work / "oracle")), landing)
    sim_s = time.perf_counter() - t0
    cfg = config.load(None, [f"lake.root={lake}", f"ingest.landing_dir={landing}"])
    t0 = time.perf_counter()
    init_ray(cfg.ray)
    ray_s = time.perf_counter() - t0
    job = IngestJob(cfg)
    t0 = time.perf_counter()
    report = job.run_once()
    job_s = time.perf_counter() - t0
    valid = report.totals()["valid"]

    # Baseline: the same valid rows as an Arrow table in memory, one plain write.
    table = DeltaTable(cfg.lake.events).to_pyarrow_table()
    raw_path = work / "raw_write"
    t0 = time.perf_counter()
    write_deltalake(str(raw_path), table, partition_by=EVENTS_PARTITION_BY)
    raw_s = time.perf_counter() - t0
    return {
        "events": valid, "lines": report.totals()["lines"], "quarantined": report.totals()["quarantined"],
        "simulator_s": round(sim_s, 2), "simulator_events_per_s": round(sim.get("events", events) / sim_s),
        "ray_start_s": round(ray_s, 2), "job_s": round(job_s, 3), "raw_write_s": round(raw_s, 3),
        "events_per_s": round(valid / job_s), "raw_events_per_s": round(valid / raw_s),
        "ratio_vs_raw": round(raw_s / job_s, 3), "arrow_bytes": table.nbytes,
        "batch_phases_s": [b.phases for b in report.batches],
    }


def crash_trials(trials: int, work: Path, seed: int = 5) -> dict:
    """Each trial: a fresh lake, one SIGKILL at a random moment, a re-run to completion, an audit."""
    landing = work / "crash_landing"
    from ingestion.simulator import simulate

    simulate(SimulatorConfig(events=30_000, events_per_file=1_000, malformed_rate=0.02,
                             oracle_dir=str(work / "crash_oracle")), landing)
    rng = random.Random(seed)
    lost = duplicated = killed = 0
    rows = []
    for trial in range(trials):
        lake = work / f"crash_lake_{trial}"
        overrides = [f"lake.root={lake}", f"ingest.landing_dir={landing}", "ingest.max_batch_bytes=300000",
                     "ingest.build_data_docs=false"]
        at = rng.uniform(3.0, 30.0)
        was_killed = run_ingest(overrides, kill_after=at) is None
        code = run_ingest(overrides)
        audit = audit_lake(config.load(None, overrides))
        killed += was_killed
        lost += audit.lost
        duplicated += audit.duplicated
        rows.append({"trial": trial, "kill_at_s": round(at, 1), "killed": was_killed, "rerun_exit": code,
                     "lines": audit.lines, "lost": audit.lost, "duplicated": audit.duplicated})
        print(f"  trial {trial}: kill at {at:.1f}s killed={was_killed} rerun exit={code} "
              f"lines={audit.lines} lost={audit.lost} duplicated={audit.duplicated}", flush=True)
        shutil.rmtree(lake, ignore_errors=True)
    return {"crash_trials": trials, "killed_mid_run": killed, "lost": lost, "duplicated": duplicated,
            "trials": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    try:
        result = throughput(args.events, work)
        print(f"events={result['events']:,} job={result['job_s']}s ({result['events_per_s']:,}/s) "
              f"raw write_deltalake={result['raw_write_s']}s ({result['raw_events_per_s']:,}/s) "
              f"ratio={result['ratio_vs_raw']} (ray start {result['ray_start_s']}s, excluded)", flush=True)
        result.update(crash_trials(args.trials, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"command": "python -m bench.ingest " + " ".join(argv or sys.argv[1:]),
                   "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                   "pyarrow": pa.__version__})
    print(f"| events/s (job) | events/s (raw write) | ratio | crash trials | lost | duplicated |\n"
          f"|---|---|---|---|---|---|\n| {result['events_per_s']:,} | {result['raw_events_per_s']:,} | "
          f"{result['ratio_vs_raw']} | {result['crash_trials']} | {result['lost']} | {result['duplicated']} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["lost"] == 0 and result["duplicated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
