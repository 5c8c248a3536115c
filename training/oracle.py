"""The best AUC any model could reach on the simulator's ranking samples (its true click probabilities).

The simulator writes each impression's true p_click under `simulator.oracle_dir` (p_click.parquet:
request_id, item_id, p_click, ...). Scoring the `samples_ranking` candidates with it, against the
samples' own `label_click`, gives the ceiling for the trained models' progressive AUC on the very same
rows - over the whole stream and from a time on (the "last 10%" scope). Pass the run's
`metrics["prior"]["requests"]` as `from_sample` so the ceiling covers the rows the run's metrics do, and
compare `matched` with the run's candidate count: a ceiling on other rows is no ceiling.

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


def oracle_auc_on_samples(oracle_dir: str | Path, samples_path: str, since_s: int | None = None,
                          max_requests: int | None = None, from_sample: int = 0) -> dict[str, float]:
    """{"auc", "candidates", "matched", "auc_over_time"}: AUC of the true p_click on the samples' click labels
    over the samples `from_sample` <= sample_no < `max_requests` (and request time >= `since_s`), and per 5% of
    that scope in time order as `training.ranking_eval.auc_over_time` slices it. `matched` of `candidates` had
    an oracle row. Where the oracle has the hype term, also "auc_without_hype" (and its slices): the ceiling of a
    model blind to the item's hidden hype, which the simulator's traffic barely reveals."""
    fs, path = storage.filesystem(storage.join(str(oracle_dir), "p_click.parquet"))
    names = pq.read_schema(path, filesystem=fs).names
    oracle = pq.read_table(path, filesystem=fs, columns=["request_id", "item_id", "p_click",
                                                          *(["hype_logit"] if "hype_logit" in names else [])])
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
    seconds = seconds.to_numpy()
    cands = pa.table({
        "sample_no": np.repeat(samples["sample_no"].to_numpy(), counts),
        "request_ts": np.repeat(seconds, counts),
        "request_id": np.repeat(samples["request_id"].to_numpy(zero_copy_only=False), counts),
        "item_id": pc.list_flatten(samples["cand_item_ids"]),
        "label": pc.list_flatten(samples["label_click"]),
    })
    joined = cands.join(oracle, ["request_id", "item_id"], join_type="inner")
    y = joined["label"].to_numpy()
    p = joined["p_click"].to_numpy()
    # The same equal-count time slices as the models' progressive AUC: the ceiling moves with the hour too.
    scores = pa.table({"sample_no": joined["sample_no"], "request_ts": joined["request_ts"],
                       "y_click": joined["label"], "p_click": joined["p_click"]})
    out = {"auc": auc(y, p) if len(y) else float("nan"), "candidates": int(cands.num_rows),
           "matched": int(joined.num_rows), "auc_over_time": auc_over_time(scores, "click")}
    if "hype_logit" in joined.column_names and len(y):
        # The ceiling of a model that knows everything but the item's hidden hype: sigmoid(logit(p) - hype).
        blind = 1.0 / (1.0 + np.exp(-(np.log(p / (1.0 - p)) - joined["hype_logit"].to_numpy())))
        out["auc_without_hype"] = auc(y, blind)
        out["auc_over_time_without_hype"] = auc_over_time(scores.set_column(3, "p_click", pa.array(blind)), "click")
    return out
