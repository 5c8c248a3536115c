"""Kill a stage's process at a random moment, run it again, check that nothing is lost or counted twice.

    python -m bench.crash --stage features --trials 20     # also: --stage samples, --stage ingest
    python -m bench.crash --stage samples --events 20000 --trials 3   # a quick look

A trial: a fresh copy of the lake as the stage finds it, one run of the stage SIGKILLed at a time drawn
uniformly over the duration of the work of an uninterrupted run measured first (from its `phase started` line to
its last `phase` line, the shorter of two runs; the kill is timed from the same line), a re-run to
completion, then the check. What follows the last phase is the interpreter's exit (~1 s of tearing down GX's
3,000 modules for ingest), where a kill tests nothing: drawn over it, most kills landed there.
Each stage announces its steps as `phase NAME` log lines; the last one printed
before the kill is the phase the kill landed in. The checks:
- ingest: `ingestion.audit` (every landing line in exactly one table, once), and its line count equals the
  landing files' own count of lines;
- features / samples: every table the stage writes holds exactly the rows an uninterrupted run wrote (compared
  as sorted rows), so nothing is missing and nothing is counted twice.
Writes bench/results/crash_<stage>.json and prints a table per phase.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
from deltalake import DeltaTable
from deltalake.exceptions import TableNotFoundError

import config
from bench.record import RESULTS, machine

REPO = Path(__file__).resolve().parents[1]
PHASE = re.compile(rb"\bphase (\w+)")
STAGES = {"ingest": ("ray_jobs.ingest", ["--once"]), "features": ("ray_jobs.features", ["--no-materialize"]),
          "samples": ("ray_jobs.samples", [])}


@dataclass
class StageRun:
    code: int | None  # None: killed
    phase: str  # the last phase the process announced ("before_start" when none)
    started_s: float | None  # when it announced `phase started` (its runtime is up, the work begins), from spawn
    seconds: float  # from spawn to exit or kill
    last_phase_s: float | None = None  # when it announced its last phase (the end of its work), from spawn


def run_stage(module: str, args: list[str], overrides: list[str], kill_after_start: float | None = None,
              kill_after: float | None = None, timeout: float = 900) -> StageRun:
    """Run `python -m module args --set ...` in its own process group and SIGKILL the group `kill_after` s after
    spawn, or `kill_after_start` s after it announced `phase started` (its Ray, where it uses one, is up).

    The new session makes the kill take Ray's own processes down with the driver, like a lost pod.
    """
    env = {**os.environ, "PYTHONPATH": str(REPO), "GX_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", module, *args, *[p for o in overrides for p in ("--set", o)]]
    with tempfile.NamedTemporaryFile() as log:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        deadline = started + (kill_after if kill_after is not None else timeout)
        begun = last_phase = None
        announced = 0
        while (code := proc.poll()) is None and time.monotonic() < deadline:
            time.sleep(0.02)
            text = Path(log.name).read_bytes()
            if (seen := len(PHASE.findall(text))) > announced:
                announced, last_phase = seen, time.monotonic() - started
            if begun is None and b"phase started" in text:
                begun = time.monotonic() - started
                if kill_after_start is not None:
                    deadline = started + begun + kill_after_start
        if code is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        seconds = time.monotonic() - started
        text = Path(log.name).read_bytes()
    phases = PHASE.findall(text)
    if code:  # say why (a test shows this on failure)
        print(f"{module} exited {code}:\n{text[-4000:].decode(errors='replace')}", file=sys.stderr)
    if len(phases) > announced:  # announced after the last look: the process ended right after
        last_phase = seconds
    return StageRun(code, phases[-1].decode() if phases else "before_start", begun, seconds, last_phase)


def run_ingest(overrides: list[str], kill_after: float | None = None) -> int | None:
    """`python -m ray_jobs.ingest --once`, killed after `kill_after` s; the exit code, None when killed."""
    return run_stage("ray_jobs.ingest", ["--once"], overrides, kill_after=kill_after).code


def landing_lines(landing: Path) -> int:
    """Lines in the (uncompressed) landing files, counted independently of the job's reader."""
    total = 0
    for path in landing.iterdir():
        if path.is_file() and not path.name.startswith("."):
            data = path.read_bytes()
            total += data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)
    return total


def table_rows(path: str) -> list[tuple]:
    """A Delta table's rows as sorted tuples (floats rounded: an equal result may sum in another order)."""
    try:
        table = DeltaTable(path).to_pyarrow_table()
    except TableNotFoundError:
        return []
    cols = [[_hashable(v) for v in col.to_pylist()] for col in table.columns]
    return sorted(zip(*cols), key=repr)


def _hashable(value):
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, list | tuple):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value


def stage_tables(cfg, stage: str) -> dict[str, str]:
    """The Delta tables a stage writes (the check compares them with an uninterrupted run's)."""
    if stage == "features":
        from features.offline import FEATURE_TABLES

        return {kind: cfg.lake.table(name) for kind, name in FEATURE_TABLES.items()}
    names = ("samples_ranking", "samples_retrieval")  # which one depends on the events (samples.kind: auto)
    return {name: cfg.lake.table(name) for name in names if Path(cfg.lake.table(name)).exists()}


