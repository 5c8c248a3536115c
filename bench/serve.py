"""Serving benchmark: /recommend latency, throughput and CPU under load, Serve defaults vs the tuned
serving/config.yaml in both serving modes (cascade, split), and event freshness on the real paths.

    python -m bench.serve [--root data/demo] [--seconds 15] [--ranker DIR --retriever DIR --dense-retriever DIR]

Needs a lake with features (`make demo` writes data/demo); each variant gets its own copy of the Feast folder
(the events it posts change the online store), so the benchmark never writes to the lake's. The retriever is
the NEZHA artifact `make demo` trains (<root>/artifacts/retriever) unless --retriever names another, and the dense
channel's artifact beside it (<root>/artifacts/dense_retriever, or --dense-retriever) when there is one; without
--ranker a toy GenRank of the shape training builds by default (training.d_model, training.max_hist_len) over
the lake's catalogue is built (bench.toy): latency depends on model size, not on training.

Variants, each on a fresh local Ray (a subprocess: Serve reads its settings from the environment at start):
- default: Serve's defaults (no max_ongoing/max_queued limits, torch on all cores, no batching settings, Serve's
  Python proxy on the HTTP port), split mode (the layout before the cascade existed);
- cascade: as shipped: serving/config.yaml, serving.mode=cascade (the Ingress retrieves and ranks in process), the
  Serve environment `serving.deploy.SERVE_PROCESS_ENV` (throughput-optimised mode, HAProxy on the HTTP port);
  clients call the HTTP port, the documented entry point. The goals are judged here;
- cascade_serve_proxy: the same without HAProxy: Serve's Python proxy on the HTTP port (the layout before HAProxy);
- cascade_direct: the same, clients calling the Ingress replica's own HTTP port (direct ingress, no proxy hop);
- split: as shipped, serving.mode=split (Retriever and Ranker deployments);
- cascade_one_channel: cascade with the generative channel alone (no dense artifact), beside cascade's all channels
  (generative, dense, trending): what the dense channel costs a request (closed loop only).
Per variant: closed-loop clients at concurrency 1, 4, 16, 64 (200 candidates retrieved, top 10 returned); then
(tuned variants: all but default) an open-loop sweep at fixed arrival rates of 25-125% of the best closed-loop
goodput (the saturation rate), an overload run at 200%, and the /events freshness probes under an open loop at 50%.
During every level the engagements the load produced are posted through POST /events (bench.serve_load), so
the queried users' histories change as they would. Per level: latency percentiles over all responses and
over 200s, goodput, errors by status, CPU per request of the Ray processes and of the load generator, and in the
open loop how far the load generator fell behind its own schedule (`client_lag_*`: its share of the latency).
Last, the freshness of landing file -> ingest --follow --push-features -> online store (bench.serve_follow).
Writes bench/results/serve.json and bench/results/serve_latency_cdf.png; prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import secrets
import shutil
import subprocess
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import yaml

import config
from bench.serve_follow import follow_freshness
from bench.serve_load import Load, UserStream, freshness_probes
from bench.toy import ranker_artifact
from features.offline import duckdb_connection
from features.online import OnlineFeatureClient
from features.repo import absolute_paths
from ray_jobs.runtime import init_ray
from serving.deploy import SERVE_PROCESS_ENV, base_url, deploy, serve_config, shutdown

RESULTS = Path(__file__).resolve().parent / "results"
CONCURRENCY = (1, 4, 16, 64)
OPEN_LOOP = (0.25, 0.5, 0.75, 1.0, 1.25)  # arrival rates as fractions of the saturation rate
OVERLOAD = 2.0
FRESHNESS_LOAD = 0.5


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()}


def lake_facts(cfg) -> dict:
    """Catalogue sizes and the users with engagements (the ones queried)."""
    con = duckdb_connection()
    try:
        events = f"delta_scan('{cfg.lake.events}')"
        items, max_user, authors = con.execute(
            f"SELECT max(item_id), max(user_id), max(author_id) FROM {events}").fetchone()
        users = [r[0] for r in con.execute(f"SELECT user_id FROM {events} WHERE action <> 'impression' "
                                           "GROUP BY user_id ORDER BY user_id").fetchall()]
    finally:
        con.close()
    return {"items": items, "max_user": max_user, "authors": authors, "users": users}


def level_line(name: str, r: dict) -> str:
    return (f"   {name:<10} goodput={r['goodput_rps']:<6} p50={r['p50_ms']}/{r['p50_ms_ok']} "
            f"p99={r['p99_ms']}/{r['p99_ms_ok']} (all/200) errors={r['errors_by_status']} "
            f"cpu/req={r['cpu_ms_per_request']} loadgen/req={r['loadgen_cpu_ms_per_request']} "
            f"events={r['events']['events_accepted']}" +
            (f" client lag p50/p99={r['client_lag_p50_ms']}/{r['client_lag_p99_ms']}" if "client_lag_p99_ms" in r
             else ""))


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


def run_variant(sc: dict, spec: dict, variant: str, cfg) -> tuple[dict, dict]:
    """The variant's levels; latencies for the CDF: closed loop's 200s by concurrency, open loop's all
    responses by rate fraction."""
    deploy(sc)
    url = (direct_ingress_url(sc) if variant.endswith("_direct") else None) or base_url(sc)
    print(f"   clients call {url}", flush=True)
    users, seconds = UserStream(spec["users"]), spec["seconds"]
    events = {"key": os.environ[cfg.serving.api_key_env], "rate": spec["event_posts_per_s"],
              "max_events": cfg.serving.max_events, "prefix": f"bench-{variant}"}

    def level(shape: str, *args, connections: int = 1000, probe=None) -> tuple[dict, Load]:
        load = Load(url, users, events, connections)
        return asyncio.run(load.run(getattr(load, shape), *args, probe=probe)), load

    try:
        # Warm-up: imports, caches, first model calls, and the first event's catch-up (it moves the real-time
        # windows from the lake's last event to now: every entity's row is rewritten once).
        level("closed", 4, 3.0)
        results, lats = {}, {"closed": {}, "open": {}}
        for c in CONCURRENCY:
            results[f"c{c}"], load = level("closed", c, seconds, connections=c)
            lats["closed"][c] = load.rec.ok_ms
            print(level_line(f"c={c}", results[f"c{c}"]), flush=True)
        if variant in CLOSED_LOOP_ONLY:
            return results, lats
        best = max(results[f"c{c}"]["goodput_rps"] for c in CONCURRENCY)
        results["saturation_rps"] = best
        for f in (*OPEN_LOOP, OVERLOAD):
            name = "overload" if f == OVERLOAD else f"open{round(f * 100)}"
            results[name], load = level("open", f * best, seconds)
            results[name]["rate"] = round(f * best, 1)
            lats["open"][f] = load.rec.all_ms
            print(level_line(f"{name}@{f * best:.0f}/s", results[name]), flush=True)
        client = OnlineFeatureClient(cfg)

        async def probe(http):
            return await freshness_probes(http, events["key"], client, spec["users"], spec["items"],
                                          spec["probes"])

        results["freshness"], _ = level("open", FRESHNESS_LOAD * best, None, probe=probe)
        r = results["freshness"]
        print(level_line("freshness", r) + f"\n   /events -> /recommend freshness: {r['freshness']}", flush=True)
        return results, lats
    finally:
        shutdown()


def plot(lats: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (closed, opened) = plt.subplots(1, 2, figsize=(14, 5), sharey=True)
    # Colour: the load level; line style: the variant.
    styles = {"default": "--", "cascade": "-", "cascade_serve_proxy": (0, (5, 1)), "cascade_direct": ":",
              "split": "-.", "cascade_one_channel": (0, (1, 3))}
    for variant, got in lats.items():
        for ax, shape in ((closed, "closed"), (opened, "open")):
            for i, (level, lat) in enumerate(got[shape].items()):
                if lat:
                    x = np.sort(lat)
                    name = f"c={level}" if shape == "closed" else f"{float(level):.0%}"
                    ax.plot(x, np.arange(1, len(x) + 1) / len(x), linestyle=styles[variant], color=f"C{i}",
                            label=f"{variant} {name}")
    closed.set_title("closed loop, 200s (200 candidates, top 10)")
    opened.set_title("open loop, all responses, from scheduled send (% of saturation rate)")
    closed.set_ylabel("fraction of requests")
    for ax in (closed, opened):
        ax.set_xscale("log")
        ax.set_xlabel("/recommend latency (ms, log)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# The tuned variants' Serve environment: as shipped (serving.deploy.SERVE_PROCESS_ENV: throughput-optimised mode and
# HAProxy on the HTTP port), or without HAProxy for the variants that measure Serve's own proxy and direct calls.
TUNED_ENV = SERVE_PROCESS_ENV
NO_HAPROXY_ENV = {k: v for k, v in SERVE_PROCESS_ENV.items() if k != "RAY_SERVE_ENABLE_HA_PROXY"}
VARIANT_ENV = {"default": {}, "cascade": TUNED_ENV, "cascade_serve_proxy": NO_HAPROXY_ENV,
               "cascade_direct": NO_HAPROXY_ENV, "split": TUNED_ENV, "cascade_one_channel": TUNED_ENV}
VARIANTS = tuple(VARIANT_ENV)
CLOSED_LOOP_ONLY = ("default", "cascade_one_channel")
DEFAULT_MODE = config.load().serving.mode  # what the goals are judged on: the mode serving runs by default
# The /events API key reaches the Ingress through its environment, as from a Secret on Kubernetes.
CONFIG_KEY_ENV = config.load().serving.api_key_env


def variant_subprocess(variant: str, work: Path, api_key: str) -> tuple[dict, dict]:
    """Runs one variant (set up by work/spec.json) on its own local Ray (its environment decides Serve's mode and
    carries the /events API key to the Ingress); its results and latencies."""
    env = {**{k: v for k, v in os.environ.items() if k not in SERVE_PROCESS_ENV}, **VARIANT_ENV[variant],
           CONFIG_KEY_ENV: api_key}
    subprocess.run([sys.executable, "-m", "bench.serve", "--run-variant", variant, "--work", str(work)],
                   env=env, check=True)
    got = json.loads((work / f"{variant}.json").read_text())
    return got["results"], got["lats"]


def variant_mode(variant: str) -> str:
    return "split" if variant == "default" else variant.split("_")[0]


def variant_dense(variant: str, spec: dict) -> str | None:
    """The dense channel's artifact a variant serves: every variant's but the one-channel one's."""
    return None if variant == "cascade_one_channel" else spec.get("dense_retriever")


