"""Features: the Feast repository, the feature job (Ray tasks), the real-time updater, the serving client and
the training-sample builder (docs/design.md, "Features" and "Training samples").

- `spec`: names, windows and layouts every part shares; `windows`: the vectorised window arithmetic;
- `definitions` / `repo` / `feature_repo/`: the Feast objects and the repo folder (`feast apply` works there);
- `job` (+ `shuffle`, `partitions`): Delta `events` -> windowed stats and sequence snapshots (Delta) -> Feast online;
- `realtime`: validated events -> the online store within a second; `online`: the serving client;
- `samples` (+ `sample_groups`): point-in-time ranking samples and retrieval sequences.
"""
