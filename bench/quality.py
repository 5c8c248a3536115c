"""Ranking quality of one streaming pass: dlrm vs hstu vs genrank vs zenith vs zenith++ on the same rows.

    python -m bench.quality --dataset ml-1m              # MovieLens like/love, users 1-2999 (../shared)
    python -m bench.quality --dataset ml-100k
    python -m bench.quality --dataset simulator --events 2000000   # vs the oracle AUC
    python -m bench.quality --dataset all

Per dataset: landing files (dataset adapter or simulator) -> ingestion -> features -> samples (kept
under data/bench/quality/<dataset>, rebuilt only when missing) -> one `train_ranking` run per model
with the same config, seed and data order (progressive validation: each chunk scored before it is
trained on). Prints and writes, to bench/results/quality.json, the headline task's AUC / GAUC /
logloss over the whole stream and over the last 10% of time, the simulator's oracle AUC on the same
rows, ML-1M's HSTU-vs-SASRec retrieval figure (bench/results/quality_retrieval.json), Zenith's
token similarity per layer vs the shared-weight variant, and a plot of progressive AUC over time per
model (bench/results/quality_auc_<dataset>.png).

`--seeds 0,1,2` trains each model once per seed (`training.seed`: initial weights and dropout; the data and
their order are the same). A model's figures are then the means over its seeds, the whole-stream AUC, GAUC and
last-10% AUC with a 95% t-interval (`*_ci95`, none for one seed), every seed's own figures under `seeds`, and
each model's AUC minus DLRM's paired by seed (`<model>_minus_dlrm_auc`, with its interval).

A dataset's record merges the figures of models (and seeds) trained in an earlier invocation only when that run
saw the same data (events, requests, candidates, the samples' contract) and the same training config (all of
`training` but the model, the seed and where runs are kept); otherwise it drops them and says which keys differ.
The oracle's AUC is stored with the candidates it matched, on the rows the models are measured on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import config
from ray_jobs.runtime import init_ray
from training.ranking_models import CONTENDERS, config_keys_not_read_by

RESULTS = Path("bench/results")
ROOT = Path("data/bench/quality")
MODELS = CONTENDERS
# Where a run keeps its files, and which model it is: not part of what makes two runs comparable.
RUN_KEYS = ("model", "seed", "run_name", "storage_path", "artifact_dir")
MEAN_KEYS = ("auc", "gauc", "logloss", "ne", "calibration", "last10_auc", "last10_gauc", "last10_logloss", "seconds",
             "requests_per_s")
INTERVAL_KEYS = ("auc", "gauc", "last10_auc")
HEADLINE = {"ml-1m": "like", "ml-100k": "like", "simulator": "click"}


def dataset_config(name: str, events: int, overrides: list[str]):
    root = ROOT / name
    base = [f"lake.root={root / 'lake'}", f"ingest.landing_dir={root / 'landing'}",
            f"features.feast_dir={root / 'feast'}", f"features.online_store.path={root / 'feast' / 'online.db'}",
            f"training.storage_path={root / 'runs'}", f"training.artifact_dir={root / 'artifacts'}"]
    if name == "simulator":
        return config.load(None, [*base, f"simulator.events={events}", f"simulator.oracle_dir={root / 'oracle'}",
                                  *overrides])
    return config.load("movielens", [*base, *overrides])


def prepare(name: str, cfg) -> dict:
    """Landing -> lake -> features -> samples, unless a previous run left complete samples (rebuilt alone when
    they predate the ranking contract in their commit metadata)."""
    marker = ROOT / name / "prepared.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if "contract" not in info:
            from features.samples import SampleBuilder

            print(f"{name}: samples predate the ranking contract; rebuilding them", flush=True)
            info["contract"] = _contract(SampleBuilder(cfg).run(), cfg)
            marker.write_text(json.dumps(info))
        return info
    shutil.rmtree(ROOT / name, ignore_errors=True)
    t = time.perf_counter()
    if name == "simulator":
        from ingestion.simulator import simulate

        simulate(cfg.simulator, cfg.ingest.landing_dir, fsync=False)
    else:
        from ingestion.datasets import convert, open_dataset

        convert(open_dataset(name, cfg.datasets.root), cfg.ingest.landing_dir, ROOT / name / "meta")
    from features.job import FeatureJob
    from features.samples import SampleBuilder
    from ingestion.job import IngestJob

    ingest = IngestJob(cfg).run_once()
    FeatureJob(cfg).run(materialize=False)
    samples = SampleBuilder(cfg).run()
    info = {"events": ingest.totals()["valid"], "quarantined": ingest.totals()["quarantined"],
            "failed_expectations": ingest.failed, "requests": samples.requests,
            "candidates": samples.candidates, "tasks": list(samples.tasks), "contract": _contract(samples, cfg),
            "prepare_s": round(time.perf_counter() - t, 1)}
    marker.write_text(json.dumps(info))
    return info


def _contract(report, cfg) -> dict:
    from training.stream import SampleStream

    contract = SampleStream.open(cfg.lake.table("samples_ranking"), cfg.lake.storage_options).contract
    return {**contract.to_metadata(), "requests": report.requests, "candidates": report.candidates}


def data_identity(info: dict) -> dict:
    """What the models of a dataset record were measured on."""
    return {k: info.get(k) for k in ("events", "quarantined", "requests", "candidates", "contract")}


def comparable_config(training) -> dict:
    return {k: v for k, v in training.model_dump().items() if k not in RUN_KEYS}


def differences(earlier: dict, now: dict, prefix: str = "") -> list[str]:
    """Keys whose values differ between two records, dotted, with both values."""
    out = []
    for key in sorted(set(earlier) | set(now)):
        a, b = earlier.get(key), now.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({_short(a)} then, {_short(b)} now)")
    return out


def _short(value, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[:width - 3] + "..."


def mergeable(earlier: dict, data: dict, training: dict) -> dict:
    """The models of an earlier record measured on `data` with `training` (the keys each model reads); says why the
    others are dropped."""
    if not any(kind in earlier for kind in MODELS):
        return {}
    why = differences(earlier.get("data") or {}, data)
    if why:
        print(f"   not merging the earlier record's models: its data differ in {'; '.join(why)}", flush=True)
        return {}
    kept = {}
    for kind in MODELS:
        if kind not in earlier:
            continue
        unread = config_keys_not_read_by(kind)
        why = differences({k: v for k, v in (earlier[kind].get("config") or {}).items() if k not in unread},
                          {k: v for k, v in training.items() if k not in unread})
        if why:
            print(f"   not merging the earlier {kind}: its training config differs in {'; '.join(why)}", flush=True)
        else:
            kept[kind] = earlier[kind]
    return kept


def interval95(values: list[float]) -> list[float] | None:
    """[low, high] of the mean's 95% t-interval, or None for fewer than two values.

    >>> interval95([0.80, 0.81, 0.82])
    [0.7852, 0.8348]
    """
    if len(values) < 2:
        return None
    from scipy import stats

    mean, n = sum(values) / len(values), len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = float(stats.t.ppf(0.975, n - 1)) * sd / n ** 0.5
    return [round(mean - half, 4), round(mean + half, 4)]


def summarise_seeds(per_seed: dict[str, dict]) -> dict:
    """A model's record from its runs, one per seed: means, intervals, the per-task means, the mean AUC over time."""
    runs = [per_seed[k] for k in sorted(per_seed, key=int)]
    out: dict = {"seeds": per_seed, "n_seeds": len(runs)}
    for key in MEAN_KEYS:
        out[key] = round(sum(r[key] for r in runs) / len(runs), 4)
    for key in INTERVAL_KEYS:
        out[f"{key}_ci95"] = interval95([r[key] for r in runs])
    out["tasks"] = {task: {k: round(sum(r["tasks"][task][k] for r in runs) / len(runs), 4) for k in figures}
                    for task, figures in runs[0]["tasks"].items()}
    out["auc_over_time"] = [{**p, "auc": round(sum(r["auc_over_time"][i]["auc"] for r in runs) / len(runs), 4)}
                            for i, p in enumerate(runs[0]["auc_over_time"])]
    out["candidates"], out["prior"], out["config"] = runs[0]["candidates"], runs[0]["prior"], runs[0]["config"]
    if all("click_logit_terms" in r for r in runs):
        out["click_logit_terms"] = {term: round(sum(r["click_logit_terms"]["terms"][term] for r in runs) / len(runs), 3)
                                    for term in runs[0]["click_logit_terms"]["terms"]}
    return out