def variant_config(root: Path, folder: Path, mode: str) -> tuple[object, Path]:
    """The config a variant serves: the lake read in place; its own copy of the Feast folder (the events it
    posts change the online store) and its own landing folder."""
    shutil.copytree(root / "feast", folder / "feast", ignore=shutil.ignore_patterns("repo"))
    overrides = [f"serving.mode={mode}", f"lake.root={root / 'lake'}", f"features.feast_dir={folder / 'feast'}",
                 f"features.online_store.path={folder / 'feast' / 'online.db'}",
                 f"ingest.landing_dir={folder / 'landing'}"]
    cfg = absolute_paths(config.load(None, overrides))
    profile = folder / "profile.yaml"
    profile.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return cfg, profile


def run_variant_here(variant: str, work: Path) -> int:
    spec = json.loads((work / "spec.json").read_text())
    cfg, profile = variant_config(Path(spec["root"]), work / variant, variant_mode(variant))
    init_ray(cfg.ray)
    sc = serve_config(config=str(profile), ranker=spec["ranker"], retriever=spec["retriever"], port=spec["port"],
                      dense_retriever=variant_dense(variant, spec), defaults=variant == "default")
    results, lats = run_variant(sc, spec, variant, cfg)
    (work / f"{variant}.json").write_text(json.dumps({"results": results, "lats": lats}))
    return 0


