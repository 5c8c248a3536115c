"""The lake's `samples_retrieval` table as a sequence file the retriever pipeline reads like any dataset.

The generative retriever's pipeline (training.retrieval.pipeline) takes any file in the public
sequential formats; the platform's own users become one more such file: one line per user,
`user item item ...` in time order (the s3rec layout), raw item ids (the pipeline maps them to dense ids
and keeps the mapping in the artifact, so serving answers in raw ids).

    export_retrieval_sequences(config.load(), "data/retrieval/lake.txt")
"""

from __future__ import annotations

from pathlib import Path

from deltalake import DeltaTable

from config.schema import PlatformConfig


def export_retrieval_sequences(cfg: PlatformConfig, path: str | Path, min_length: int = 3) -> Path:
    """Write users with at least `min_length` items (leave-one-out needs train, validation and test)."""
    table = DeltaTable(cfg.lake.table("samples_retrieval"), storage_options=cfg.lake.storage_options or None)
    rows = table.to_pyarrow_table(columns=["user_id", "item_ids"]).to_pydict()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    kept = 0
    with open(path.with_suffix(".tmp"), "w") as f:
        for user, items in zip(rows["user_id"], rows["item_ids"], strict=True):
            if len(items) >= min_length:
                f.write(f"{user} {' '.join(map(str, items))}\n")
                kept += 1
    if not kept:
        raise ValueError(f"{cfg.lake.table('samples_retrieval')} has no user with {min_length}+ items to train on")
    path.with_suffix(".tmp").replace(path)
    return path