def paired_difference(model: dict, baseline: dict) -> dict:
    """model AUC - baseline AUC over the seeds both ran: mean and 95% interval of the per-seed differences."""
    common = sorted(set(model["seeds"]) & set(baseline["seeds"]), key=int)
    diffs = [model["seeds"][s]["auc"] - baseline["seeds"][s]["auc"] for s in common]
    return {"mean": round(sum(diffs) / len(diffs), 4) if diffs else None, "ci95": interval95(diffs),
            "seeds": [int(s) for s in common]}


def token_similarity_rows(cfg, artifacts: dict[str, str], rows: int = 512) -> dict[str, list[float]]:
    """Zenith's mean pairwise token cosine per layer, on the stream's last `rows` requests."""
    import pyarrow.compute as pc
    from deltalake import DeltaTable

    from models.zenith import token_similarity
    from training.artifact import load_artifact
    from training.ranking_batch import RankingFeatures, encode

    table = DeltaTable(cfg.lake.table("samples_ranking")).to_pyarrow_table()
    table = table.filter(pc.greater_equal(table["sample_no"], table.num_rows - rows))
    out = {}
    for kind, folder in artifacts.items():
        model, manifest = load_artifact(folder)
        model.eval()
        feats = RankingFeatures.from_dict(manifest.metadata["ranking_features"])
        out[kind] = [round(v, 4) for v in token_similarity(model, encode(table, feats))]
    return out


