"""The `samples_ranking` contract: its columns, tasks, stats and vocabulary sizes, in the table's commit metadata.

The sample builder (features/samples.py) writes a `RankingContract` into the custom metadata of the commit
that writes the table; training reads it back from the Delta log (training/stream.py) and copies it into the
model artifact (`RankingFeatures`), which serving loads. So what a ranker was trained on is stated once,
by the stage that made the rows, and nobody downstream re-derives it from the raw `events` table.

Delta commit metadata is a flat map of strings, so lists are comma-separated and numbers are decimal.

>>> c = RankingContract(kind="ratings", tasks=("like", "love"), stat_names=("n", "ctr"), num_users=9,
...                     num_items=50, num_authors=0)
>>> RankingContract.from_metadata(c.to_metadata(), "samples_ranking") == c
True
>>> c.columns[-2:]
('label_like', 'label_love')
"""

from __future__ import annotations

from dataclasses import dataclass

# What training reads of a row (and serving builds from the online store): these, then one `label_<task>` list
# per task. Rows also carry `request_id`, `stats_asof_ms` (leakage checks) and `dt` (the partition).
FEATURE_COLUMNS = ("sample_no", "user_id", "request_ts", "hist_item_ids", "hist_author_ids",
                   "hist_actions", "hist_ts", "hist_values", "cand_item_ids", "cand_author_ids", "user_stats",
                   "cand_item_stats", "cand_author_stats")
KINDS = ("livestream", "ratings")
_KEYS = ("kind", "tasks", "stat_names", "num_users", "num_items", "num_authors")


@dataclass(frozen=True)
class RankingContract:
    kind: str  # "livestream" or "ratings"
    tasks: tuple[str, ...]
    stat_names: tuple[str, ...]
    # Largest ids in the `events` table the rows were built from: embedding sizes (larger ids fold by modulo).
    num_users: int
    num_items: int
    num_authors: int

    @property
    def columns(self) -> tuple[str, ...]:
        return FEATURE_COLUMNS + tuple(f"label_{task}" for task in self.tasks)

    def to_metadata(self) -> dict[str, str]:
        return {"kind": self.kind, "tasks": ",".join(self.tasks), "stat_names": ",".join(self.stat_names),
                "columns": ",".join(self.columns), "num_users": str(self.num_users),
                "num_items": str(self.num_items), "num_authors": str(self.num_authors)}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], table: str) -> RankingContract:
        """The contract a sample-builder commit recorded; `table` names the table in errors."""
        missing = [k for k in _KEYS if not meta.get(k)]
        if missing:
            raise ValueError(f"{table}: its sample-builder commit lacks {missing} (built before the ranking "
                             "contract recorded them): rebuild it with python -m ray_jobs.samples")
        if meta["kind"] not in KINDS:
            raise ValueError(f"{table}: commit metadata kind={meta['kind']!r}, expected one of {KINDS}")
        try:
            sizes = {k: int(meta[k]) for k in ("num_users", "num_items", "num_authors")}
        except ValueError as e:
            raise ValueError(f"{table}: commit metadata vocabulary sizes are not integers: {e}") from None
        if sizes["num_users"] < 1 or sizes["num_items"] < 1 or sizes["num_authors"] < 0:
            raise ValueError(f"{table}: commit metadata vocabulary sizes {sizes} must be >= 1 (authors >= 0)")
        return cls(kind=meta["kind"], tasks=tuple(meta["tasks"].split(",")),
                   stat_names=tuple(meta["stat_names"].split(",")), **sizes)
