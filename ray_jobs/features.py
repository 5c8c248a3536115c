"""Stage entrypoint: compute windowed stats and sequence snapshots from the Delta `events` table, load Feast.

    python -m ray_jobs.features --config embedded
    python -m ray_jobs.features --set features.windows_s=[86400,604800,2592000] --set features.hop_s=3600
    ray job submit --working-dir . -- python -m ray_jobs.features --config cluster

Incremental: a re-run computes only what new Delta commits changed. Prints what it wrote and, with
--show-user, that user's online features.
"""

from __future__ import annotations

import argparse
import logging
import sys

import config
from ray_jobs.runtime import init_ray


def print_report(report) -> None:
    if report.noop:
        print(f"features: nothing new in events (version {report.events_version})")
        return
    print(f"features: {report.events_read:,} events read (events version {report.events_version})")
    for name, rows in report.rows.items():
        print(f"  {name:<14} {rows:>10,} rows  ({report.seconds.get(name, 0):.1f}s)")
    if report.stats_range:
        print(f"  stats boundaries {report.stats_range[0]:%Y-%m-%d %H:%M} .. {report.stats_range[1]:%Y-%m-%d %H:%M}")
    if "materialize" in report.seconds:
        print(f"  feast apply + materialize into the online store ({report.seconds['materialize']:.1f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--no-materialize", action="store_true", help="write the offline tables only")
    parser.add_argument("--show-user", type=int, default=None, help="print this user's online features after")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config.from_args(args)
    logging.getLogger("features").setLevel(logging.INFO)  # its `phase` lines (bench.crash reads them)
    init_ray(cfg.ray)
    logging.getLogger("features").info("phase started")
    from features.job import FeatureJob

    print_report(FeatureJob(cfg).run(materialize=not args.no_materialize))
    if args.show_user is not None:
        from features.online import OnlineFeatureClient, describe

        print(describe(OnlineFeatureClient(cfg).get(args.show_user, [])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