def plot(name: str, series: dict[str, list[dict]], task: str, oracle: list[dict] | None,
         oracle_blind: list[dict] | None = None) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, points in series.items():
        ax.plot([datetime.fromtimestamp(p["ts"], UTC) for p in points], [p["auc"] for p in points], label=kind)
    if oracle:
        ax.plot([datetime.fromtimestamp(p["ts"], UTC) for p in oracle], [p["auc"] for p in oracle],
                color="black", linestyle="--", label="oracle")
    if oracle_blind:
        ax.plot([datetime.fromtimestamp(p["ts"], UTC) for p in oracle_blind], [p["auc"] for p in oracle_blind],
                color="grey", linestyle=":", label="oracle blind to hype")
    ax.set_title(f"{name}: progressive AUC ({task}) per 5% of the stream")
    ax.set_ylabel("AUC")
    ax.legend()
    fig.autofmt_xdate()
    path = RESULTS / f"quality_auc_{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return str(path)


def run_dataset(name: str, args) -> dict:
    from training.oracle import click_logit_terms, oracle_auc_on_samples, oracle_candidates
    from training.ranking import train_ranking
    from training.stream import PredictionLog

    cfg = dataset_config(name, args.events, args.set)
    info = prepare(name, cfg)
    task = HEADLINE[name]
    print(f"\n== {name}: {info['requests']:,} requests, {info['candidates']:,} candidates "
          f"(prepared in {info['prepare_s']}s)", flush=True)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        raise SystemExit(f"--models: unknown {unknown}; choose from {list(MODELS)}")
    data, training = data_identity(info), comparable_config(cfg.training)
    out: dict = {"requests": info["requests"], "candidates": info["candidates"], "task": task, "data": data}
    # Models of an earlier run on the same data and config keep their figures, and a model run again keeps the
    # seeds this run does not train.
    for kind, figures in mergeable(_saved(name), data, training).items():
        rerun = args.seeds if kind in args.models else []
        kept = {seed: r for seed, r in figures.get("seeds", {}).items() if int(seed) not in rerun}
        if kept:
            out[kind] = summarise_seeds(kept)
    artifacts = {}
    # What each model learned of each click-logit term, fitted over the stream's second half (after most learning).
    terms_scope = (oracle_candidates(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"),
                                     from_sample=info["requests"] // 2)[0] if name == "simulator" else None)
    kinds = list(args.models) + (["zenith-shared"] if "zenith" in args.models and not args.skip_similarity else [])
    for kind in kinds:
        per_seed = dict(out[kind]["seeds"]) if kind in out else {}
        for seed in args.seeds if kind != "zenith-shared" else args.seeds[:1]:
            run_cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={
                "model": kind, "seed": seed,
                "run_name": f"{name}-{kind.replace('+', 'p')}-s{seed}-{datetime.now(UTC):%H%M%S}"})})
            run = train_ranking(run_cfg, log=lambda line: None)
            m = run.metrics
            whole, last = m["progressive"][task], m["last"][task]
            artifacts[kind] = run.artifact
            if kind == "zenith-shared":
                continue  # trained for the token-similarity comparison only
            per_seed[str(seed)] = {
                "auc": whole["auc"], "gauc": whole["gauc"], "logloss": whole["logloss"], "ne": whole["ne"],
                "calibration": whole["calibration"], "last10_auc": last["auc"], "last10_gauc": last["gauc"],
                "last10_logloss": last["logloss"], "candidates": m["candidates"], "prior": m["prior"],
                "seconds": run.seconds, "requests_per_s": round(m["requests"] / run.seconds, 1),
                "tasks": {t: {k: v[k] for k in ("auc", "gauc", "logloss", "ne", "calibration")}
                          for t, v in m["progressive"].items()},
                "auc_over_time": m["auc_over_time"], "config": training}
            if terms_scope is not None:
                fit = click_logit_terms(terms_scope, PredictionLog.read(f"{run.run_dir}/predictions", (task,)))
                per_seed[str(seed)]["click_logit_terms"] = fit
                shares = ", ".join(f"{k} {v:.2f}" for k, v in fit["terms"].items())
                print(f"{kind:>9} seed {seed}: second half AUC {fit['auc']:.4f} (oracle {fit['oracle_auc']:.4f}); "
                      f"its click logit on the true terms: {shares}; R2 {fit['r2']:.2f}", flush=True)
            out[kind] = summarise_seeds(per_seed)
            _save(name, out)  # a model's figures survive a later model's failure or a stopped run
            print(f"{kind:>9} seed {seed}: AUC {whole['auc']:.4f} GAUC {whole['gauc']:.4f} logloss "
                  f"{whole['logloss']:.4f} | last 10%: AUC {last['auc']:.4f} GAUC {last['gauc']:.4f} | "
                  f"{run.seconds:.0f}s", flush=True)
    oracle, oracle_series = None, None
    if name == "simulator":
        ceiling = oracle_auc_on_samples(cfg.simulator.oracle_dir, cfg.lake.table("samples_ranking"),
                                        from_sample=cfg.training.prior_requests)
        oracle, oracle_series = ceiling["auc"], ceiling["auc_over_time"]
        out["oracle_auc"], out["oracle_auc_over_time"] = oracle, oracle_series
        out["oracle_matched"], out["oracle_candidates"] = ceiling["matched"], ceiling["candidates"]
        if "auc_without" in ceiling:  # the ceiling of a model blind to one term of the click logit, per term
            out["oracle_auc_without"] = ceiling["auc_without"]
            blind = ", ".join(f"{k} {v:.4f}" for k, v in ceiling["auc_without"].items())
            print(f"   oracle AUC without one term: {blind}")
        if "auc_without_hype" in ceiling:
            out["oracle_auc_without_hype"] = ceiling["auc_without_hype"]
            out["oracle_auc_over_time_without_hype"] = ceiling["auc_over_time_without_hype"]
        measured = {out[k]["candidates"] for k in MODELS if k in out}
        if measured != {ceiling["matched"]}:
            print(f"   WARNING: the oracle matched {ceiling['matched']:,} candidates, the models were measured on "
                  f"{sorted(measured)}: the gap below compares different rows", flush=True)
        best = max(v["auc"] for k, v in out.items() if isinstance(v, dict) and "auc" in v and k in MODELS)
        out["best_gap_to_oracle"] = round(oracle - best, 4)
        print(f"   oracle AUC {oracle:.4f}; best model {best:.4f} (gap {oracle - best:.4f}; goal <= 0.030)")
        if "auc_without_hype" in ceiling:
            print(f"   oracle blind to the items' hidden hype: AUC {ceiling['auc_without_hype']:.4f}")
    if "dlrm" in out:
        for kind in MODELS:
            if kind in out and kind != "dlrm":
                out[f"{kind}_minus_dlrm_auc"] = paired_difference(out[kind], out["dlrm"])
    if "zenith" in artifacts and "zenith-shared" in artifacts:
        out["token_similarity"] = token_similarity_rows(cfg, {k: artifacts[k] for k in ("zenith", "zenith-shared")})
        print(f"   token similarity per layer: {out['token_similarity']}")
    series = {k: v["auc_over_time"] for k, v in out.items() if k in MODELS and "auc_over_time" in v}
    out["plot"] = plot(name, series, task, oracle_series, out.get("oracle_auc_over_time_without_hype"))
    return out


