"""Per-user chronological item sequences for next-item retrieval, and the leave-one-out split.

The public sequential protocol (datasets README, HSTU's repository): each user's interactions in
time order; the last item is the test target, the second-to-last the validation target, the rest
is training; at most `max_len` positions (the most recent) per sequence, target slot included.

The files are read directly (small numpy readers, no landing events): `ingestion.datasets` turns
the same files into contract events, but training needs only the sequences, and `training/` does
not import `ingestion/`. Item ids are re-numbered densely 1..num_items in order of source id
(0 = padding); `SequenceData.item_vocab` maps back. S3-Rec files are already dense, so their ids
stay as they are. Formats: MovieLens `.dat`, S3-Rec `user item item ...` `.txt`, LETTER / LC-Rec
`.inter.json`; `DATASETS` names the public copies, any other file is read by its path.

>>> data = sequences_from_interactions(users=[7, 7, 7, 7, 9, 9, 9], items=[30, 10, 20, 40, 10, 50, 30],
...                                    times=[5, 1, 3, 9, 2, 2, 1])
>>> [s.tolist() for s in data.items], data.item_vocab.tolist()   # ties (user 9 at t=2) keep file order
([[1, 2, 3, 4], [3, 1, 5]], [0, 10, 20, 30, 40, 50])
>>> split = leave_one_out(data, max_len=3)
>>> split.train.items.tolist(), split.valid.targets.tolist(), split.test.targets.tolist()
([[1, 2], [3, 0]], [3, 1], [4, 5])
>>> split.test.items.tolist()   # history of max_len - 1 = 2 items, then the target's slot
[[2, 3, 0], [3, 1, 0]]
>>> split.test.seen.tolist()    # the whole history before the target
[[1, 2, 3], [3, 1, 0]]
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class SequenceData:
    """Per-user chronological sequences: `items[u]` dense item ids, `times[u]` seconds (int64)."""

    name: str
    items: list[np.ndarray]
    times: list[np.ndarray]
    user_ids: np.ndarray  # source user id of each sequence
    item_vocab: np.ndarray  # item_vocab[dense id] = source item id; item_vocab[0] = 0 (padding)

    @property
    def num_items(self) -> int:
        return len(self.item_vocab) - 1

    @property
    def num_interactions(self) -> int:
        return int(sum(len(s) for s in self.items))


def sequences_from_interactions(users, items, times, name: str = "sequences") -> SequenceData:
    """Group (user, item, time) rows into per-user sequences sorted by time; ties keep row order."""
    users, items, times = (np.asarray(a, dtype=np.int64) for a in (users, items, times))
    vocab, dense = np.unique(items, return_inverse=True)
    order = np.lexsort((times, users))  # stable: equal (user, time) rows stay in file order
    users, dense, times = users[order], dense[order] + 1, times[order]
    starts = np.flatnonzero(np.r_[True, users[1:] != users[:-1]])
    return SequenceData(name=name, items=np.split(dense, starts[1:]), times=np.split(times, starts[1:]),
                        user_ids=users[starts], item_vocab=np.r_[0, vocab])


def read_movielens_dat(path: str | Path) -> SequenceData:
    """MovieLens `UserID::MovieID::Rating::Timestamp` (seconds); every rating is an interaction."""
    text = Path(path).read_bytes().decode("latin-1")
    table = np.array(text.replace("::", " ").split(), dtype=np.int64).reshape(-1, 4)
    return sequences_from_interactions(table[:, 0], table[:, 1], table[:, 3], name=Path(path).stem)


def read_s3rec_txt(path: str | Path) -> SequenceData:
    """S3-Rec `user item item ...` lines (chronological, no timestamps).

    Times are ordinal (position in the sequence, in seconds), as in `ingestion.datasets`, so time
    features only see order. Items keep their ids when they are already 1..num_items.
    """
    users, items = [], []
    with open(path) as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1:
                users.append(int(fields[0]))
                items.append(np.array(fields[1:], dtype=np.int64))
    times = [np.arange(len(s), dtype=np.int64) for s in items]
    data = sequences_from_interactions(np.repeat(users, [len(s) for s in items]), np.concatenate(items),
                                       np.concatenate(times), name=Path(path).stem)
    return data


def read_inter_json(path: str | Path) -> SequenceData:
    """LETTER / LC-Rec `{"user": [item, ...]}` (chronological, no timestamps); times are ordinal.

    A non-numeric user key gets its position in the file as its id.
    """
    with open(path) as f:
        raw = json.load(f)
    if not isinstance(raw, dict) or not all(isinstance(v, list) for v in raw.values()):
        raise ValueError(f"{path}: expected a JSON object of user -> list of item ids")
    pairs = [(int(u) if u.isdigit() else i, np.asarray(seq, dtype=np.int64))
             for i, (u, seq) in enumerate(raw.items()) if seq]
    users = [u for u, _ in pairs]
    items = [seq for _, seq in pairs]
    times = [np.arange(len(s), dtype=np.int64) for s in items]
    return sequences_from_interactions(np.repeat(users, [len(s) for s in items]), np.concatenate(items),
                                       np.concatenate(times), name=Path(path).name.split(".")[0])


# The one table of named datasets: name -> files under the datasets root (the first that exists is read), and
# beside it the reader of each format. A file in one of these formats needs no name: pass its path.
DATASETS: dict[str, tuple[str, ...]] = {
    "ml-1m": ("ml-1m/ratings.dat", "ml-1m/ratings_users_1-2999.dat"),  # the CI copy holds users 1..2999
    "beauty": ("amazon/Beauty.txt",),
    "sports": ("amazon/Sports_and_Outdoors.txt",),
    "yelp": ("yelp/Yelp.txt",),
    "games": ("nezha/Games/Games.inter.json",),
    "nezha-beauty": ("nezha/Beauty/Beauty.inter.json",),  # amazon/Beauty.txt in the LETTER layout, ids - 1
}
READERS = {".dat": read_movielens_dat, ".txt": read_s3rec_txt, ".json": read_inter_json}


def dataset_path(dataset: str, root: str | Path) -> Path:
    """The file a dataset name (or path) stands for; FileNotFoundError names every path it looked for."""
    candidates = [Path(root) / p for p in DATASETS[dataset]] if dataset in DATASETS else [Path(dataset)]
    path = next((p for p in candidates if p.exists()), None)
    if path is None:
        raise FileNotFoundError(f"dataset {dataset!r} not found: looked for {', '.join(map(str, candidates))}")
    return path


def load_sequences(dataset: str, root: str | Path = "../shared/datasets") -> SequenceData:
    """A named dataset (`DATASETS`) under `root`, or a path to a `.dat`, `.txt` or `.inter.json` file."""
    path = dataset_path(dataset, root)
    if path.suffix not in READERS:
        raise ValueError(f"{path}: unknown format {path.suffix!r}; expected one of {sorted(READERS)}")
    data = READERS[path.suffix](path)
    data.name = dataset if dataset in DATASETS else data.name
    return data


def read_attributes(dataset: str, root: str | Path, item_vocab: np.ndarray) -> list[list[int]] | None:
    """Attribute ids per dense item (index 0 = padding) from `X_item2attributes.json` next to an
    S3-Rec file, or None when the dataset has none."""
    path = dataset_path(dataset, root)
    side = path.with_name(path.stem + "_item2attributes.json")
    if not side.exists():
        return None
    table = json.loads(side.read_text())
    return [[]] + [list(table.get(str(int(i)), [])) for i in item_vocab[1:]]


@dataclass
class SequenceBatch:
    """Right-padded sequences: items/times [U, max_len] (0 = padding), lengths [U].

    For evaluation sets, position `lengths - 1` is the target's slot: its item id is 0 and its time
    is the target's time, so HSTU's last history token sees "the time the prediction is made" (as
    in HSTU's research code); `targets` [U] holds the item to rank.
    """

    items: np.ndarray
    times: np.ndarray
    lengths: np.ndarray
    targets: np.ndarray | None = None
    # Evaluation sets: every item the user had before the target (the whole history, not only the last
    # max_len - 1), right-padded; what the published protocol removes from the ranking (`seen_excluded`).
    seen: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.lengths)

    def select(self, rows: np.ndarray) -> SequenceBatch:
        """The given rows, every field kept."""
        return SequenceBatch(*(None if a is None else a[rows]
                               for a in (self.items, self.times, self.lengths, self.targets, self.seen)))

    def new_targets(self, rows: np.ndarray) -> np.ndarray:
        """A boolean per row of `rows`: its target is not one of the user's earlier items (the users the published
        protocol counts)."""
        if self.seen is None:
            raise ValueError("seen_excluded needs an evaluation set with `seen` histories (training.retrieval.data)")
        return ~(self.seen[rows] == self.targets[rows, None]).any(1)


@dataclass
class LeaveOneOut:
    """Training sequences, validation and test sets of one dataset; `skipped_users` had < 3 items."""

    train: SequenceBatch
    valid: SequenceBatch
    test: SequenceBatch
    num_items: int
    skipped_users: int
    max_len: int = 0  # positions per sequence, target slot included

    def train_with_validation(self) -> SequenceBatch:
        """The training rows with each user's validation item appended (the most recent max_len kept): what a
        model is refitted on once validation has chosen its epochs; the test item stays unseen.

        >>> data = sequences_from_interactions([1] * 5, [1, 2, 3, 4, 5], [0, 1, 2, 3, 4])
        >>> leave_one_out(data, max_len=3).train_with_validation().items.tolist()
        [[2, 3, 4]]
        """
        rows, times = [], []
        for u in range(len(self.train)):
            n, slot = int(self.train.lengths[u]), int(self.valid.lengths[u]) - 1
            rows.append(np.r_[self.train.items[u, :n], self.valid.targets[u]][-self.max_len:])
            times.append(np.r_[self.train.times[u, :n], self.valid.times[u, slot]][-self.max_len:])
        return SequenceBatch(items=_pad(rows), times=_pad(times), lengths=np.array([len(r) for r in rows], np.int64))


def _pad(rows: list[np.ndarray]) -> np.ndarray:
    """Right-pad to the longest row (not to max_len: most Amazon sequences are ~10 items)."""
    out = np.zeros((len(rows), max((len(r) for r in rows), default=0)), dtype=np.int64)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _eval_set(items: list[np.ndarray], times: list[np.ndarray], cut: int, max_len: int) -> SequenceBatch:
    """History = everything before position `cut` from the end (last max_len - 1 items), then the slot."""
    hist = [s[:-cut][-(max_len - 1):] for s in items]
    hist_t = [t[:-cut][-(max_len - 1):] for t in times]
    targets = np.array([s[-cut] for s in items], dtype=np.int64)
    slot_items = [np.r_[h, 0] for h in hist]
    slot_times = [np.r_[h, t[-cut]] for h, t in zip(hist_t, times)]
    return SequenceBatch(items=_pad(slot_items), times=_pad(slot_times),
                         lengths=np.array([len(h) for h in slot_items], dtype=np.int64), targets=targets,
                         seen=_pad([s[:-cut] for s in items]))


def leave_one_out(data: SequenceData, max_len: int = 200) -> LeaveOneOut:
    """Split every user with >= 3 interactions: last = test, second-to-last = validation, rest = train.

    Training sequences keep their most recent `max_len` items (each position predicts the next);
    evaluation histories keep the most recent `max_len - 1` items plus the target slot, so every
    sequence fits the model's `max_len` positions.
    """
    if max_len < 2:
        raise ValueError("max_len must be >= 2 (one history item plus the target)")
    keep = [i for i, s in enumerate(data.items) if len(s) >= 3]
    items = [data.items[i] for i in keep]
    times = [data.times[i] for i in keep]
    train_items = [s[:-2][-max_len:] for s in items]
    train_times = [t[:-2][-max_len:] for t in times]
    train = SequenceBatch(items=_pad(train_items), times=_pad(train_times),
                          lengths=np.array([len(s) for s in train_items], dtype=np.int64))
    return LeaveOneOut(train=train, valid=_eval_set(items, times, 2, max_len), test=_eval_set(items, times, 1, max_len),
                       num_items=data.num_items, skipped_users=len(data.items) - len(keep), max_len=max_len)


def prefix_samples(train: SequenceBatch, max_history: int) -> SequenceBatch:
    """Every (most recent <= max_history items before position t, item t) of the training rows, t >= 1:
    the generative retriever's training samples. Histories are right-padded; `targets` holds item t.

    >>> train = SequenceBatch(np.array([[1, 2, 3], [4, 5, 0]]), np.zeros((2, 3), dtype=np.int64), np.array([3, 2]))
    >>> s = prefix_samples(train, max_history=2)
    >>> s.items.tolist(), s.lengths.tolist(), s.targets.tolist()
    ([[1, 0], [1, 2], [4, 0]], [1, 2, 1], [2, 3, 5])
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
    """Histories of an evaluation set (`SequenceBatch`'s target slot at lengths - 1 removed)."""
    lengths = data.lengths - 1
    items = data.items.copy()
    items[np.arange(len(items)), lengths] = 0
    return items, lengths
