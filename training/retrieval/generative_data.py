"""Data for the generative retriever: any sequential dataset by name or path, item attributes, and
one training sample per (history prefix, next item).

Formats (datasets README): S3-Rec `user item item ...` text (`.txt`), MovieLens `.dat`, and the
LETTER / LC-Rec `X.inter.json` (`{"user": [item, ...]}`, chronological). A new dataset in one of
these formats needs only its path. Source item ids are kept in `SequenceData.item_vocab`
(dense id -> source id), as in training/retrieval/data.py whose readers this reuses.

>>> import numpy as np
>>> from training.retrieval.data import SequenceBatch
>>> train = SequenceBatch(np.array([[1, 2, 3], [4, 5, 0]]), np.zeros((2, 3), dtype=np.int64), np.array([3, 2]))
>>> s = prefix_samples(train, max_history=2)
>>> s.items.tolist(), s.lengths.tolist(), s.targets.tolist()
([[1, 0], [1, 2], [4, 0]], [1, 2, 1], [2, 3, 5])
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from training.retrieval.data import (
    DATASET_FILES,
    SequenceBatch,
    SequenceData,
    load_sequences,
    sequences_from_interactions,
)

# Names beyond training.retrieval.data's (LETTER layout, as the NEZHA paper trains on).
LETTER_FILES = {"games": "nezha/Games/Games.inter.json", "nezha-beauty": "nezha/Beauty/Beauty.inter.json"}
DATASET_NAMES = tuple(sorted(set(DATASET_FILES) | set(LETTER_FILES)))


def read_letter_json(path: str | Path) -> SequenceData:
    """`{"user": [item, ...]}` chronological lists; times are ordinal positions (no timestamps)."""
    data = json.loads(Path(path).read_text())
    users = sorted(data, key=lambda u: int(u) if u.isdigit() else u)
    seqs = [np.asarray(data[u], dtype=np.int64) for u in users]
    user_ids = np.repeat(np.array([int(u) if u.isdigit() else i for i, u in enumerate(users)]),
                         [len(s) for s in seqs])
    times = np.concatenate([np.arange(len(s)) for s in seqs])
    return sequences_from_interactions(user_ids, np.concatenate(seqs), times, name=Path(path).name.split(".")[0])


def resolve_path(dataset: str, root: str | Path) -> Path:
    """The file a dataset name (or path) stands for."""
    if dataset in LETTER_FILES:
        return Path(root) / LETTER_FILES[dataset]
    if dataset in DATASET_FILES:
        found = [Path(root) / p for p in DATASET_FILES[dataset] if (Path(root) / p).exists()]
        return found[0] if found else Path(root) / DATASET_FILES[dataset][0]
    return Path(dataset)


def load_any(dataset: str, root: str | Path = "../shared/datasets") -> SequenceData:
    """A dataset name (`DATASET_NAMES`) or a path to a `.txt`, `.dat` or `.inter.json` file."""
    path = resolve_path(dataset, root)
    if not path.exists():
        raise FileNotFoundError(f"dataset {dataset!r} not found at {path}")
    if path.name.endswith(".json"):
        data = read_letter_json(path)
    else:
        data = load_sequences(str(path), root)
    data.name = dataset if dataset in DATASET_NAMES else data.name
    return data


def read_attributes(dataset: str, root: str | Path, item_vocab: np.ndarray) -> list[list[int]] | None:
    """Attribute ids per dense item (index 0 = padding) from `X_item2attributes.json` next to an
    S3-Rec file, or None when the dataset has none."""
    path = resolve_path(dataset, root)
    side = path.with_name(path.stem + "_item2attributes.json")
    if not side.exists():
        return None
    table = json.loads(side.read_text())
    return [[]] + [list(table.get(str(int(i)), [])) for i in item_vocab[1:]]


def prefix_samples(train: SequenceBatch, max_history: int) -> SequenceBatch:
    """Every (most recent <= max_history items before position t, item t) of the training rows, t >= 1.

    Histories are right-padded to max_history; `targets` holds item t.
    """
    rows, cols = np.nonzero(np.arange(train.items.shape[1])[None, :] < train.lengths[:, None])
    keep = cols >= 1
    rows, cols = rows[keep], cols[keep]
    offsets = np.arange(max_history)[None, :]
    start = np.maximum(cols - max_history, 0)
    idx = start[:, None] + offsets
    lengths = np.minimum(cols, max_history)
    valid = offsets < lengths[:, None]
    items = np.where(valid, train.items[rows[:, None], np.minimum(idx, train.items.shape[1] - 1)], 0)
    width = int(lengths.max()) if len(lengths) else 1
    return SequenceBatch(items=items[:, :width], times=np.zeros((len(rows), 1), dtype=np.int64),
                         lengths=lengths.astype(np.int64), targets=train.items[rows, cols])


def eval_histories(data: SequenceBatch) -> tuple[np.ndarray, np.ndarray]:
    """Histories of an evaluation set (training.retrieval.data: the target slot at lengths - 1 removed)."""
    lengths = data.lengths - 1
    items = data.items.copy()
    items[np.arange(len(items)), lengths] = 0
    return items, lengths
