"""The whole pipeline in one entrypoint: each stage's `main` in order, then a summary.

    python -m ray_jobs.pipeline --config embedded
    python -m ray_jobs.pipeline --simulate 50000 --stages ingest,features,samples,train
    ray job submit --working-dir . -- python -m ray_jobs.pipeline --config cluster

Stages (in this order; `--stages` picks a subset): ingest, features, samples, train, train_retriever.
`--simulate N` first writes N synthetic live-stream events into the landing folder (demos and tests).
A stage that fails stops the pipeline (the ingest stage fails when a Great Expectations suite fails, so
bad data never reaches training). Serving is not a batch stage: `python -m ray_jobs.deploy` locally, the
RayService on Kubernetes (k8s/). The same `--config` / `--set` go to every stage.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time

import config

STAGES = ("ingest", "features", "samples", "train", "train_retriever")
STAGE_ARGS = {"ingest": ["--once"], "train_retriever": ["--source", "lake"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--stages", type=lambda s: s.split(","), default=list(STAGES),
                        help=f"comma-separated subset of {','.join(STAGES)}")
    parser.add_argument("--simulate", type=int, default=None, metavar="N",
                        help="first simulate N live-stream events into ingest.landing_dir")
    args = parser.parse_args(argv)
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    cfg = config.from_args(args)  # fail on a bad config before any stage starts
    common = (["--config", args.config] if args.config else []) + [a for o in args.overrides for a in ("--set", o)]
    summary: list[tuple[str, int, float]] = []
    if args.simulate:
        from ingestion.simulator import simulate

        t = time.perf_counter()
        sim = cfg.simulator.model_copy(update={"events": args.simulate})
        report = simulate(sim, cfg.ingest.landing_dir, fsync=False)
        print(f"simulated {report['valid_events']:,} events into {cfg.ingest.landing_dir}", flush=True)
        summary.append(("simulate", 0, time.perf_counter() - t))
    for stage in [s for s in STAGES if s in args.stages]:
        print(f"\n== pipeline stage: {stage}", flush=True)
        t = time.perf_counter()
        code = importlib.import_module(f"ray_jobs.{stage}").main(common + STAGE_ARGS.get(stage, []))
        summary.append((stage, code, time.perf_counter() - t))
        if code:
            break
    print("\n== pipeline summary")
    for stage, code, seconds in summary:
        print(f"   {stage:<16} {'ok' if code == 0 else f'FAILED (exit {code})':<16} {seconds:7.1f}s")
    failed = [s for s, code, _ in summary if code]
    skipped = [s for s in STAGES if s in args.stages and s not in {name for name, _, _ in summary}]
    if skipped:
        print(f"   not run after the failure: {', '.join(skipped)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
