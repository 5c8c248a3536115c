"""Which parts of the simulator's click logit the observable data can reveal at all (issue 17, "where the gap lives").

    python -m bench.oracle_terms            # 1.7M impressions of the quality benchmark's stream (its seed)

Runs the simulator's world (`ingestion.simulator_world`) directly, so every impression's true click logit, its
terms (LOGIT_TERMS), the users' and items' latent vectors and every click are at hand, and reports over the
stream's second half (the scope `bench.quality` fits the models' logits on):
- the ceiling AUC of the true logit, and without each term: what a model blind to that term could reach at best;
- **trend** (the item's decayed recent / usual click rate): what box-car click counts over fixed windows, as of
  the last hop boundary before the impression (what the feature job can serve), recover of it, per window set: the
  least-squares fit's R2 and the ceiling AUC with the term replaced by its fit;
- **affinity** (the user's long-term taste . the item's vector): what the best history estimate recovers of it,
  the mean TRUE vector of every item the user clicked before the impression (a model must also learn the item
  vectors, so this bounds what any history-based ranker can get), as R2 and the ceiling AUC with the term
  replaced by its fit;
- the item's momentum (trend + hype) as click and impression counts over the default windows show it;
- the ceiling of what the observable data supports: momentum and affinity replaced by those fits (and, as an
  upper bound needing no estimator, with the affinity known exactly).
Writes bench/results/oracle_terms.json.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

import ingestion.simulator_world as world_model
from config.schema import SimulatorConfig
from ingestion.contract import ACTION_INDEX
from ingestion.simulator import MAX_STEP_S, MIN_STEP_S, TARGET_REQUESTS, parse_time_ms
from training.metrics import auc

RESULTS = Path(__file__).parent / "results"
# (hop seconds, windows in seconds): the feature job's default first, then shorter or finer variants.
WINDOW_SETS = [(60, (300, 3600, 86400)), (60, (60, 300, 3600, 86400)), (60, (60, 300, 900, 3600, 86400)),
               (10, (60, 300, 3600, 86400)), (1, (300,)), (1, (60, 300, 900, 3600, 86400))]


def simulate(impressions: int, seed: int) -> tuple[dict[str, np.ndarray], world_model.World]:
    """Per impression: time, user, item, clicked, true logit, terms [n, len(LOGIT_TERMS)]; and the world."""
    cfg = SimulatorConfig(seed=seed)
    world = world_model.World(cfg, np.random.default_rng([cfg.seed, 0]), parse_time_ms(cfg.start) / 1000.0)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("t", "user", "item", "clicked", "logit", "terms")}
    t, shown = 0.0, 0
    while shown < impressions:
        step = np.clip(TARGET_REQUESTS / world.expected_requests_per_s(t), MIN_STEP_S, MAX_STEP_S)
        ev = world.step(t, t + step)
        t += step
        imp = ev["action"] == ACTION_INDEX["impression"]
        p = ev["p_click"][imp].astype(np.float64)
        for key in ("t", "user", "item", "clicked"):
            parts[key].append(ev[key][imp])
        parts["logit"].append(np.log(p / (1 - p)))
        parts["terms"].append(ev["terms"][imp].astype(np.float64))
        shown += int(imp.sum())
    sim = {k: np.concatenate(v) for k, v in parts.items()}
    order = np.argsort(sim["t"], kind="stable")
    return {k: v[order] for k, v in sim.items()}, world


def window_counts(sim: dict[str, np.ndarray], window_s: float, hop_s: float, clicks: bool = True) -> np.ndarray:
    """Each impression's item's clicks (or impressions) in [h - window, h), h = the last hop boundary at or before
    the impression. A click is timed at its impression (the simulator logs it 1-5 s later)."""
    events = sim["clicked"] if clicks else np.ones(len(sim["t"]), bool)
    keys = np.sort(sim["item"][events] * 1e9 + sim["t"][events])
    h = np.floor(sim["t"] / hop_s) * hop_s
    base = sim["item"] * 1e9
    return np.searchsorted(keys, base + h, "left") - np.searchsorted(keys, base + h - window_s, "left")


def history_affinity(sim: dict[str, np.ndarray], item_vec: np.ndarray) -> np.ndarray:
    """Per impression: mean true vector of the items its user clicked at earlier times, dotted with its item's."""
    n = len(sim["t"])
    order = np.lexsort((np.arange(n), sim["user"]))  # by user, then time
    users = sim["user"][order]
    out = np.zeros(n)
    bounds = np.r_[0, np.flatnonzero(users[1:] != users[:-1]) + 1, n]
    for a, b in itertools.pairwise(bounds):
        idx = order[a:b]
        vec = item_vec[sim["item"][idx]]
        clicks = sim["clicked"][idx].astype(np.float64)
        times = sim["t"][idx]
        # earlier = clicks of impressions strictly before this one's time (not the same request's)
        first = np.searchsorted(times, times, "left")
        summed = np.vstack([np.zeros(vec.shape[1]), np.cumsum(vec * clicks[:, None], 0)])[first]
        count = np.r_[0.0, np.cumsum(clicks)][first]
        out[idx] = (summed / np.maximum(count, 1.0)[:, None] * vec).sum(1)
    return out


