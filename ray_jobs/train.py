"""Stage entrypoint: one streaming pass of a ranking model over `samples_ranking` on Ray Train.

    python -m ray_jobs.train --config embedded                           # after python -m ray_jobs.samples
    python -m ray_jobs.train --set training.model=zenith --set training.num_workers=2
    python -m ray_jobs.train --set training.use_gpu=true --set training.cpus_per_worker=4
    ray job submit --working-dir . -- python -m ray_jobs.train --config cluster

Prints a line per logged chunk (worker 0's throughput, loss and the chunk's progressive AUC), then
the run's progressive metrics per task (whole stream and its last `training.eval_last_fraction`)
and the artifact folder serving loads.
"""

from __future__ import annotations

import argparse
import logging
import sys

import config
from ray_jobs.runtime import init_ray


def print_summary(run) -> None:
    m = run.metrics
    print(f"\n{m['model']}: {m['requests']:,} requests, {m['candidates']:,} candidates scored before training, "
          f"{m['steps']} steps, {m['restarts']} restart(s), {run.seconds:.0f}s")
    prior = m.get("prior") or {}
    if prior.get("rates"):
        rates = ", ".join(f"{task} {rate:.4f}" for task, rate in prior["rates"].items())
        print(f"  task outputs started at the label rates of the first {prior['requests']:,} requests ({rates}); "
              "the metrics below cover the requests after them")
    for scope, title in (("progressive", "whole stream"), ("last", f"last {m['last_fraction']:.0%} of time")):
        for task, v in m[scope].items():
            print(f"  {title:>18} {task:>10}: AUC {_f(v.get('auc'))}  GAUC {_f(v.get('gauc'))}  "
                  f"logloss {_f(v.get('logloss'))}  NE {_f(v.get('ne'))}  calibration {_f(v.get('calibration'))}  "
                  f"({v['positives']:,}/{v['count']:,} positive)")
    print(f"artifact {run.artifact} (version {run.version})")


def _f(v) -> str:
    return "  n/a " if v is None else f"{v:.4f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    config.add_config_args(parser)
    parser.add_argument("--artifact", default=None,
                        help="artifact folder to write (default: <training.artifact_dir>/<run name>)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cfg = config.from_args(args)
    init_ray(cfg.ray)
    from training.ranking import train_ranking

    print_summary(train_ranking(cfg, artifact=args.artifact))
    return 0


if __name__ == "__main__":
    sys.exit(main())