def summary(results: dict, follow: dict) -> dict:
    """The headline figures (the default mode, through the proxy, unless named otherwise), the other mode's and
    direct ingress's beside them, and the goals."""
    other = "split" if DEFAULT_MODE == "cascade" else "cascade"
    main, default = results[DEFAULT_MODE], results["default"]
    fresh = main["freshness"]["freshness"]
    out = {
        "mode": DEFAULT_MODE,
        "p50_ms_c1": main["c1"]["p50_ms"], "p99_ms_c1": main["c1"]["p99_ms"],
        "rps_c16": main["c16"]["goodput_rps"], "goodput_rps_c16": main["c16"]["goodput_rps"],
        "p99_ms_c16": main["c16"]["p99_ms"], "p99_ms_c16_ok": main["c16"]["p99_ms_ok"],
        "cpu_ms_per_request": main["c16"]["cpu_ms_per_request"],
        "loadgen_cpu_ms_per_request": main["c16"]["loadgen_cpu_ms_per_request"],
        "saturation_rps": main["saturation_rps"],
        "overload_rate_rps": main["overload"]["rate"], "overload_share_503": main["overload"]["share_503"],
        "overload_goodput_rps": main["overload"]["goodput_rps"],
        "overload_admitted_p50_ms": main["overload"]["p50_ms_ok"],
        "overload_admitted_p99_ms": main["overload"]["p99_ms_ok"],
        "overload_client_lag_p99_ms": main["overload"].get("client_lag_p99_ms"),
        "overload_non503_errors": sum(v for k, v in main["overload"]["errors_by_status"].items() if k != "503"),
        "rps_c16_default": default["c16"]["goodput_rps"],
        "rps_c16_ratio_vs_default": round(main["c16"]["goodput_rps"] / max(default["c16"]["goodput_rps"], 1e-9), 2),
        "freshness_events_p50_ms": fresh["p50_ms"], "freshness_events_p99_ms": fresh["p99_ms"],
        "freshness_events_not_visible": fresh["not_visible"],
        "freshness_follow_p50_ms": follow["p50_ms"], "freshness_follow_p99_ms": follow["p99_ms"],
        "freshness_follow_not_visible": follow["not_visible"],
    }
    for variant in (f"{DEFAULT_MODE}_serve_proxy", f"{DEFAULT_MODE}_direct", other):
        got = results[variant]
        out[variant] = {"p99_ms_c1": got["c1"]["p99_ms"], "rps_c16": got["c16"]["goodput_rps"],
                        "cpu_ms_per_request": got["c16"]["cpu_ms_per_request"],
                        "overload_admitted_p99_ms": got["overload"]["p99_ms_ok"]}
    if "cascade_one_channel" in results:  # serving latency with one retrieval channel and with all of them
        out["channels"] = {name: {"p50_ms_c1": got["c1"]["p50_ms"], "p99_ms_c1": got["c1"]["p99_ms"],
                                  "rps_c16": got["c16"]["goodput_rps"],
                                  "cpu_ms_per_request": got["c16"]["cpu_ms_per_request"]}
                           for name, got in (("all", main), ("generative_only", results["cascade_one_channel"]))}
    # A probe never seen fails its goal whatever the percentiles of the others say.
    out["goals"] = {"p99_ms_c1<=50": out["p99_ms_c1"] <= 50, "rps_c16>=100": out["rps_c16"] >= 100,
                    "cpu_ms_per_request<=20": out["cpu_ms_per_request"] <= 20,
                    "freshness_events_p99_ms<=1000": not fresh["not_visible"] and fresh["p99_ms"] <= 1000,
                    "freshness_follow_p99_ms<=2000": not follow["not_visible"] and follow["p99_ms"] <= 2000}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="data/demo", help="folder with lake/ and feast/ (make demo writes it)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per load level")
    parser.add_argument("--event-posts-per-s", type=float, default=5.0,
                        help="POST /events requests per second during each level (each carries the engagements "
                             "since the last)")
    parser.add_argument("--probes", type=int, default=50, help="/events freshness probes")
    parser.add_argument("--follow-files", type=int, default=20, help="ingest --follow freshness files")
    parser.add_argument("--ranker")
    parser.add_argument("--retriever", help="retriever artifact (default: <root>/artifacts/retriever)")
    parser.add_argument("--dense-retriever", help="the dense channel's artifact (default: <root>/artifacts/"
                                                  "dense_retriever when it exists)")
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", default=str(RESULTS), help="folder for serve.json and the CDF (short trial runs: "
                                                           "elsewhere, not to replace the record)")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset for a trial run (the record needs them all, and the follow run)")
    parser.add_argument("--run-variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.run_variant:
        return run_variant_here(args.run_variant, Path(args.work))
    variants = args.variants.split(",")
    if unknown := set(variants) - set(VARIANTS):
        parser.error(f"--variants: unknown {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    root = Path(args.root).resolve()
    if not (root / "lake" / "features_item_stats").exists():
        print(f"{root} has no feature tables: run `make demo` first (or pass --root)")
        return 2
    retriever = Path(args.retriever or root / "artifacts" / "retriever")
    if not (retriever / "manifest.json").exists():
        print(f"no retriever artifact at {retriever}: run `make demo` first (or pass --retriever)")
        return 2
    dense = Path(args.dense_retriever) if args.dense_retriever else root / "artifacts" / "dense_retriever"
    if not (dense / "manifest.json").exists():
        if args.dense_retriever:
            print(f"no dense retriever artifact at {dense}")
            return 2
        print(f"no dense retriever at {dense}: every variant serves the generative channel alone", flush=True)
        variants, dense = [v for v in variants if v != "cascade_one_channel"], None
    work = Path(tempfile.mkdtemp(prefix="bench-serve-"))
    cfg = absolute_paths(config.load(None, [f"lake.root={root / 'lake'}"]))
    facts = lake_facts(cfg)
    ranker = args.ranker or ranker_artifact(work / "ranker", cfg, num_users=facts["max_user"],
                                            num_items=facts["items"], num_authors=facts["authors"],
                                            max_hist_len=cfg.training.max_hist_len,
                                            d_model=cfg.training.d_model).folder
    spec = {"root": str(root), "ranker": str(ranker), "retriever": str(retriever), "port": args.port,
            "dense_retriever": str(dense.resolve()) if dense else None,
            "seconds": args.seconds, "event_posts_per_s": args.event_posts_per_s, "probes": args.probes,
            "users": facts["users"], "items": facts["items"]}
    (work / "spec.json").write_text(json.dumps(spec))
    load_before = os.getloadavg()
    api_key = secrets.token_hex(16)
    results, lats = {}, {}
    for variant in variants:
        print(f"== {variant} Serve settings", flush=True)
        results[variant], lats[variant] = variant_subprocess(variant, work, api_key)
    if not set(VARIANTS) - {"cascade_one_channel"} <= set(variants):  # a trial run: no record
        print(json.dumps(results, indent=1))
        shutil.rmtree(work, ignore_errors=True)
        return 0
    print("== landing file -> ingest --follow --push-features -> online store", flush=True)
    try:
        follow = follow_freshness(root, work / "follow", facts["items"], facts["users"], args.follow_files)
    except RuntimeError as err:  # the serving figures stand without it; the record says why it is missing
        follow = {"error": str(err)[-3000:], "files": args.follow_files, "not_visible": args.follow_files,
                  "p50_ms": None, "p99_ms": None}
    print(f"   {follow}", flush=True)
    out = {
        "command": "python -m bench.serve " + " ".join(argv if argv is not None else sys.argv[1:]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"), "machine": machine(),
        "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
        "setup": {"candidates": cfg.serving.num_candidates, "k": 10, "items": facts["items"],
                  "users": len(facts["users"]), "seconds_per_level": args.seconds,
                  "event_posts_per_s": args.event_posts_per_s, "ranker": str(ranker), "retriever": str(retriever),
                  "dense_retriever": spec["dense_retriever"],
                  "tuned_env": TUNED_ENV, "open_loop_fractions": OPEN_LOOP, "overload_fraction": OVERLOAD,
                  "freshness_load_fraction": FRESHNESS_LOAD},
        **summary(results, follow),
        "follow": follow,
        "variants": results,
    }
    results_dir = Path(args.out)
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / "serve.json").write_text(json.dumps(out, indent=1) + "\n")
    plot(lats, results_dir / "serve_latency_cdf.png")
    print(json.dumps({k: v for k, v in out.items() if k not in ("variants", "setup", "follow")}, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