def _saved(name: str) -> dict:
    path = RESULTS / "quality.json"
    return (json.loads(path.read_text()) if path.exists() else {}).get(name, {})


def _save(name: str, figures: dict, **top) -> None:
    path = RESULTS / "quality.json"
    results = json.loads(path.read_text()) if path.exists() else {}  # re-read: other datasets' runs
    results[name] = figures
    results.update(top)
    path.write_text(json.dumps(results, indent=1) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", choices=[*HEADLINE, "all"], default="ml-1m")
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS))
    parser.add_argument("--events", type=int, default=2_000_000, help="simulator events")
    parser.add_argument("--set", action="append", default=[], help="config override for every run")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0],
                        help="training.seed of each run, comma-separated (figures are the means, with 95%% intervals)")
    parser.add_argument("--skip-similarity", action="store_true", help="do not train the shared-weight Zenith")
    parser.add_argument("--prepare-only", action="store_true", help="build the lakes and samples, train nothing")
    args = parser.parse_args(argv)
    names = list(HEADLINE) if args.dataset == "all" else [args.dataset]
    init_ray(config.load().ray)
    for name in names:
        if args.prepare_only:
            print(name, prepare(name, dataset_config(name, args.events, args.set)), flush=True)
            continue
        figures = run_dataset(name, args)
        top = {}
        retrieval = RESULTS / "quality_retrieval.json"
        if name == "ml-1m" and retrieval.exists():
            top["hstu_vs_sasrec_hr10_rel"] = json.loads(retrieval.read_text()).get("hstu_vs_sasrec_hr10_rel")
        figures.update(command="python -m bench.quality " + " ".join(argv if argv is not None else sys.argv[1:]),
                       date=datetime.now(UTC).isoformat(timespec="seconds"),
                       machine=f"{platform.machine()}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        _save(name, figures, **top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
