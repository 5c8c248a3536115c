"""Stage entrypoint: ingest landing files into the Delta lake.

    python -m ray_jobs.ingest --config embedded --once
    python -m ray_jobs.ingest --follow --set ingest.poll_interval_s=2
    python -m ray_jobs.ingest --follow --push-features     # also update the online features per batch
    ray job submit --working-dir . -- python -m ray_jobs.ingest --config cluster --once

Exit status 0 when every batch passed its expectations, 2 when a batch was quarantined whole by
a failed expectation (its name is printed), 1 on other errors.
"""

from __future__ import annotations

import argparse
import logging
import sys

import config
from ray_jobs.runtime import init_ray


def print_report(report) -> None:
    totals = report.totals()
    print(f"ingest: {len(report.batches)} batches, {totals['files']} files, {totals['lines']} lines -> "
          f"{totals['valid']} valid, {totals['quarantined']} quarantined")
    reasons: dict[str, int] = {}
    for batch in report.batches:
        for reason, count in batch.reasons.items():
            reasons[reason] = reasons.get(reason, 0) + count
    for reason, count in sorted(reasons.items(), key=lambda kv: -kv[1]):
        print(f"  quarantine reason {reason!r}: {count}")
    if report.docs_path:
        print(f"  Great Expectations Data Docs: {report.docs_path}")
    for name in report.failed:
        print(f"  FAILED expectation: {name}", file=sys.stderr)


def _feature_pusher(cfg):
    """An on_batch callback that sends each committed batch's events through the real-time feature updater."""
    from features.realtime import events_of_batch, start_from_lake

    updater = start_from_lake(cfg)

    def push(batch) -> None:
        if batch.valid:
            # Read back from the lake: the driver never holds a batch's rows (the parse tasks write them).
            rows = events_of_batch(cfg, batch.batch_no)
            report = updater.update(rows)
            print(f"  features: pushed batch {batch.batch_no} ({report.events} events, {report.seconds:.2f}s)")

    return push


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--once", action="store_true", help="ingest all new files, then exit (default)")
    mode.add_argument("--follow", action="store_true", help="keep polling the landing folder")
    parser.add_argument("--max-seconds", type=float, default=None, help="stop --follow after this long")
    parser.add_argument("--push-features", action="store_true",
                        help="with --follow: push each batch's events to the online feature store")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = config.from_args(args)
    from ingestion.job import IngestJob  # after the arguments: importing GX is slow, keep --help fast
    from ingestion.staging import parse_on

    if parse_on(cfg) == "ray":  # on one machine the job parses in its own threads and needs no Ray
        init_ray(cfg.ray)
    logging.getLogger("ingestion").info("phase started")
    job = IngestJob(cfg)
    report = job.follow(args.max_seconds, on_batch=_feature_pusher(cfg) if args.push_features else None) \
        if args.follow else job.run_once()
    # What follows is no work: the report, then Ray's shutdown at exit (crash trials tell it from the docs phase).
    logging.getLogger("ingestion").info("phase shutdown")
    print_report(report)
    return 2 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