def build_base(work: Path, events: int, stage: str) -> list[str]:
    """A lake ready for `stage`: simulated events ingested (and, for samples, features computed)."""
    overrides = [f"lake.root={work / 'base'}", f"ingest.landing_dir={work / 'landing'}",
                 f"simulator.oracle_dir={work / 'oracle'}", f"simulator.events={events}",
                 "simulator.events_per_file=1000", "simulator.malformed_rate=0.02", "ingest.max_batch_bytes=300000",
                 "ingest.build_data_docs=false", f"features.feast_dir={work / 'feast'}"]
    from ingestion.simulator import simulate

    simulate(config.load(None, overrides).simulator, work / "landing")
    if stage != "ingest":
        assert run_ingest(overrides) == 0
    if stage == "samples":
        assert run_stage("ray_jobs.features", ["--no-materialize"], overrides).code == 0
    return overrides


def trials(stage: str, events: int, n: int, work: Path, seed: int = 5) -> dict:
    module, args = STAGES[stage]
    base = build_base(work, events, stage)
    base_root = Path(config.load(None, base).lake.root)

    def fresh(name: str) -> list[str]:
        root = work / name
        shutil.rmtree(root, ignore_errors=True)
        if stage != "ingest":
            shutil.copytree(base_root, root)
        return [*base, f"lake.root={root}"]

    # The work's duration (from `phase started` to the last phase), the shorter of two uninterrupted runs: a kill
    # drawn within it lands in the work even when runs vary. Neither Ray's start-up nor the interpreter's exit is
    # drawn over: a kill there tests nothing.
    works = []
    for name in ("reference", "reference2"):
        run = run_stage(module, args, fresh(name))
        assert run.code == 0 and run.started_s is not None, f"{module} failed or never announced `phase started`"
        works.append(run.last_phase_s - run.started_s)
    duration = min(works)
    reference = [*base, f"lake.root={work / 'reference'}"]  # the first run's lake
    ref_cfg = config.load(None, reference)
    expected = {} if stage == "ingest" else {k: table_rows(p) for k, p in stage_tables(ref_cfg, stage).items()}
    total_lines = landing_lines(work / "landing")
    rng = random.Random(seed)
    rows = []
    for trial in range(n):
        overrides = fresh(f"trial{trial}")
        at = rng.uniform(0, duration)
        killed = run_stage(module, args, overrides, kill_after_start=at)
        rerun_code = run_stage(module, args, overrides).code
        cfg = config.load(None, overrides)
        row = {"trial": trial, "kill_after_start_s": round(at, 2), "killed": killed.code is None,
               "phase": killed.phase if killed.code is None else "finished", "rerun_exit": rerun_code}
        if stage == "ingest":
            from ingestion.audit import audit_lake

            audit = audit_lake(cfg)
            row.update(lines=audit.lines, lost=audit.lost, duplicated=audit.duplicated,
                       ok=audit.ok and audit.lines == total_lines)
        else:
            got = {k: table_rows(cfg.lake.table(Path(p).name)) for k, p in stage_tables(ref_cfg, stage).items()}
            row.update({f"{k}_rows": len(v) for k, v in got.items()})
            row["missing"] = sum(sum((Counter(expected[k]) - Counter(got[k])).values()) for k in expected)
            row["extra"] = sum(sum((Counter(got[k]) - Counter(expected[k])).values()) for k in expected)
            row["ok"] = row["missing"] == row["extra"] == 0
        print(f"  {stage} trial {trial}: kill {at:.1f}s into {duration:.1f}s of work, phase {row['phase']}, "
              f"rerun exit {rerun_code}, ok={row['ok']}", flush=True)
        rows.append(row)
        shutil.rmtree(work / f"trial{trial}", ignore_errors=True)
    return {"stage": stage, "events": events, "trials": n, "uninterrupted_work_s": round(duration, 2),
            "landing_lines": total_lines, "killed_mid_run": sum(r["killed"] for r in rows),
            "phases": dict(Counter(r["phase"] for r in rows)), "failed": sum(not r["ok"] for r in rows),
            "rows": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", choices=sorted(STAGES), required=True)
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix=f"bench-crash-{args.stage}-"))
    try:
        result = trials(args.stage, args.events, args.trials, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"command": "python -m bench.crash " + " ".join(sys.argv[1:] if argv is None else argv),
                   "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                   "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "pyarrow": pa.__version__})
    print(f"\n{args.stage}: {result['trials']} trials over {result['uninterrupted_work_s']}s of work, "
          f"{result['killed_mid_run']} killed mid-run, {result['failed']} failed checks")
    print("| phase at kill | trials |\n|---|---|")
    for phase, count in sorted(result["phases"].items()):
        print(f"| {phase} | {count} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"crash_{args.stage}.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
