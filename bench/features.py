"""Feature-store benchmark: online read latency, freshness, and the feature job's throughput.

    python -m bench.features                      # 1M simulator events
    python -m bench.features --events 200000 --reads 300     # a quick look

Prints a table and writes bench/results/features.json. In one run, on the same lake:
- online reads of 1 user + `--items` candidates (the user's stats and sequence, the candidates' and their
  authors' stats), p50/p99, on SQLite and on a local redis-server, through Feast's own
  `get_online_features` (the baseline) and through the serving client's fast path, with 1 reader and with
  `--concurrency` readers in a closed loop, and the client also in an open loop (`--open-loop-rps` reads/s
  offered to the same readers, timed from each read's due time); the client merges concurrent requests into
  one store read (`features.merged_reads`), and the closed loop is run again with merging off, same run;
- freshness: one event handed to the real-time updater until an online read of its user reflects it;
- the feature job (windowed stats + sequences, Ray tasks) on the whole events table, events/s, against a
  plain read of the same columns from Delta (the baseline: the ratio says what the computation costs).
  `--job-repeats` runs, each a full computation on its own copy of the events table, on the Ray session that
  ingested them: the first is the first feature job those workers run, the later ones a cluster that has run it
  before (the steady state of a scheduled job). The headline is the median; every run is kept. On this kind of
  VM the spread is mostly the hypervisor's: memory the guest has freed is handed back to the host and costs
  ~8 s/GiB to touch again (BENCHMARKS.md, "Memory on this machine");
- materialisation of the job's rows into each online store (Feast's `materialize`, timed apart from the
  `feast apply` before it).
Simulation and ingestion are set-up, reported but not benchmarked here (see bench/ingest.py).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
from deltalake import DeltaTable

import config
from bench.ingest import RESULTS, machine
from config.schema import OnlineStoreConfig, PlatformConfig


def percentiles(samples_s: list[float]) -> tuple[float, float]:
    """(p50, p99) in milliseconds."""
    p50, p99 = np.percentile(np.asarray(samples_s) * 1000, [50, 99])
    return round(float(p50), 3), round(float(p99), 3)


def build_lake(root: Path, events: int) -> tuple[PlatformConfig, dict]:
    """Simulate and ingest `events` events under `root` (set-up, timed but not the benchmark); starts Ray, which
    the ingestion and then the feature job run on."""
    from ingestion.job import IngestJob
    from ingestion.simulator import simulate
    from ray_jobs.runtime import init_ray

    cfg = config.load(None, [f"lake.root={root / 'lake'}", f"ingest.landing_dir={root / 'landing'}",
                             f"simulator.oracle_dir={root / 'oracle'}", f"simulator.events={events}",
                             "ingest.build_data_docs=false", f"features.feast_dir={root / 'feast-sqlite'}",
                             f"features.online_store.path={root / 'feast-sqlite' / 'online.db'}"])
    t = time.perf_counter()
    simulate(cfg.simulator, cfg.ingest.landing_dir)
    setup = {"simulate_s": round(time.perf_counter() - t, 2)}
    init_ray(cfg.ray)
    t = time.perf_counter()
    IngestJob(cfg).run_once()
    setup["ingest_s"] = round(time.perf_counter() - t, 2)
    return cfg, setup


def events_copy(cfg: PlatformConfig, root: Path) -> PlatformConfig:
    """A config whose lake holds a copy of `cfg`'s events table and nothing else (a feature job from scratch)."""
    shutil.copytree(cfg.lake.events, root / "events")
    return cfg.model_copy(update={"lake": cfg.lake.model_copy(update={"root": str(root)})})


