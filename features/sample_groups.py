"""Per-partition work of the sample builder (each call gets every event of the users it holds).

`ranking_partition` turns one partition's events into request rows (candidates, labels, history);
`retrieval_partition` into per-user item sequences. See `features.samples` for the definitions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa

from config.schema import SamplesConfig
from features.spec import FeatureStoreSpec
from features.windows import last_n_before, list_array
from ingestion.contract import ACTION_INDEX, TS_TYPE


@dataclass(frozen=True)
class RankingGroups:
    """How requests, candidates and labels are formed (shipped to the Ray workers)."""

    kind: str  # "livestream" or "ratings"
    spec: FeatureStoreSpec
    samples: SamplesConfig
    tasks: tuple[str, ...]


def _request_candidates(df: pd.DataFrame, groups: RankingGroups) -> pd.DataFrame:
    """Live-stream: impressions grouped by request, with per-task labels from same-request engagements."""
    imps = df[(df["action"] == ACTION_INDEX["impression"]) & df["request_id"].notna()]
    imps = imps.sort_values(["user_id", "request_id", "ts_ms", "source_file", "source_offset"], kind="stable")
    imps = imps.drop_duplicates(["user_id", "request_id", "item_id"])
    cands = imps[["user_id", "request_id", "item_id", "author_id"]].copy()
    cands["T"] = imps.groupby(["user_id", "request_id"])["ts_ms"].transform("min")
    keys = ["user_id", "request_id", "item_id"]
    eng = df[df["request_id"].notna() & (df["action"] != ACTION_INDEX["impression"])]
    eng = eng.merge(cands[[*keys, "T"]], on=keys)
    eng = eng[(eng["ts_ms"] >= eng["T"]) & (eng["ts_ms"] < eng["T"] + groups.samples.label_window_s * 1000)]
    flags = pd.DataFrame({
        "click": eng["action"] == ACTION_INDEX["click"],
        "long_view": (eng["action"] == ACTION_INDEX["view"]) & (eng["value"] >= groups.samples.long_view_s),
        "like": eng["action"] == ACTION_INDEX["like"],
        "follow": eng["action"] == ACTION_INDEX["follow"],
        "gift": eng["action"] == ACTION_INDEX["gift"],
    })
    labels = pd.concat([eng[keys], flags], axis=1).groupby(keys, as_index=False).max()
    cands = cands.merge(labels, on=keys, how="left")
    cands[list(flags.columns)] = cands[list(flags.columns)].fillna(False).astype(np.int8)
    return cands


def _rating_candidates(df: pd.DataFrame, groups: RankingGroups) -> pd.DataFrame:
    """Ratings: one user's ratings in one window form a group; like = rating >= 4, love = rating == 5."""
    rates = df[df["action"] == ACTION_INDEX["rate"]].sort_values(["user_id", "ts_ms", "item_id"], kind="stable")
    window = rates["ts_ms"] // (groups.samples.group_window_s * 1000)
    rates = rates.assign(T=rates.groupby([rates["user_id"], window])["ts_ms"].transform("min"))
    rates = rates.drop_duplicates(["user_id", "T", "item_id"], keep="last")
    rates = rates.sort_values(["user_id", "T", "ts_ms", "item_id"], kind="stable")
    # A long rating session is cut into requests of at most max_candidates (same T, same history), so no
    # rating is dropped and a request's candidate count stays bounded.
    part = rates.groupby(["user_id", "T"]).cumcount() // groups.samples.max_candidates
    return pd.DataFrame({
        "user_id": rates["user_id"],
        "request_id": rates["user_id"].astype(str) + "-" + rates["T"].astype(str) + "-" + part.astype(str),
        "item_id": rates["item_id"], "author_id": rates["author_id"], "T": rates["T"],
        "like": (rates["value"] >= 4).astype(np.int8), "love": (rates["value"] == 5).astype(np.int8),
    })


def ranking_partition(batch: pa.Table, groups: RankingGroups) -> pa.Table:
    """Request rows: request_id, user_id, request_ts, hist_* (last N engagements before T), cand_*, label_*."""
    df = batch.to_pandas()
    cands = _rating_candidates(df, groups) if groups.kind == "ratings" else _request_candidates(df, groups)
    cands = cands.assign(pos=cands.groupby(["user_id", "request_id"]).cumcount())
    cands = cands[cands["pos"] < groups.samples.max_candidates].sort_values(["T", "request_id", "pos"], kind="stable")
    rid = cands["request_id"].to_numpy()
    first = np.flatnonzero(np.r_[True, rid[1:] != rid[:-1]]) if len(rid) else np.zeros(0, np.int64)
    offsets = pa.array(np.r_[first, len(cands)].astype(np.int32))
    req_users, req_ts = cands["user_id"].to_numpy()[first], cands["T"].to_numpy()[first]

    spec = groups.spec
    eng = df[df["action"].isin(spec.sequence_actions)].sort_values(["user_id", "ts_ms", "item_id", "action"],
                                                                   kind="stable")
    users, ts = eng["user_id"].to_numpy(), eng["ts_ms"].to_numpy()
    starts, ends = last_n_before(users, ts, req_users, req_ts, spec.sequence_length)
    hist = {"hist_item_ids": eng["item_id"], "hist_author_ids": eng["author_id"].fillna(0),
            "hist_actions": eng["action"], "hist_ts": eng["ts_ms"]}
    out = {
        "request_id": pa.array(cands["request_id"].to_numpy()[first].astype(str)),
        "user_id": pa.array(req_users.astype(np.int64)),
        "request_ts": pa.array(req_ts.astype(np.int64) * 1000).cast(TS_TYPE),
        **{name: list_array(col.to_numpy().astype(np.int64), starts, ends, pa.int64()) for name, col in hist.items()},
        # the value of each history event (stars of a rating, seconds of a view): sequence models use the stars
        "hist_values": list_array(eng["value"].fillna(0).to_numpy().astype(np.float32), starts, ends, pa.float32()),
        "cand_item_ids": pa.ListArray.from_arrays(offsets, pa.array(cands["item_id"].to_numpy().astype(np.int64))),
        "cand_author_ids": pa.ListArray.from_arrays(
            offsets, pa.array(cands["author_id"].fillna(0).to_numpy().astype(np.int64))),
    }
    for task in groups.tasks:
        out[f"label_{task}"] = pa.ListArray.from_arrays(offsets, pa.array(cands[task].to_numpy().astype(np.int8)))
    return pa.table(out)


def retrieval_partition(batch: pa.Table, actions: list[str], max_length: int) -> pa.Table:
    """Per user: item_ids and ts (epoch ms) of their `actions` events, oldest first, the last `max_length`."""
    df = batch.to_pandas()
    codes = [ACTION_INDEX[a] for a in actions]
    df = df[df["action"].isin(codes)].sort_values(["user_id", "ts_ms", "item_id"], kind="stable")
    users = df["user_id"].to_numpy()
    first = np.flatnonzero(np.r_[True, users[1:] != users[:-1]]) if len(users) else np.zeros(0, np.int64)
    ends = np.r_[first[1:], len(users)].astype(np.int64)
    starts = np.maximum(first, ends - max_length)
    return pa.table({
        "user_id": pa.array(users[first].astype(np.int64)),
        "item_ids": list_array(df["item_id"].to_numpy().astype(np.int64), starts, ends, pa.int64()),
        "ts": list_array(df["ts_ms"].to_numpy().astype(np.int64), starts, ends, pa.int64()),
    })
