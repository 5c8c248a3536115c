"""The best AUC any model could reach on the simulator's ranking samples, and which parts of it a model learned.

The simulator writes each impression's true p_click under `simulator.oracle_dir` (p_click.parquet:
request_id, item_id, p_click, and each term of the click logit as `<term>_logit`). Scoring the `samples_ranking`
candidates with it, against the samples' own `label_click`, gives the ceiling for the trained models' progressive
AUC on the very same rows - over the whole stream and from a time on (the "last 10%" scope). Pass the run's
`metrics["prior"]["requests"]` as `from_sample` so the ceiling covers the rows the run's metrics do, and
compare `matched` with the run's candidate count: a ceiling on other rows is no ceiling.

The terms say where a gap to the ceiling lives: the ceiling without one term is what a model blind to it could
reach at best (`auc_without`), and regressing a model's click logit on the terms (`click_logit_terms`) says how
much of each it follows (1 = all of it, in logit units; 0 = none).

    oracle_auc_on_samples("data/demo/oracle", "data/demo/lake/samples_ranking", since_s=None, from_sample=512)
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from deltalake import DeltaTable

import storage
from training.metrics import auc
from training.ranking_eval import auc_over_time

TERM_SUFFIX = "_logit"


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def oracle_candidates(oracle_dir: str | Path, samples_path: str, since_s: int | None = None,
                      max_requests: int | None = None, from_sample: int = 0) -> tuple[pa.Table, int]:
    """The samples' candidates (sample_no, slot: the candidate's index in its request, request_ts, label) joined
    with their oracle rows (p_click and the `<term>_logit` columns), and the number of candidates in scope."""
    fs, path = storage.filesystem(storage.join(str(oracle_dir), "p_click.parquet"))
    names = pq.read_schema(path, filesystem=fs).names
    oracle = pq.read_table(path, filesystem=fs, columns=["request_id", "item_id", "p_click",
                                                          *(n for n in names if n.endswith(TERM_SUFFIX))])
    # An item shown twice in one request is one candidate in the samples (its first impression): keep one row.
    oracle = pa.Table.from_pandas(oracle.to_pandas().drop_duplicates(["request_id", "item_id"]), preserve_index=False)
    samples = DeltaTable(samples_path).to_pyarrow_table(
        columns=["sample_no", "request_id", "request_ts", "cand_item_ids", "label_click"])
    if max_requests is not None:
        samples = samples.filter(pc.less(samples["sample_no"], max_requests))
    if from_sample:
        samples = samples.filter(pc.greater_equal(samples["sample_no"], from_sample))
    seconds = pc.divide(pc.cast(samples["request_ts"], pa.int64()), 1_000_000)
    if since_s is not None:
        keep = pc.greater_equal(seconds, since_s)
        samples, seconds = samples.filter(keep), seconds.filter(keep)
    counts = pc.list_value_length(samples["cand_item_ids"]).to_numpy()
    ends = np.cumsum(counts)
    cands = pa.table({
        "sample_no": np.repeat(samples["sample_no"].to_numpy(), counts),
        "slot": np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(ends - counts, counts),
        "request_ts": np.repeat(seconds.to_numpy(), counts),
        "request_id": np.repeat(samples["request_id"].to_numpy(zero_copy_only=False), counts),
        "item_id": pc.list_flatten(samples["cand_item_ids"]),
        "label": pc.list_flatten(samples["label_click"]),
    })
    return cands.join(oracle, ["request_id", "item_id"], join_type="inner"), cands.num_rows


def oracle_auc_on_samples(oracle_dir: str | Path, samples_path: str, since_s: int | None = None,
                          max_requests: int | None = None, from_sample: int = 0) -> dict:
    """{"auc", "candidates", "matched", "auc_over_time"}: AUC of the true p_click on the samples' click labels
    over the samples `from_sample` <= sample_no < `max_requests` (and request time >= `since_s`), and per 5% of
    that scope in time order as `training.ranking_eval.auc_over_time` slices it. `matched` of `candidates` had
    an oracle row. Where the oracle has the logit's terms, also "auc_without": {term: the AUC of the true logit less
    that term}, the ceiling of a model blind to it; for the item's hidden hype, which the simulator's traffic barely
    reveals, also "auc_without_hype" and its slices."""
    joined, candidates = oracle_candidates(oracle_dir, samples_path, since_s, max_requests, from_sample)
    y = joined["label"].to_numpy()
    p = joined["p_click"].to_numpy()
    # The same equal-count time slices as the models' progressive AUC: the ceiling moves with the hour too.
    scores = pa.table({"sample_no": joined["sample_no"], "request_ts": joined["request_ts"],
                       "y_click": joined["label"], "p_click": joined["p_click"]})
    out = {"auc": auc(y, p) if len(y) else float("nan"), "candidates": candidates,
           "matched": int(joined.num_rows), "auc_over_time": auc_over_time(scores, "click")}
    terms = [n for n in joined.column_names if n.endswith(TERM_SUFFIX)]
    if terms and len(y):
        logit = np.log(p / (1.0 - p))
        out["auc_without"] = {n.removesuffix(TERM_SUFFIX): auc(y, logit - joined[n].to_numpy()) for n in terms}
    if "hype_logit" in terms and len(y):
        blind = _sigmoid(logit - joined["hype_logit"].to_numpy())
        out["auc_without_hype"] = out["auc_without"]["hype"]
        out["auc_over_time_without_hype"] = auc_over_time(scores.set_column(3, "p_click", pa.array(blind)), "click")
    return out


def click_logit_terms(joined: pa.Table, pred: pa.Table) -> dict:
    """How much of each click-logit term a model's scores follow: the least-squares fit of the model's click logit
    on the true terms (and an intercept) over the candidates both tables hold.

    `joined` is `oracle_candidates`' table; `pred` a run's progressive scores (`training.stream.PredictionLog`:
    sample_no, p_click, ... with each request's candidates in slot order). Returns {"terms": {term: coefficient},
    "r2": share of the model logit's variance the terms explain, "candidates": rows fitted}, and where `joined` has
    the labels, the model's "auc" and the "oracle_auc" on those rows. A coefficient of 1 means the model moves
    with the term one for one, as the truth does; hype, which no feature shows directly (the windowed click counts
    reveal some of it), is expected well below 1.

    >>> joined = pa.table({"sample_no": [0, 0, 1, 1, 2, 2], "slot": [0, 1, 0, 1, 0, 1],
    ...                    "a_logit": [0.0, 1.0, 2.0, 0.5, 1.5, 3.0], "b_logit": [1.0, 0.0, 1.0, 2.0, 0.0, 1.0]})
    >>> pred = pa.table({"sample_no": [0, 0, 1, 1, 2, 2],
    ...                  "p_click": _sigmoid(np.array([0.0, 1.0, 2.0, 0.5, 1.5, 3.0]) - 1.0)})  # follows a only
    >>> fit = click_logit_terms(joined, pred)
    >>> {k: round(v, 3) for k, v in fit["terms"].items()}, round(fit["r2"], 3)
    ({'a': 1.0, 'b': 0.0}, 1.0)
    """
    order = np.argsort(pred["sample_no"].to_numpy(), kind="stable")
    samples = pred["sample_no"].to_numpy()[order]
    first = np.r_[0, np.flatnonzero(samples[1:] != samples[:-1]) + 1]
    slots = np.arange(len(samples)) - np.repeat(first, np.diff(np.r_[first, len(samples)]))
    p = np.clip(pred["p_click"].to_numpy()[order].astype(np.float64), 1e-7, 1 - 1e-7)
    scored = pa.table({"sample_no": samples, "slot": slots, "model_logit": np.log(p / (1 - p))})
    both = scored.join(joined, ["sample_no", "slot"], join_type="inner")
    names = [n for n in joined.column_names if n.endswith(TERM_SUFFIX)]
    x = np.column_stack([both[n].to_numpy() for n in names] + [np.ones(both.num_rows)])
    target = both["model_logit"].to_numpy()
    coef, *_ = np.linalg.lstsq(x, target, rcond=None)
    residual = target - x @ coef
    out = {"terms": {n.removesuffix(TERM_SUFFIX): float(c) for n, c in zip(names, coef[:-1], strict=True)},
           "r2": float(1.0 - residual.var() / target.var()), "candidates": int(both.num_rows)}
    if "label" in both.column_names:  # the model's and the oracle's AUC on the same rows
        y = both["label"].to_numpy()
        out["auc"], out["oracle_auc"] = auc(y, target), auc(y, both["p_click"].to_numpy())
    return out
