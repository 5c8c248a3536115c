"""`make demo`: the main job end to end on the embedded default, printing what each stage did.

    python -m ray_jobs.demo [--events 200000] [--malformed-rate 0.002] [--keep] [--keep-serving]

Stages so far: simulate live-stream logs (with a few malformed lines) -> ingest them (parsed in the
job's threads, as on one machine) through the Great Expectations gate into Delta -> audit that every
line landed exactly once -> windowed stats and sequence tokens into Delta and Feast (SQLite online
store) -> real-time pushes of new events with their freshness -> point-in-time training samples -> one
streaming pass of GenRank on Ray Train (2 workers, progressive AUC next to the oracle's) -> semantic IDs
and the NEZHA retriever -> Ray Serve: a few /recommend, /rank and /events requests with their timings,
then a clean shutdown (`--keep-serving` leaves it up).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import numpy as np

import config
from ray_jobs.ingest import print_report
from ray_jobs.runtime import init_ray

DEMO_ROOT = Path("data/demo")


def stage(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--malformed-rate", type=float, default=0.002)
    parser.add_argument("--keep", action="store_true", help="keep the previous demo's data (default: start clean)")
    parser.add_argument("--keep-serving", action="store_true", help="leave the served app up until Ctrl-C")
    args = parser.parse_args(argv)
    if not args.keep and DEMO_ROOT.exists():
        shutil.rmtree(DEMO_ROOT)
    cfg = config.load(None, [
        f"lake.root={DEMO_ROOT / 'lake'}", f"ingest.landing_dir={DEMO_ROOT / 'landing'}",
        f"simulator.oracle_dir={DEMO_ROOT / 'oracle'}", f"simulator.events={args.events}",
        f"simulator.malformed_rate={args.malformed_rate}", f"features.feast_dir={DEMO_ROOT / 'feast'}",
        f"features.online_store.path={DEMO_ROOT / 'feast' / 'online.db'}",
        f"training.storage_path={DEMO_ROOT / 'train_runs'}", f"training.artifact_dir={DEMO_ROOT / 'artifacts'}",
        "training.run_name=demo-genrank",
    ])

    t = stage(f"1. simulate {args.events:,} live-stream events into {cfg.ingest.landing_dir}")
    from ingestion.simulator import simulate

    summary = simulate(cfg.simulator, cfg.ingest.landing_dir)
    print(f"   {summary['valid_events']:,} events + {summary['malformed_lines']:,} malformed lines in "
          f"{len(summary['files'])} files; CTR {summary['ctr']:.3f}; {summary['requests']:,} requests "
          f"({time.perf_counter() - t:.1f}s)")

    t = stage("2. ingest: parse (in the job's threads on one machine) -> Great Expectations gate -> Delta "
              "(events + events_quarantine)")
    init_ray(cfg.ray)
    from ingestion.audit import audit_lake
    from ingestion.job import IngestJob

    report = IngestJob(cfg).run_once()
    print_report(report)
    print(f"   ({time.perf_counter() - t:.1f}s)")

    t = stage("3. audit: every landing line is in exactly one table")
    audit = audit_lake(cfg)
    print(f"   lines={audit.lines:,} valid={audit.valid:,} quarantined={audit.quarantined:,} "
          f"lost={audit.lost} duplicated={audit.duplicated} ({time.perf_counter() - t:.1f}s)")
    if not audit.ok or report.failed:
        return 1
    feature_stages(cfg)
    ranker = training_stage(cfg)
    retriever, dense = retriever_stage(cfg)
    t = stage("9. serving: Ray Serve /recommend = retrieval channels (NEZHA, dense, trending) -> features -> "
              "M-FALCON ranking")
    from ray_jobs.serve_demo import serve_and_query

    serve_and_query(cfg, ranker.artifact, retriever, keep_serving=args.keep_serving, dense_dir=dense)
    print(f"   served, queried and shut down ({time.perf_counter() - t:.1f}s)")
    print(f"\nDelta tables under {cfg.lake.root}: events, events_quarantine, features_*, samples_*; "
          f"Feast repo: {cfg.features.feast_dir}/repo")
    return 0


def live_events(updater, count: int) -> tuple[int, list[dict]]:
    """New events just after the lake's newest one: the most active user clicks and watches popular items."""
    users = updater.buckets["user"]
    user = max(users, key=lambda u: int(users[u].sums[:, 1].sum())) if users else 1
    items = sorted(updater.buckets["item"], key=lambda i: -int(updater.buckets["item"][i].sums[:, 0].sum()))[:10] or [1]
    start = (updater.watermark_ms or int(time.time() * 1000)) + 1000
    actions = [("impression", None), ("click", None), ("view", 45.0), ("like", None)]
    events = []
    for i in range(count):
        action, value = actions[i % len(actions)]
        item = items[(i // len(actions)) % len(items)]
        events.append({"event_id": f"live-{i}", "ts": start + 250 * i, "user_id": user, "item_id": item,
                       "author_id": updater.item_author.get(item), "request_id": f"live-r{i // 4}",
                       "action": action, "value": value})
    return user, events


def feature_stages(cfg) -> None:
    """Stages 4-6: the feature job and Feast, real-time pushes, training samples."""
    t = stage("4. features: windowed stats + sequence tokens in Ray tasks -> Delta -> Feast (apply, materialize)")
    from features.job import FeatureJob
    from ray_jobs.features import print_report as print_features

    print_features(FeatureJob(cfg).run())
    print(f"   ({time.perf_counter() - t:.1f}s)")

    t = stage("5. real-time: new events -> online store (sequence append, window counters, expiry)")
    from features.online import OnlineFeatureClient, describe
    from features.realtime import start_from_lake, time_to_visible

    updater = start_from_lake(cfg)
    client = OnlineFeatureClient(cfg, store=updater.store)
    user, events = live_events(updater, count=50)
    freshness = [1000 * time_to_visible(updater, client, event) for event in events]
    p50, p99 = np.percentile(freshness, [50, 99])
    print(f"   {len(events)} live events for user {user}: event in -> visible online p50 {p50:.1f} ms, "
          f"p99 {p99:.1f} ms ({time.perf_counter() - t:.1f}s incl. replaying the lake's last window)")
    items = list(dict.fromkeys(e["item_id"] for e in events))[:5]
    print("   " + describe(client.get(user, items)).replace("\n", "\n   "))

    t = stage("6. training samples: ranking rows (point in time) and retrieval sequences -> Delta")
    from features.samples import SampleBuilder
    from ray_jobs.samples import print_report as print_samples

    print_samples(SampleBuilder(cfg).run(), cfg)
    print(f"   ({time.perf_counter() - t:.1f}s)")


def training_stage(cfg):
    """Stage 7: one streaming pass of GenRank on Ray Train (2 workers), progressive AUC vs the oracle's."""
    t = stage(f"7. training: one streaming pass of {cfg.training.model} on Ray Train, "
              f"{cfg.training.num_workers} workers, progressive validation")
    from ray_jobs.train import print_summary
    from training.oracle import click_logit_terms, oracle_auc_on_samples, oracle_candidates
    from training.ranking import train_ranking
    from training.stream import PredictionLog

    run = train_ranking(cfg, log=lambda line: print("   " + line, flush=True))
    print_summary(run)
    # the ceiling on the rows the run's metrics cover (they start after the base-rate requests)
    first = run.metrics["prior"]["requests"]
    oracle = oracle_auc_on_samples(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"), from_sample=first)
    last = oracle_auc_on_samples(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"),
                                 since_s=run.metrics["last_from_ts"], from_sample=first)
    print(f"   click AUC, whole stream: model {run.metrics['progressive']['click']['auc']:.4f} vs oracle "
          f"{oracle['auc']:.4f} (the simulator's true p_click on {oracle['matched']:,} of the model's "
          f"{run.metrics['candidates']:,} candidates)")
    print(f"   click AUC, last {run.metrics['last_fraction']:.0%}: model {run.metrics['last']['click']['auc']:.4f} "
          f"vs oracle {last['auc']:.4f}")
    # How much of each term of the true click logit the model's scores follow (1 = all of it; BENCHMARKS.md,
    # "Where the gap lives"): a term near 0 is one the model did not learn, or the data do not show.
    joined, _ = oracle_candidates(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"), from_sample=first)
    fit = click_logit_terms(joined, PredictionLog.read(f"{run.run_dir}/predictions", ("click",)))
    print("   its click logit fitted on the true terms: "
          + ", ".join(f"{k} {v:.2f}" for k, v in fit["terms"].items())
          + f"; R2 {fit['r2']:.2f}   ({time.perf_counter() - t:.1f}s)")
    return run


def retriever_stage(cfg) -> tuple[str, str]:
    """Stage 8: the dense retriever, semantic IDs of its item table and the NEZHA generative retriever on the lake's
    user sequences (a short run); returns both artifacts (generative, dense): serving's two model channels."""
    t = stage("8. retrieval: dense retriever -> semantic IDs (RQ-KMeans) -> NEZHA (distilled) on the lake's sequences")
    from training.retrieval.lake_sequences import export_retrieval_sequences
    from training.retrieval.pipeline import RunOptions, run, save

    path = export_retrieval_sequences(cfg, DEMO_ROOT / "retrieval" / "lake.txt")
    # A short run of the configured recipe: narrower, fewer epochs, time-boxed (a few minutes on 2 cores).
    r = cfg.retrieval
    retrieval = r.model_copy(update={
        "dense": r.dense.model_copy(update={"d_model": 32, "max_epochs": 6, "max_minutes": 1.0}),
        "generative": r.generative.model_copy(update={"d_model": 32, "codebooks": [32, 32, 32], "max_epochs": 4,
                                                      "max_minutes": 1.5, "eval_users": 500})})
    out = run(retrieval, RunOptions(dataset=str(path), test_users=500))
    folder, dense = DEMO_ROOT / "artifacts" / "retriever", DEMO_ROOT / "artifacts" / "dense_retriever"
    manifest = save(folder, out, dense_folder=dense)
    test = out["dense_result"]["test"]
    print(f"   dense retriever ({r.dense.model}): test HR@10 {test['hr@10']:.4f} NDCG@10 {test['ndcg@10']:.4f}; "
          f"artifact {dense}")
    sid = out["sid"].stats
    print(f"   {len(out['data'].items):,} users, {out['data'].num_items:,} items; semantic IDs: "
          f"{sid.get('levels')} levels {sid.get('radices')}, every item's tuple unique: {sid.get('unique')}")
    for decoder, m in out["result"].test.items():
        print(f"   test ({decoder}, leave-one-out, full catalogue): R@10 {m['r10']:.4f} N@10 {m['n10']:.4f} "
              f"invalid returned {m['returned_invalid']}")
    print(f"   artifact {folder} (version {manifest.version}) ({time.perf_counter() - t:.1f}s)")
    return str(folder), str(dense)


if __name__ == "__main__":
    sys.exit(main())