def read_latency(client, ids: dict, n_items: int, reads: int, threads: int = 1,
                 rate: float | None = None) -> list[float]:
    """Seconds per `client.get` of 1 user + `n_items` random candidates: `reads` timed reads in all, spread over
    `threads` threads that share one client (as a serving replica's thread pool does) and start together,
    after 10 untimed warm-up reads per thread (connections, registry, first-use imports). Every request is drawn
    before the threads start: drawing 200 random candidates takes the GIL for ~50 us, a third of what the client
    itself holds it for, so draws made during the run delayed the reads they were timing (py-spy --gil, 2026-12-05).

    Closed loop by default (each thread reads again as soon as it has its answer: a saturation test, where
    latency is mostly the queue). With `rate`, open loop: read k is due at start + k / rate (reads dealt to the
    threads in turn) and is timed from that due time, so time spent waiting for a free thread counts too."""
    import itertools
    import threading

    from tests.threads import run_together

    barrier, times, lock, numbers = threading.Barrier(threads), [], threading.Lock(), itertools.count()
    start: list[float] = []
    asks = []
    for seed in range(threads):
        rng = np.random.default_rng(seed)
        asks.append([(int(rng.choice(ids["users"])), rng.choice(ids["items"], n_items, replace=False).tolist())
                     for _ in range(10 + reads // threads + (seed < reads % threads))])

    def reader() -> None:
        with lock:
            seed = next(numbers)
        mine = []
        try:
            for k, (user, items) in enumerate(asks[seed]):
                timed = k >= 10
                if timed and not mine:
                    barrier.wait()  # every thread, even one with no timed read, has warmed up
                    with lock:
                        if not start:
                            start.append(time.perf_counter())
                started = time.perf_counter()
                if timed and rate:
                    started = start[0] + ((k - 10) * threads + seed) / rate
                    time.sleep(max(0.0, started - time.perf_counter()))
                client.get(user, items)
                if timed:
                    mine.append(time.perf_counter() - started)
            if not mine:
                barrier.wait()
        except BaseException:
            barrier.abort()  # the others stop waiting; run_together re-raises this failure
            raise
        with lock:
            times.extend(mine)

    run_together(reader, threads)
    return times


def freshness(cfg: PlatformConfig, store, ids: dict, events: int) -> dict:
    from features.online import OnlineFeatureClient
    from features.realtime import start_from_lake, time_to_visible

    t = time.perf_counter()
    updater = start_from_lake(cfg, store)
    bootstrap_s = time.perf_counter() - t
    client = OnlineFeatureClient(cfg, store=store)
    rng = np.random.default_rng(1)
    actions = ("impression", "click", "view", "like")
    times = []
    for i in range(events):
        item = int(rng.choice(ids["items"]))
        event = {"event_id": f"fresh-{i}", "ts": updater.watermark_ms + 100, "user_id": int(rng.choice(ids["users"])),
                 "item_id": item, "author_id": updater.item_author.get(item), "action": actions[i % 4],
                 "value": 40.0 if actions[i % 4] == "view" else None}
        times.append(time_to_visible(updater, client, event))
    return {"p50_p99_ms": percentiles(times), "bootstrap_s": round(bootstrap_s, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--items", type=int, default=200)
    parser.add_argument("--reads", type=int, default=1000, help="timed reads per path through the client")
    parser.add_argument("--feast-reads", type=int, default=200, help="timed reads through Feast's SDK")
    parser.add_argument("--concurrency", type=int, default=16, help="readers sharing one client, the second run")
    parser.add_argument("--open-loop-rps", type=float, default=150.0,
                        help="the client's open-loop run: reads/s offered to the same readers (serving's whole "
                             "/recommend path saturated at 118 req/s with 16 clients, bench.serve 2026-12-04)")
    parser.add_argument("--fresh-events", type=int, default=200)
    parser.add_argument("--job-repeats", type=int, default=3,
                        help="feature job runs, each on its own copy of the events table (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the temp lake")
    args = parser.parse_args(argv)

    from features.job import FeatureJob
    from features.online import OnlineFeatureClient
    from features.repo import apply_definitions
    from tests.redis_server import RedisServer

    root = Path(tempfile.mkdtemp(prefix="bench-features-"))
    given = sys.argv[1:] if argv is None else argv
    results: dict = {"command": " ".join(["python -m bench.features", *given]), "events": args.events,
                     "items_per_read": args.items, "concurrency": args.concurrency,
                     "open_loop_rps": args.open_loop_rps,
                     "load_avg_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        cfg, results["setup"] = build_lake(root, args.events)
        events = DeltaTable(cfg.lake.events)
        n_events = events.count()
        t = time.perf_counter()
        raw = events.to_pyarrow_table(columns=["user_id", "item_id", "author_id", "ts", "action", "value"])
        raw_s = time.perf_counter() - t
        runs, repeats = [], max(1, args.job_repeats)
        for rep in range(repeats):  # the last run is on the lake the rest of the benchmark reads
            run_cfg = cfg if rep == repeats - 1 else events_copy(cfg, root / f"job-run{rep}")
            job = FeatureJob(run_cfg)
            report = job.run(materialize=False)
            runs.append(report.seconds)
        job_s = statistics.median(r["compute"] for r in runs)
        results.update({
            "feature_job_s": job_s, "feature_job_events_per_s": round(n_events / job_s),
            "feature_job_runs_s": [r["compute"] for r in runs],
            "feature_job_events_per_s_first_run": round(n_events / runs[0]["compute"]),
            "raw_read_events_per_s": round(n_events / raw_s), "ratio_vs_raw_read": round(raw_s / job_s, 4),
            "feature_rows": report.rows, "feature_job_phases_s": runs,
        })
        ids = {"users": np.unique(raw["user_id"].to_numpy()), "items": np.unique(raw["item_id"].to_numpy())}
        with RedisServer() as redis:
            backends = {"sqlite": cfg}
            redis_cfg = cfg.model_copy(deep=True)
            redis_cfg.features.feast_dir = str(root / "feast-redis")
            redis_cfg.features.online_store = OnlineStoreConfig(type="redis", connection_string=redis.connection_string)
            backends["redis"] = redis_cfg
            for name, backend in backends.items():
                t = time.perf_counter()
                store = apply_definitions(backend)
                results[f"feast_apply_s_{name}"] = round(time.perf_counter() - t, 2)
                t = time.perf_counter()
                job.materialize(report, store)
                results[f"materialize_s_{name}"] = round(time.perf_counter() - t, 2)
                clients = {"client": (OnlineFeatureClient(backend, store=store), args.reads),
                           "feast": (OnlineFeatureClient(backend, fast=False, store=store), args.feast_reads)}
                # The same client reading one request at a time: what merging concurrent requests is worth.
                one_by_one = backend.model_copy(deep=True)
                one_by_one.features.online_store.requests_per_read = 1
                clients["unmerged"] = (OnlineFeatureClient(one_by_one, store=store), args.reads)
                for path, (client, reads) in clients.items():
                    for threads, suffix in ((1, ""), (args.concurrency, f"_c{args.concurrency}")):
                        if path == "unmerged" and threads == 1:
                            continue
                        calls = client._merged.calls if client._merged else 0
                        times = read_latency(client, ids, args.items, reads, threads)
                        p50_p99 = percentiles(times)
                        results[f"{path}_p50_ms{suffix}_{name}"], results[f"{path}_p99_ms{suffix}_{name}"] = p50_p99
                        results[f"{path}_reads{suffix}_{name}"] = len(times)
                        if path == "client":  # requests per store read, warm-up reads included
                            results[f"client_requests_per_read{suffix}_{name}"] = round(
                                (len(times) + 10 * threads) / (client._merged.calls - calls), 2)
                times = read_latency(clients["client"][0], ids, args.items, args.reads, args.concurrency,
                                     rate=args.open_loop_rps)
                results[f"client_p50_ms_open_{name}"], results[f"client_p99_ms_open_{name}"] = percentiles(times)
                fresh = freshness(backend, store, ids, args.fresh_events)
                results[f"freshness_p50_ms_{name}"], results[f"freshness_p99_ms_{name}"] = fresh["p50_p99_ms"]
                results[f"realtime_bootstrap_s_{name}"] = fresh["bootstrap_s"]
        results["freshness_p99_ms"] = max(results["freshness_p99_ms_sqlite"], results["freshness_p99_ms_redis"])
        for name in ("sqlite", "redis"):
            for suffix in ("", f"_c{args.concurrency}"):
                results[f"client_vs_feast_speedup{suffix}_{name}"] = round(
                    results[f"feast_p99_ms{suffix}_{name}"] / results[f"client_p99_ms{suffix}_{name}"], 1)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    results.update({"date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine()})
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "features.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    return 0


def print_table(r: dict) -> None:
    print(f"\nfeatures benchmark: {r['events']:,} events, 1 user + {r['items_per_read']} items per read")
    print(f"machine: {r['machine']}")
    print(f"{'online read (ms)':<46}{'p50':>10}{'p99':>10}")
    c = f"_c{r['concurrency']}"
    for store in ("sqlite", "redis"):
        for path, label in (("feast", "Feast get_online_features"), ("client", "serving client (fast path)")):
            for suffix, readers in (("", "1 reader"), (c, f"{r['concurrency']} readers")):
                print(f"  {store:<7}{label:<27}{readers:<12}{r[f'{path}_p50_ms{suffix}_{store}']:>10.2f}"
                      f"{r[f'{path}_p99_ms{suffix}_{store}']:>10.2f}")
        if f"unmerged_p99_ms{c}_{store}" in r:
            print(f"  {store:<7}{'  the same, not merged':<27}{r['concurrency']:<3} readers  "
                  f"{r[f'unmerged_p50_ms{c}_{store}']:>10.2f}{r[f'unmerged_p99_ms{c}_{store}']:>10.2f}"
                  f"   (merged: {r[f'client_requests_per_read{c}_{store}']} requests per read)")
    for store in ("sqlite", "redis"):
        if f"client_p99_ms_open_{store}" in r:
            print(f"  {store:<7}{'serving client, open loop':<27}{r['open_loop_rps']:>5g}/s     "
                  f"{r[f'client_p50_ms_open_{store}']:>10.2f}{r[f'client_p99_ms_open_{store}']:>10.2f}")
    for store in ("sqlite", "redis"):
        print(f"  {store:<7}{'freshness (event -> visible)':<27}{r[f'freshness_p50_ms_{store}']:>10.2f}"
              f"{r[f'freshness_p99_ms_{store}']:>10.2f}")
    print(f"feature job: {r['feature_job_events_per_s']:,} events/s (median of {r['feature_job_runs_s']} s; first run "
          f"{r['feature_job_events_per_s_first_run']:,}/s); plain Delta read "
          f"{r['raw_read_events_per_s']:,} events/s; ratio {r['ratio_vs_raw_read']}")
    stores = ", ".join(f"{store} {r[f'materialize_s_{store}']}s (+{r[f'feast_apply_s_{store}']}s feast apply)"
                       for store in ("sqlite", "redis"))
    print(f"materialisation of the job's range into the online store (Feast materialize): {stores}")
    print(f"written to {RESULTS / 'features.json'}")


if __name__ == "__main__":
    raise SystemExit(main())