def fitted(x: np.ndarray, target: np.ndarray) -> tuple[np.ndarray, float]:
    """The least-squares fit of `target` on the columns of `x` (plus an intercept), and its R2."""
    x = np.column_stack([x, np.ones(len(x))])
    coef, *_ = np.linalg.lstsq(x, target, rcond=None)
    fit = x @ coef
    return fit, float(1 - ((target - fit) ** 2).mean() / target.var())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--impressions", type=int, default=1_700_000)
    parser.add_argument("--seed", type=int, default=SimulatorConfig().seed,
                        help="simulator seed (default: the config's, which the quality benchmark's lake uses)")
    args = parser.parse_args(argv)
    sim, world = simulate(args.impressions, args.seed)
    n = len(sim["t"])
    scope = np.arange(n) >= n // 2
    y, logit = sim["clicked"][scope], sim["logit"][scope]
    terms = dict(zip(world_model.LOGIT_TERMS, sim["terms"][scope].T, strict=True))
    out: dict = {"impressions": n, "scope": "second half", "seed": args.seed, "oracle_auc": auc(y, logit),
                 "auc_without": {name: auc(y, logit - term) for name, term in terms.items()}}
    print(f"{n:,} impressions, second half: oracle AUC {out['oracle_auc']:.4f}; without one term: "
          + ", ".join(f"{k} {v:.4f}" for k, v in out["auc_without"].items()))
    out["trend"], trend_fits = [], []
    for hop, windows in WINDOW_SETS:
        x = np.column_stack([np.log1p(window_counts(sim, w, hop)) for w in windows])[scope]
        fit, r2 = fitted(x, terms["trend"])
        trend_fits.append(fit)
        row = {"hop_s": hop, "windows_s": list(windows), "r2": r2,
               "auc_with_fitted_term": auc(y, logit - terms["trend"] + fit)}
        out["trend"].append(row)
        print(f"trend from windowed click counts, hop {hop:>3} s, windows {list(windows)}: R2 {r2:.3f}, "
              f"ceiling AUC with the fitted term {row['auc_with_fitted_term']:.4f}")
    fit, r2 = fitted(history_affinity(sim, world.item_vec)[scope, None], terms["affinity"])
    out["affinity"] = {"estimate": "mean true vector of the user's earlier clicked items . the item's vector",
                       "r2": r2, "auc_with_fitted_term": auc(y, logit - terms["affinity"] + fit)}
    print(f"affinity from the user's click history (true item vectors): R2 {r2:.3f}, ceiling AUC with the fitted "
          f"term {out['affinity']['auc_with_fitted_term']:.4f}")
    # The item's momentum as the stats show it: trend and hype together (a hyped item draws clicks, which the
    # windows count) fitted on click and impression counts over the feature job's default windows.
    hop, windows = WINDOW_SETS[0]
    x = np.column_stack([np.log1p(window_counts(sim, w, hop, clicks)) for w in windows for clicks in (True, False)])
    momentum = terms["trend"] + terms["hype"]
    momentum_fit, r2 = fitted(x[scope], momentum)
    out["momentum"] = {"r2": r2, "auc_with_fitted_term": auc(y, logit - momentum + momentum_fit)}
    print(f"trend + hype from windowed click and impression counts: R2 {r2:.3f}, ceiling AUC with the fitted "
          f"terms {out['momentum']['auc_with_fitted_term']:.4f}")
    # What the observable data can support at best: momentum as the stats show it, with the affinity as the best
    # history estimate shows it, and (an upper bound that needs no estimator) with the affinity known exactly.
    seen = logit - momentum + momentum_fit
    out["observable_ceiling_auc"] = auc(y, seen - terms["affinity"] + fit)
    out["observable_ceiling_auc_affinity_known"] = auc(y, seen)
    print(f"ceiling with the item's momentum as the stats show it and the affinity as the history shows it: "
          f"{out['observable_ceiling_auc']:.4f}; with the affinity known exactly: "
          f"{out['observable_ceiling_auc_affinity_known']:.4f}")
    out.update(command="python -m bench.oracle_terms " + " ".join(argv if argv is not None else sys.argv[1:]),
               date=datetime.now(UTC).isoformat(timespec="seconds"))
    rounded = json.loads(json.dumps(out), parse_float=lambda v: round(float(v), 4))
    (RESULTS / "oracle_terms.json").write_text(json.dumps(rounded, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
