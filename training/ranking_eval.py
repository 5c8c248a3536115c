"""Headline metrics of a one-pass run from its progressive-validation scores (training.stream.PredictionLog).

Every candidate was scored by the model as it stood just before training on it, so these metrics
measure generalisation to the next moment of the stream (progressive validation). Reported per
task over the whole stream and over its last `last_fraction` of time (the MovieLens protocol's
"last 10%"), plus AUC over time for plots.

>>> import pyarrow as pa
>>> pred = pa.table({"sample_no": [0, 0, 1, 1], "user_id": [1, 1, 2, 2], "request_ts": [1, 1, 2, 2],
...                  "p_click": [0.1, 0.8, 0.3, 0.6], "y_click": [0, 1, 0, 1]})
>>> m = run_metrics(pred, ("click",), last_fraction=0.5)
>>> m["progressive"]["click"]["auc"], m["last"]["click"]["count"]
(1.0, 2)
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa

from training.metrics import auc, binary_metrics


def _task_metrics(pred: pa.Table, tasks: tuple[str, ...]) -> dict[str, dict[str, float]]:
    users = pred["user_id"].to_numpy()
    out = {}
    for task in tasks:
        y, p = pred[f"y_{task}"].to_numpy(), pred[f"p_{task}"].to_numpy()
        m = binary_metrics(y, p, users) if len(y) else {}
        out[task] = {**{k: _finite(v) for k, v in m.items()}, "count": len(y), "positives": int(y.sum())}
    return out


def run_metrics(pred: pa.Table, tasks: tuple[str, ...], last_fraction: float = 0.1) -> dict:
    """{"progressive": {task: metrics}, "last": {task: metrics}, "last_from_ts", "candidates"}."""
    ts = pred["request_ts"].to_numpy()
    start = float(np.quantile(ts, 1.0 - last_fraction)) if len(ts) else 0.0
    last = pred.filter(pa.array(ts >= start)) if len(ts) else pred
    return {"progressive": _task_metrics(pred, tasks), "last": _task_metrics(last, tasks),
            "last_fraction": last_fraction, "last_from_ts": int(start), "candidates": pred.num_rows}


def auc_over_time(pred: pa.Table, task: str, chunks: int = 20) -> list[dict[str, float]]:
    """AUC of `task` in `chunks` consecutive equal-count slices of the stream (time order)."""
    order = np.argsort(pred["sample_no"].to_numpy(), kind="stable")
    y, p = pred[f"y_{task}"].to_numpy()[order], pred[f"p_{task}"].to_numpy()[order]
    ts = pred["request_ts"].to_numpy()[order]
    out = []
    for part in np.array_split(np.arange(len(y)), chunks):
        if len(part) and 0 < y[part].sum() < len(part):
            out.append({"ts": int(ts[part[-1]]), "candidates": len(part), "auc": auc(y[part], p[part])})
    return out


def _finite(v: float) -> float | None:
    return None if isinstance(v, float) and math.isnan(v) else v
