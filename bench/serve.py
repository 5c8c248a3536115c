"""Serving benchmark: /recommend latency and throughput, Serve defaults vs the tuned serving/config.yaml.

    python -m bench.serve [--root data/demo] [--seconds 15] [--ranker DIR --retriever DIR]

Needs a lake with features (`make demo` writes data/demo); its Feast folder is copied so the benchmark never
writes to it. The retriever is the NEZHA artifact `make demo` trains (<root>/artifacts/retriever) unless
--retriever names another; without --ranker a toy GenRank of the shape training builds by default (training.d_model,
training.max_hist_len) over the lake's catalogue is built (bench.toy): latency depends on model size, not on
training.

Variants, each on a fresh local Ray (a subprocess: Serve reads its settings from the environment at start):
- default: Serve's defaults (no max_ongoing/max_queued limits, torch on all cores, no batching settings);
- tuned: serving/config.yaml as shipped, plus Ray Serve's throughput-optimised mode
  (RAY_SERVE_THROUGHPUT_OPTIMIZED=1: gRPC between deployments, user code on the replica's event loop, no
  per-request log lines to stderr); clients call the proxy, as on the cluster. The goals are judged here;
- tuned_direct: the same, clients calling the Ingress replica's own HTTP port (direct ingress, no proxy hop).
Per variant: closed-loop clients at concurrency 1, 4, 16, 64 (200 candidates retrieved, top 10 returned),
then (tuned variants) an open-loop overload run at 2x the best measured RPS.
Writes bench/results/serve.json and bench/results/serve_latency_cdf.png; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

import config
from bench.toy import ranker_artifact
from features.offline import duckdb_connection
from features.repo import absolute_paths
from ray_jobs.runtime import init_ray
from serving.deploy import base_url, deploy, serve_config, shutdown

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 4, 16, 64)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()}


def summarize(lat_ms: list[float], codes: Counter, seconds: float, stages: dict[str, list[float]]) -> dict:
    lat = np.asarray(lat_ms) if lat_ms else np.zeros(1)
    ok = codes.get(200, 0)
    return {"requests": sum(codes.values()), "ok": ok, "rps": round(ok / seconds, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 2), "p95_ms": round(float(np.percentile(lat, 95)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2), "codes": {str(k): v for k, v in codes.items()},
            "errors": sum(v for k, v in codes.items() if k != 200),
            "stages_mean_ms": {k: round(float(np.mean(v)), 2) for k, v in sorted(stages.items())}}


async def closed_loop(url: str, users: list[int], concurrency: int, seconds: float) -> tuple[dict, list[float]]:
    lat, codes, stages, fallbacks = [], Counter(), defaultdict(list), Counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
        end = time.perf_counter() + seconds

        async def client(c: int) -> None:
            i = c
            while time.perf_counter() < end:
                code, r, ms = await _recommend(http, users[i % len(users)])
                codes[code] += 1
                i += concurrency
                if code == 200:
                    lat.append(ms)
                    body = r.json()
                    fallbacks[body["fallback"]] += 1
                    for k, v in body["timings_ms"].items():
                        stages[k].append(v)

        t0 = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(concurrency)))
        elapsed = time.perf_counter() - t0
    out = summarize(lat, codes, elapsed, stages)
    out["fallbacks"] = {str(k): v for k, v in fallbacks.items()}
    return out, lat


async def _recommend(http: httpx.AsyncClient, user: int):
    """One /recommend call: (status, response or None, milliseconds); -1 when the connection failed."""
    t = time.perf_counter()
    try:
        r = await http.post("/recommend", json={"user_id": user, "k": 10})
    except httpx.HTTPError:
        return -1, None, (time.perf_counter() - t) * 1000
    return r.status_code, r, (time.perf_counter() - t) * 1000


async def open_loop(url: str, users: list[int], rate: float, seconds: float) -> dict:
    """Requests at a fixed rate regardless of answers (what overload looks like): 503s must come fast."""
    lat, codes, rejected_ms = [], Counter(), []
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=httpx.Limits(max_connections=1000)) as http:
        async def one(i: int) -> None:
            code, _, ms = await _recommend(http, users[i % len(users)])
            codes[code] += 1
            (lat if code == 200 else rejected_ms).append(ms)

        tasks, start = [], time.perf_counter()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    out = summarize(lat, codes, elapsed, {})
    total = sum(codes.values())
    out.update(rate=round(rate, 1), share_503=round(codes.get(503, 0) / max(total, 1), 3),
               non503_errors=sum(v for k, v in codes.items() if k not in (200, 503)),
               p99_rejected_ms=round(float(np.percentile(rejected_ms, 99)), 2) if rejected_ms else None)
    return out


def direct_ingress_url(sc: dict) -> str | None:
    """With direct ingress (throughput-optimised mode) the Ingress replica serves HTTP itself, on the first free
    port from RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT (30000); None when no replica answers there."""
    host = base_url(sc).rsplit(":", 1)[0]
    start = int(os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "30000"))
    for port in range(start, start + 8):
        try:
            if httpx.get(f"{host}:{port}/healthz", timeout=5).status_code == 200:
                return f"{host}:{port}"
        except httpx.HTTPError:
            continue
    return None


def run_variant(sc: dict, users: list[int], seconds: float, overload: bool, direct: bool) -> tuple[dict, dict]:
    deploy(sc)
    url = (direct_ingress_url(sc) if direct else None) or base_url(sc)
    print(f"   clients call {url}", flush=True)
    try:
        asyncio.run(closed_loop(url, users, 4, 3.0))  # warm-up: imports, caches, first model calls
        results, lats = {}, {}
        for c in CONCURRENCY:
            results[f"c{c}"], lats[c] = asyncio.run(closed_loop(url, users, c, seconds))
            r = results[f"c{c}"]
            print(f"   c={c:<3} rps={r['rps']:<7} p50={r['p50_ms']:<8} p95={r['p95_ms']:<8} p99={r['p99_ms']:<8} "
                  f"errors={r['errors']} stages={r['stages_mean_ms']}", flush=True)
        if overload:
            best = max(results[f"c{c}"]["rps"] for c in CONCURRENCY)
            results["overload"] = asyncio.run(open_loop(url, users, 2 * best, seconds))
            r = results["overload"]
            print(f"   overload at {r['rate']} req/s: 503 share {r['share_503']}, admitted p99 {r['p99_ms']} ms, "
                  f"rejected p99 {r['p99_rejected_ms']} ms, other errors {r['non503_errors']}", flush=True)
        return results, lats
    finally:
        shutdown()


def plot(lats: dict[str, dict[int, list[float]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for variant, style in (("default", "--"), ("tuned", "-"), ("tuned_direct", ":")):
        for c, lat in lats.get(variant, {}).items():
            if lat:
                x = np.sort(lat)
                ax.plot(x, np.arange(1, len(x) + 1) / len(x), style, label=f"{variant} c={c}")
    ax.set_xscale("log")
    ax.set_xlabel("/recommend latency (ms, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Serving latency CDF (200 candidates, top 10)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# Ray Serve's throughput-optimised mode for the tuned variants (read by every Serve process at start).
TUNED_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}
VARIANTS = ("default", "tuned", "tuned_direct")


def variant_subprocess(variant: str, work: Path) -> tuple[dict, dict]:
    """Runs one variant (set up by work/spec.json) on its own local Ray (its environment decides Serve's mode);
    its results and latencies."""
    out = work / f"{variant}.json"
    env = {**os.environ, **(TUNED_ENV if variant != "default" else {})}
    subprocess.run([sys.executable, "-m", "bench.serve", "--run-variant", variant, "--work", str(work)],
                   env=env, check=True)
    got = json.loads(out.read_text())
    return got["results"], {int(c): lat for c, lat in got["lats"].items()}


def run_variant_here(variant: str, work: Path) -> int:
    spec = json.loads((work / "spec.json").read_text())
    init_ray(config.load(None, spec["overrides"]).ray)
    sc = serve_config(config=spec["profile"], ranker=spec["ranker"], retriever=spec["retriever"],
                      port=spec["port"], defaults=variant == "default")
    results, lats = run_variant(sc, spec["users"], spec["seconds"], overload=variant != "default",
                                direct=variant == "tuned_direct")
    (work / f"{variant}.json").write_text(json.dumps({"results": results, "lats": lats}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="folder with lake/ and feast/ (make demo writes it)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per concurrency level")
    parser.add_argument("--ranker")
    parser.add_argument("--retriever", help="retriever artifact (default: <root>/artifacts/retriever)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_variant:
        return run_variant_here(args.run_variant, Path(args.work))
    root = Path(args.root).resolve()
    if not (root / "lake" / "features_item_stats").exists():
        print(f"{root} has no feature tables: run `make demo` first (or pass --root)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    shutil.copytree(root / "feast", work / "feast", ignore=shutil.ignore_patterns("repo"))
    overrides = [f"lake.root={root / 'lake'}", f"features.feast_dir={work / 'feast'}",
                 f"features.online_store.path={work / 'feast' / 'online.db'}", f"ingest.landing_dir={work / 'landing'}"]
    cfg = absolute_paths(config.load(None, overrides))
    con = duckdb_connection()
    n_items, n_users, n_authors = con.execute(
        f"SELECT max(item_id), max(user_id), max(author_id) FROM delta_scan('{cfg.lake.events}')").fetchone()
    users = [r[0] for r in con.execute(f"SELECT user_id FROM delta_scan('{cfg.lake.events}') "
                                       "WHERE action <> 'impression' GROUP BY user_id ORDER BY user_id").fetchall()]
    con.close()
    ranker = args.ranker or ranker_artifact(work / "ranker", cfg, num_users=n_users, num_items=n_items,
                                            num_authors=n_authors, max_hist_len=cfg.training.max_hist_len,
                                            d_model=cfg.training.d_model).folder
    retriever = Path(args.retriever or root / "artifacts" / "retriever")
    if not (retriever / "manifest.json").exists():
        print(f"no retriever artifact at {retriever}: run `make demo` first (or pass --retriever)")
        return 2
    profile = work / "profile.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    spec = {"profile": str(profile), "overrides": overrides, "ranker": str(ranker), "retriever": str(retriever),
            "port": args.port, "users": users, "seconds": args.seconds}
    (work / "spec.json").write_text(json.dumps(spec))
    load_before = os.getloadavg()
    results, lats = {}, {}
    for variant in VARIANTS:
        print(f"== {variant} Serve settings", flush=True)
        results[variant], lats[variant] = variant_subprocess(variant, work)
    tuned = results["tuned"]
    out = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "setup": {"candidates": cfg.serving.num_candidates, "k": 10, "items": n_items, "users": len(users),
                  "seconds_per_level": args.seconds, "ranker": str(ranker), "retriever": str(retriever),
                  "tuned_env": TUNED_ENV},
        "p50_ms_c1": tuned["c1"]["p50_ms"], "p99_ms_c1": tuned["c1"]["p99_ms"], "rps_c16": tuned["c16"]["rps"],
        "p99_ms_c16": tuned["c16"]["p99_ms"], "overload_non503_errors": tuned["overload"]["non503_errors"],
        "rps_c16_default": results["default"]["c16"]["rps"],
        "rps_c16_ratio_tuned_vs_default": round(tuned["c16"]["rps"] / max(results["default"]["c16"]["rps"], 1e-9), 2),
        "rps_c16_direct_ingress": results["tuned_direct"]["c16"]["rps"],
        "p99_ms_c1_direct_ingress": results["tuned_direct"]["c1"]["p99_ms"],
        "goals": {"p99_ms_c1<=50": tuned["c1"]["p99_ms"] <= 50, "rps_c16>=100": tuned["c16"]["rps"] >= 100},
        "variants": results,
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "serve.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(lats, RESULTS / "serve_latency_cdf.png")
    print(json.dumps({k: v for k, v in out.items() if k not in ("variants", "setup")}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
