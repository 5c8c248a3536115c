"""Stage entrypoint: build the training samples (`samples_ranking`, `samples_retrieval`) from the lake.

    python -m ray_jobs.samples --config embedded          # after python -m ray_jobs.features
    python -m ray_jobs.samples --set samples.kind=ratings --set samples.group_window_s=60
    ray job submit --working-dir . -- python -m ray_jobs.samples --config cluster
"""

from __future__ import annotations

import argparse
import logging
import sys

import config
from ray_jobs.runtime import init_ray


def print_report(report, cfg) -> None:
    print(f"samples ({report.kind}; tasks {', '.join(report.tasks)}): {report.requests:,} ranking rows with "
          f"{report.candidates:,} candidates -> {cfg.lake.table('samples_ranking')}")
    print(f"  {report.users:,} retrieval sequences -> {cfg.lake.table('samples_retrieval')}"
          f"  ({sum(report.seconds.values()):.1f}s)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config.from_args(args)
    logging.getLogger("features").setLevel(logging.INFO)  # its `phase` lines (bench.crash reads them)
    init_ray(cfg.ray)
    logging.getLogger("features").info("phase started")
    from features.samples import SampleBuilder

    print_report(SampleBuilder(cfg).run(), cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
