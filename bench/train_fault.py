"""A training worker killed mid-pass: does the resumed run end where an uninterrupted one does?

    python -m bench.train_fault --dataset simulator       # the lake bench.quality prepared
    python -m bench.train_fault --lake data/demo/lake      # any lake with samples_ranking

Runs `python -m ray_jobs.train` twice with the same seed and config: once undisturbed, once with
rank 1's process SIGKILLed after `--kill-after` steps (past the first checkpoint). Ray Train restarts
the worker group from the latest checkpoint; the stream position in it makes the workers skip what was
already trained. Records both runs' progressive AUC (whole stream and last 10%), the difference
(goal: within 0.002), the restarts and the wall times in bench/results/quality.json under "fault".
The test suite's fault test (tests/training/test_ranking.py) uses `train_and_kill` on a small lake.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _steps(progress: Path) -> list[int]:
    if not progress.exists():
        return []
    return [int(line.split()[1]) for line in progress.read_text().splitlines() if line.startswith("step ")]


def _registered_step(run_dir: Path) -> int | None:
    """The step of the latest checkpoint Ray Train has registered (its snapshot file), if any."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
        return int(snapshot["latest_checkpoint_result"]["metrics"]["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def train_and_kill(overrides: list[str], run_dir: Path, artifact: Path, kill_after_step: int | None,
                   timeout_s: float = 900) -> dict:
    """Run the trainer in a subprocess; kill rank 1 once worker 0 logged `kill_after_step` (None: never) and
    a checkpoint is registered (a kill before that restarts from scratch, which is correct but tests less).
    Returns {"returncode", "killed_at", "resumable_from", "output", "seconds"}; needs training.log_every_steps=1."""
    cmd = [sys.executable, "-m", "ray_jobs.train", "--artifact", str(artifact)]
    for override in overrides:
        cmd += ["--set", override]
    t = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    killed_at = resumable_from = None
    deadline = time.time() + timeout_s
    try:
        while kill_after_step is not None and killed_at is None and time.time() < deadline and proc.poll() is None:
            steps = _steps(run_dir / "progress.log")
            registered = _registered_step(run_dir)
            if steps and registered and steps[-1] >= max(kill_after_step, registered + 1):
                os.kill(int((run_dir / "workers" / "rank-1.pid").read_text()), signal.SIGKILL)
                killed_at, resumable_from = steps[-1], registered
            time.sleep(0.2)
        output, _ = proc.communicate(timeout=max(30.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
    return {"returncode": proc.returncode, "killed_at": killed_at, "resumable_from": resumable_from, "output": output,
            "seconds": round(time.perf_counter() - t, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="simulator", help="a lake prepared by bench.quality")
    parser.add_argument("--lake", default=None, help="a lake folder (overrides --dataset)")
    parser.add_argument("--model", default="dlrm")
    parser.add_argument("--kill-after", type=int, default=60, help="kill rank 1 after this step")
    parser.add_argument("--every", type=int, default=25, help="checkpoint every N steps")
    parser.add_argument("--set", action="append", default=[], help="more config overrides")
    args = parser.parse_args(argv)
    lake = Path(args.lake) if args.lake else Path("data/bench/quality") / args.dataset / "lake"
    out = Path("data/bench/fault") / datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    base = [f"lake.root={lake}", f"training.model={args.model}", f"training.storage_path={out / 'runs'}",
            f"training.checkpoint_every_steps={args.every}", "training.log_every_steps=1", *args.set]
    runs = {}
    for name, kill in (("uninterrupted", None), ("killed", args.kill_after)):
        res = train_and_kill([*base, f"training.run_name={name}"], out / "runs" / name, out / name, kill)
        if res["returncode"] != 0:
            print(res["output"][-3000:])
            return 1
        metrics = json.loads((out / name / "metrics.json").read_text())
        task = next(iter(metrics["progressive"]))
        runs[name] = {"auc": metrics["progressive"][task]["auc"], "last10_auc": metrics["last"][task]["auc"],
                      "restarts": metrics["restarts"], "killed_at_step": res["killed_at"], "seconds": res["seconds"],
                      "task": task}
        print(f"{name:>13}: AUC({task}) {runs[name]['auc']:.4f} last 10% {runs[name]['last10_auc']:.4f} "
              f"restarts {runs[name]['restarts']} ({res['seconds']:.0f}s)", flush=True)
    diff = abs(runs["killed"]["auc"] - runs["uninterrupted"]["auc"])
    print(f"|AUC difference| = {diff:.4f} (goal <= 0.002)")
    path = Path("bench/results/quality.json")
    results = json.loads(path.read_text()) if path.exists() else {}
    results["fault"] = {**runs, "auc_abs_diff": round(diff, 5), "lake": str(lake), "model": args.model,
                        "command": "python -m bench.train_fault " + " ".join(argv or sys.argv[1:]),
                        "date": datetime.now(UTC).isoformat(timespec="seconds")}
    path.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
