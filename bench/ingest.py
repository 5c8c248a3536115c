"""Ingestion benchmark: the whole job against what parsing and writing alone cost, and kill/re-run trials.

    python -m bench.ingest                 # 1M simulator events, 3 repetitions, 20 kill/re-run trials
    python -m bench.ingest --events 100000 --repeats 1 --trials 3   # a quick look

Prints a table and writes bench/results/ingest.json. Measured in the same run, on the same landing files:
- baseline `parse_write`: Arrow's JSON reader over the landing files (the faster of one multi-threaded read per
  file and the files read in a thread pool) + one plain `write_deltalake` of what it parsed: no row rules, no
  quarantine, no de-duplication, no GX gate, no exactly-once commits, no lineage columns;
- the same baseline in fresh processes (`fresh_parse_write`), as `--once` runs: one process per reader, imports
  done, the faster kept. The warm baseline is the stronger; both are reported, and `--once` is set against both;
- baseline `write`: the job's own `events` rows, already in memory, written with one `write_deltalake`;
- the job `--once`: `IngestJob.run_once()` on a fresh lake, in a fresh process whose imports are done (GX's take
  seconds; the baseline's are done too): nothing warm but the modules. Both ways the job can parse: in its own
  threads (`ingest.parse_on=threads`, what a job on one machine does) and in Ray tasks on a freshly started local
  Ray (`ray`, what a job on a cluster does: cold workers; Ray's own start is excluded and reported). GX project
  set-up and Data Docs included. The Data Docs' templates are compiled ahead, as every installation has them
  (`make setup` and the image build compile them, as pip compiles bytecode); the benchmark compiles them into
  their folder first. Beside: threads with no template cache (`ingest.gx_template_cache=null`: the templates
  compiled in the run, as on a machine where they never were);
- the job `--follow`: a running `IngestJob.follow()` (warm threads or workers, open lake and GX project) ingesting
  the same events published into its landing folder at once; timed from the publication until the batch's
  commits are reported (poll interval 0.1 s included); both ways of parsing.
The job's runs and the baseline's take turns (the `--once` variants in an order that rotates at each repetition,
then the baselines, then again), so drift of the machine falls on all of them. Each figure is the median of
`--repeats` runs, with min and max beside it. The kill/re-run trials are `bench.crash`'s, with the phase each kill
landed in.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.json as pj
import ray
from deltalake import DeltaTable, write_deltalake

import config
from bench.record import RESULTS, machine
from config.schema import SimulatorConfig
from ingestion.contract import EVENTS_PARTITION_BY

REPO = Path(__file__).resolve().parents[1]


def spread(samples: list[float]) -> dict:
    return {"median": round(statistics.median(samples), 3), "min": round(min(samples), 3),
            "max": round(max(samples), 3), "runs": [round(s, 3) for s in samples]}


def _read_pooled(files: list[str]) -> list[pa.Table]:
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        return list(pool.map(pj.read_json, files))


# One multi-threaded `read_json` per file, one after another; or the files read by a thread pool of os.cpu_count().
READERS = {"read_json per file": lambda files: [pj.read_json(f) for f in files],
           "read_json, files in a thread pool": _read_pooled}


def parse_write(landing: Path, out: Path, reader: str) -> dict:
    """Arrow's JSON reader (`reader`, one of READERS) + one `write_deltalake`: parse and write, nothing else.

    (Arrow's dataset scanner over JSON files hangs with pyarrow 26 here.)"""
    files = sorted(str(p) for p in landing.iterdir() if p.suffix == ".jsonl")
    t = time.perf_counter()
    table = pa.concat_tables(READERS[reader](files))
    parse_s = time.perf_counter() - t
    t = time.perf_counter()
    write_deltalake(str(out), table)
    write_s = time.perf_counter() - t
    shutil.rmtree(out)
    return {"parse_s": parse_s, "write_s": write_s, "total_s": parse_s + write_s, "reader": reader,
            "rows": table.num_rows}


def parse_write_baseline(landing: Path, out: Path) -> dict:
    """In this (warm) process: the faster of the two readers, each followed by its write."""
    return min((parse_write(landing, out, reader) for reader in READERS), key=lambda r: r["total_s"])


def in_fresh_process(flag: str, *args: str) -> dict:
    """`python -m bench.ingest <flag> <args>` in a new process: the JSON line it prints last."""
    done = subprocess.run([sys.executable, "-m", "bench.ingest", flag, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"{flag} {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parse_write_fresh(landing: Path, out: Path) -> dict:
    """The same in fresh processes, as `--once` runs: one process per reader (so that neither reads in memory the
    other warmed), the faster kept."""
    runs = [in_fresh_process("--baseline-child", str(landing), str(out), reader) for reader in READERS]
    return min(runs, key=lambda r: r["total_s"])


# The `--once` variants measured: config overrides beside the lake's and the landing folder's.
ONCE_RUNS = {"threads": ["ingest.parse_on=threads"], "ray": ["ingest.parse_on=ray"],
             "threads_templates_uncached": ["ingest.parse_on=threads", "ingest.gx_template_cache=null"]}


def once(landing: Path, lake: Path, overrides: list[str]) -> dict:
    """One `run_once` on a fresh lake, in a fresh process (`_once_in_this_process`)."""
    shutil.rmtree(lake, ignore_errors=True)
    return in_fresh_process("--once-child", str(landing), str(lake), *overrides)


def _once_in_this_process(landing: str, lake: str, *overrides: str) -> None:
    """Time `run_once` in this process after its imports (and, parsing on Ray, Ray's start); print the result."""
    from ingestion.job import IngestJob
    from ingestion.staging import parse_on
    from ray_jobs.runtime import init_ray

    cfg = config.load(None, [f"lake.root={lake}", f"ingest.landing_dir={landing}", *overrides])
    ray_s = None
    if parse_on(cfg) == "ray":
        t = time.perf_counter()
        init_ray(cfg.ray)
        ray_s = time.perf_counter() - t
    t = time.perf_counter()
    report = IngestJob(cfg).run_once()
    job_s = time.perf_counter() - t
    print(json.dumps({"job_s": job_s, "ray_start_s": ray_s, "valid": report.totals()["valid"],
                      "lines": report.totals()["lines"], "phases": [b.phases for b in report.batches]}))


def follow(events: int, work: Path, repeats: int, parse_on: str) -> dict:
    """A follow-mode job with warm threads or workers; each repetition publishes `events` new events at once."""
    from ingestion.job import IngestJob
    from ingestion.simulator import simulate
    from ray_jobs.runtime import init_ray

    work = work / f"follow_{parse_on}"
    landing, lake = work / "landing", work / "lake"
    landing.mkdir(parents=True)
    cfg = config.load(None, [f"lake.root={lake}", f"ingest.landing_dir={landing}", "ingest.poll_interval_s=0.1",
                             f"ingest.parse_on={parse_on}"])
    if parse_on == "ray":
        init_ray(cfg.ray)
    staged = []
    for rep in range(repeats + 1):  # the first publication warms the workers, the GX project and the key index
        folder = work / f"staged{rep}"
        simulate(SimulatorConfig(seed=100 + rep, events=events if rep else 20_000,
                                 oracle_dir=str(work / f"oracle{rep}")), folder)
        staged.append(folder)
    done = threading.Condition()
    files_committed: list[int] = []

    phases: list[dict] = []  # per batch: where a follow-mode batch spends its time

    def on_batch(batch) -> None:
        with done:
            files_committed.append(batch.files)
            phases.append(batch.phases)
            done.notify()

    job, stop = IngestJob(cfg), threading.Event()
    runner = threading.Thread(target=job.follow, kwargs={"on_batch": on_batch, "stop": stop})
    runner.start()
    times = []
    for rep, folder in enumerate(staged):
        names = sorted(folder.iterdir())
        published = len(names)
        with done:
            before = len(files_committed)
        t = time.perf_counter()
        for path in names:  # same file system: each rename publishes a whole file
            path.rename(landing / f"r{rep}-{path.name}")
        with done:
            done.wait_for(lambda b=before, n=published: sum(files_committed[b:]) >= n, timeout=900)
        if rep:
            times.append(time.perf_counter() - t)
    stop.set()
    runner.join()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)
    return {"job_s": spread(times), "events_per_publication": events, "batch_phases_s": phases[-1]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--crash-events", type=int, default=10_000, help="simulator events per kill trial")
    parser.add_argument("--once-child", nargs="+", metavar="LANDING LAKE OVERRIDE", help=argparse.SUPPRESS)
    parser.add_argument("--baseline-child", nargs=3, metavar=("LANDING", "OUT", "READER"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.once_child:
        _once_in_this_process(*args.once_child)
        return 0
    if args.baseline_child:
        landing, out, reader = args.baseline_child
        print(json.dumps(parse_write(Path(landing), Path(out), reader)))
        return 0
    import ingestion.job  # noqa: F401  (GX's import is seconds: outside every timing)
    from ingestion.expectations import compile_templates
    from ingestion.simulator import simulate

    work = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    result: dict = {"command": "python -m bench.ingest " + " ".join(sys.argv[1:] if argv is None else argv),
                    "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        landing = work / "landing"
        t = time.perf_counter()
        sim = simulate(SimulatorConfig(events=args.events, oracle_dir=str(work / "oracle")), landing)
        result["simulator_events_per_s"] = round(sim.get("events", args.events) / (time.perf_counter() - t))
        compile_templates(config.load(None, []).ingest.gx_template_cache)  # as `make setup` leaves them
        runs: dict[str, list[dict]] = {name: [] for name in ONCE_RUNS}
        baselines, fresh_baselines = [], []
        names = list(ONCE_RUNS)
        for rep in range(args.repeats):
            # The order rotates, so that no variant always runs in the same place: a place's effect was as large as
            # a variant's here (the run right after the baselines was the slow one).
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                runs[name].append(once(landing, work / "lake", ONCE_RUNS[name]))
            baselines.append(parse_write_baseline(landing, work / "baseline"))
            fresh_baselines.append(parse_write_fresh(landing, work / "baseline"))
        events_table = DeltaTable(str(work / "lake" / "events")).to_pyarrow_table()
        writes = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            write_deltalake(str(work / "raw_write"), events_table, partition_by=EVENTS_PARTITION_BY)
            writes.append(time.perf_counter() - t)
            shutil.rmtree(work / "raw_write")
        base_s = statistics.median(b["total_s"] for b in baselines)
        job_s = statistics.median(r["job_s"] for r in runs["threads"])
        ray_job_s = statistics.median(r["job_s"] for r in runs["ray"])
        valid = runs["threads"][0]["valid"]
        result.update({
            "events": valid, "lines": runs["threads"][0]["lines"],
            "job_s": spread([r["job_s"] for r in runs["threads"]]),
            "batch_phases_s": runs["threads"][-1]["phases"],
            "ray_job_s": spread([r["job_s"] for r in runs["ray"]]),
            "templates_uncached_job_s": spread([r["job_s"] for r in runs["threads_templates_uncached"]]),
            "ray_start_s": spread([r["ray_start_s"] for r in runs["ray"]]),
            "ray_batch_phases_s": runs["ray"][-1]["phases"],
            "parse_write_s": spread([b["total_s"] for b in baselines]),
            "parse_write_parse_s": spread([b["parse_s"] for b in baselines]),
            "parse_write_reader": baselines[0]["reader"],
            "fresh_parse_write_s": spread([b["total_s"] for b in fresh_baselines]),
            "fresh_parse_write_parse_s": spread([b["parse_s"] for b in fresh_baselines]),
            "ratio_vs_fresh_parse_write": round(statistics.median(b["total_s"] for b in fresh_baselines) / job_s, 3),
            "ray_ratio_vs_fresh_parse_write": round(
                statistics.median(b["total_s"] for b in fresh_baselines) / ray_job_s, 3),
            "raw_write_s": spread(writes),
            "events_per_s": round(valid / job_s), "parse_write_events_per_s": round(valid / base_s),
            "ratio_vs_parse_write": round(base_s / job_s, 3),
            "ray_ratio_vs_parse_write": round(base_s / ray_job_s, 3),
            "templates_uncached_ratio_vs_parse_write": round(
                base_s / statistics.median(r["job_s"] for r in runs["threads_templates_uncached"]), 3),
            "ratio_vs_raw": round(statistics.median(writes) / job_s, 3),
        })
        for parse_on, prefix in (("threads", "follow"), ("ray", "ray_follow")):
            fol = follow(args.events, work, args.repeats, parse_on)
            result.update({f"{prefix}_job_s": fol["job_s"], f"{prefix}_batch_phases_s": fol["batch_phases_s"],
                           f"{prefix}_ratio_vs_parse_write": round(base_s / fol["job_s"]["median"], 3)})
        print(f"events={valid:,}: Arrow parse + write_deltalake {base_s:.2f}s; job parsing in threads: --once "
              f"{job_s:.2f}s (ratio {result['ratio_vs_parse_write']}), "
              f"--follow {result['follow_job_s']['median']:.2f}s "
              f"(ratio {result['follow_ratio_vs_parse_write']}); parsing in Ray tasks: --once {ray_job_s:.2f}s "
              f"(ratio {result['ray_ratio_vs_parse_write']}), --follow {result['ray_follow_job_s']['median']:.2f}s "
              f"(ratio {result['ray_follow_ratio_vs_parse_write']}); threads --once with the templates compiled in "
              f"the run {result['templates_uncached_job_s']['median']:.2f}s "
              f"(ratio {result['templates_uncached_ratio_vs_parse_write']}); the baseline in fresh processes "
              f"{result['fresh_parse_write_s']['median']:.2f}s: --once ratios {result['ratio_vs_fresh_parse_write']} "
              f"(threads), {result['ray_ratio_vs_fresh_parse_write']} (Ray)", flush=True)
        if args.trials:
            from bench.crash import trials

            crash = trials("ingest", args.crash_events, args.trials, work / "crash")
            result.update({"crash_trials": crash["trials"], "crash_events": args.crash_events,
                           "crash_landing_lines": crash["landing_lines"], "crash_phases": crash["phases"],
                           "crash_failed": crash["failed"], "crash_uninterrupted_work_s": crash["uninterrupted_work_s"],
                           "crash_trial_rows": crash["rows"]})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result.update({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
                   "load_avg_1m_at_end": round(os.getloadavg()[0], 2), "pyarrow": pa.__version__})
    print(f"| events/s --once | --follow | Arrow parse+write | ratio --once | ratio --follow | ratios on Ray "
          f"| crash trials | failed |\n"
          f"|---|---|---|---|---|---|---|---|\n| {result['events_per_s']:,} | "
          f"{round(result['events'] / result['follow_job_s']['median']):,} | {result['parse_write_events_per_s']:,} | "
          f"{result['ratio_vs_parse_write']} | {result['follow_ratio_vs_parse_write']} | "
          f"{result['ray_ratio_vs_parse_write']} / {result['ray_follow_ratio_vs_parse_write']} | "
          f"{result.get('crash_trials', 0)} | {result.get('crash_failed', 0)} |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result.get("crash_failed", 0) == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
