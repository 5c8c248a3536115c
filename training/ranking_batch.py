"""Ranking sample rows -> `RankingInputs` + labels: the one conversion training and serving share.

Rows follow the `samples_ranking` contract (features/samples.py): `user_id`, `request_ts`
(timestamp[us]), `hist_item_ids` / `hist_author_ids` / `hist_actions` / `hist_ts` (ms) lists,
optional `hist_values`, `cand_item_ids` / `cand_author_ids` lists, `user_stats`, `cand_item_stats`,
`cand_author_stats` (stats vectors) and, for training, `label_<task>` lists. Serving builds the
same columns from the online store and calls the same `encode`, so a model sees identical tensors
offline and online (train/serve consistency by construction).

Choices (not from a paper):
- raw ids are used as embedding rows; ids above the vocabulary of the artifact fold into it by modulo
  (`models.features.fold_ids`): a streaming model meets new ids every day and must not crash on them;
- a `rate` event with a value of 1..5 becomes its own action token (rate:1 .. rate:5) so sequence
  models see what the user thought of each movie, not only that they rated it;
- stats enter as sign(x) * log1p(|x|): counts span orders of magnitude, rates stay about the same;
- the history keeps the newest `max_hist_len` events.

>>> import pyarrow as pa
>>> feats = RankingFeatures(kind="ratings", tasks=("like",), stat_names=("n",), num_users=9, num_items=50,
...                         num_authors=0, max_hist_len=2)
>>> rows = pa.table({"user_id": [3], "request_ts": pa.array([5_000_000], pa.timestamp("us", "UTC")),
...     "hist_item_ids": [[4, 5, 6]], "hist_author_ids": [[0, 0, 0]], "hist_actions": [[9, 9, 9]],
...     "hist_ts": [[1000, 2000, 3000]], "hist_values": [[5.0, 1.0, 4.0]], "cand_item_ids": [[7, 80]],
...     "cand_author_ids": [[0, 0]], "user_stats": [[0.0]], "cand_item_stats": [[[1.0], [0.0]]],
...     "cand_author_stats": [[[0.0], [0.0]]], "label_like": [[1, 0]]})
>>> inputs = encode(rows, feats)
>>> inputs.hist_item_ids.tolist(), inputs.hist_actions.tolist(), inputs.cand_item_ids.tolist()
([[5, 6]], [[10, 13]], [[7, 30]])
>>> labels(rows, feats)[0, :, 0].tolist()
[1.0, 0.0]
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from features.sample_contract import RankingContract
from ingestion.contract import ACTION_INDEX, ACTIONS
from models.features import fold_ids
from models.inputs import RankingInputs

RATE = ACTION_INDEX["rate"]
RATING_LEVELS = 5  # rate:1 .. rate:5 get tokens len(ACTIONS) + 1 .. len(ACTIONS) + 5


@dataclass(frozen=True)
class RankingFeatures:
    """What a ranking model was trained on; stored in its artifact (metadata.json "ranking_features")."""

    kind: str  # "livestream" or "ratings" (features.samples.ranking_tasks)
    tasks: tuple[str, ...]
    stat_names: tuple[str, ...]
    num_users: int
    num_items: int
    num_authors: int
    max_hist_len: int = 256

    @property
    def num_actions(self) -> int:
        return len(ACTIONS) + RATING_LEVELS

    @property
    def user_dense_dim(self) -> int:
        return len(self.stat_names)

    @property
    def item_dense_dim(self) -> int:
        return 2 * len(self.stat_names)  # the candidate's stats, then its author's

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "tasks": list(self.tasks), "stat_names": list(self.stat_names)}

    @classmethod
    def from_contract(cls, contract: RankingContract, max_hist_len: int) -> RankingFeatures:
        """What a ranker trained on rows of this contract sees (the newest `max_hist_len` history events)."""
        return cls(kind=contract.kind, tasks=contract.tasks, stat_names=contract.stat_names,
                   num_users=contract.num_users, num_items=contract.num_items, num_authors=contract.num_authors,
                   max_hist_len=max_hist_len)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RankingFeatures:
        return cls(**{**d, "tasks": tuple(d["tasks"]), "stat_names": tuple(d["stat_names"])})


def encode(rows: pa.Table, feats: RankingFeatures) -> RankingInputs:
    """Sample rows -> `RankingInputs` (B = rows, L = longest kept history, C = most candidates)."""
    hist_items, hist_len = _pad(rows["hist_item_ids"], feats.max_hist_len, keep_last=True)
    hist_actions = _pad(rows["hist_actions"], feats.max_hist_len, keep_last=True)[0]
    if "hist_values" in rows.column_names:
        values = _pad(rows["hist_values"], feats.max_hist_len, keep_last=True, dtype=np.float64)[0]
        stars = np.rint(values).astype(np.int64)
        rated = (hist_actions == RATE) & (stars >= 1) & (stars <= RATING_LEVELS)
        hist_actions = np.where(rated, len(ACTIONS) + stars, hist_actions)
    cand_items, num_cands = _pad(rows["cand_item_ids"], None)
    width = len(feats.stat_names)
    item_stats = _pad_vectors(rows["cand_item_stats"], cand_items.shape[1], width)
    author_stats = _pad_vectors(rows["cand_author_stats"], cand_items.shape[1], width)
    user_stats = _flat(rows["user_stats"], np.float32).reshape(len(rows), width)
    us = pc.cast(rows["request_ts"], pa.int64()).to_numpy()
    t = torch.from_numpy
    return RankingInputs(
        user_ids=fold_ids(t(_ints(rows["user_id"])), feats.num_users),
        request_ts=t(us // 1_000_000),
        hist_item_ids=fold_ids(t(hist_items), feats.num_items),
        hist_author_ids=fold_ids(t(_pad(rows["hist_author_ids"], feats.max_hist_len, keep_last=True)[0]),
                                 max(feats.num_authors, 1)),
        hist_actions=t(hist_actions),
        hist_ts=t(_pad(rows["hist_ts"], feats.max_hist_len, keep_last=True)[0] // 1000),
        hist_lengths=t(hist_len),
        cand_item_ids=fold_ids(t(cand_items), feats.num_items),
        cand_author_ids=fold_ids(t(_pad(rows["cand_author_ids"], None)[0]), max(feats.num_authors, 1)),
        num_candidates=t(num_cands),
        cand_dense=t(_squash(np.concatenate([item_stats, author_stats], axis=-1))),
        user_dense=t(_squash(user_stats)),
    )


def labels(rows: pa.Table, feats: RankingFeatures) -> torch.Tensor:
    """[B, C, T] float labels (0 on padded candidates)."""
    missing = [f"label_{task}" for task in feats.tasks if f"label_{task}" not in rows.column_names]
    if missing:
        raise KeyError(f"sample rows lack label columns {missing}; they have {rows.column_names}")
    per_task = [_pad(rows[f"label_{task}"], None)[0] for task in feats.tasks]
    return torch.from_numpy(np.stack(per_task, axis=-1).astype(np.float32))


def _ints(col) -> np.ndarray:
    return pc.fill_null(col, 0).to_numpy().astype(np.int64)


def _flat(col, dtype) -> np.ndarray:
    values = pc.list_flatten(col)
    return pc.fill_null(values, 0).to_numpy(zero_copy_only=False).astype(dtype)


def _pad(col, width: int | None, keep_last: bool = False, dtype=np.int64) -> tuple[np.ndarray, np.ndarray]:
    """A list column -> ([B, W] right-padded with 0, lengths [B]); W = `width` or the longest list.
    With `keep_last`, lists longer than `width` keep their newest (last) elements."""
    lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    values = _flat(col, dtype)
    starts = np.r_[0, np.cumsum(lengths)[:-1]] if len(lengths) else lengths
    longest = int(lengths.max(initial=0))
    w = longest if width is None else max(1, min(width, longest))  # no columns of padding only
    kept = np.minimum(lengths, w)
    skip = lengths - kept if keep_last else np.zeros_like(lengths)
    pos = np.arange(w)[None, :]
    valid = pos < kept[:, None]
    index = np.where(valid, starts[:, None] + skip[:, None] + pos, 0)
    out = np.where(valid, values[index] if len(values) else 0, 0).astype(dtype)
    return out, kept


def _pad_vectors(col, width: int, dim: int) -> np.ndarray:
    """list<list<float>> of fixed inner size `dim` -> [B, width, dim] (0 on padding)."""
    counts = pc.fill_null(pc.list_value_length(col), 0).to_numpy().astype(np.int64)
    inner = pc.list_flatten(col)
    flat = _flat(inner, np.float32).reshape(-1, dim) if len(inner) else np.zeros((0, dim), np.float32)
    out = np.zeros((len(counts), width, dim), np.float32)
    rows = np.repeat(np.arange(len(counts)), counts)
    cols = np.arange(len(rows)) - np.repeat(np.r_[0, np.cumsum(counts)[:-1]], counts)
    out[rows, cols] = flat
    return out


def _squash(x: np.ndarray) -> np.ndarray:
    return (np.sign(x) * np.log1p(np.abs(x))).astype(np.float32)
