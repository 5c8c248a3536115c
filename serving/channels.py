"""Multi-channel retrieval: the candidate lists of several retrieval channels merged into the one list the
ranker sees, each channel with a quota (`retrieval.channels`, config/schema.py).

Channels, as production systems run them: "generative" (the NEZHA retriever, semantic IDs), "dense" (a
SASRec-class model, exact top-k over the item table: at 10-20k items a matmul is cheaper than any approximate
index) and "trending" (engagement over the features' window; also what a cold user gets). The merge: channels in
config order each take up to their quota of items not taken yet; if duplicates or short lists leave the total
under `k`, the channels continue down their lists in the same order until `k` or every list is used up. Each
candidate keeps the channel that contributed it.

>>> merge_channels({"generative": [5, 7, 9], "dense": [7, 3, 8], "trending": [1, 5, 2]},
...                {"generative": 2, "dense": 2, "trending": 1}, k=5)
[(5, 'generative'), (7, 'generative'), (3, 'dense'), (8, 'dense'), (1, 'trending')]
>>> merge_channels({"generative": [5], "dense": [5, 6, 4]}, {"generative": 2, "dense": 1}, k=3)
[(5, 'generative'), (6, 'dense'), (4, 'dense')]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import get_args

from config.schema import RetrievalChannel

CHANNELS: tuple[str, ...] = get_args(RetrievalChannel)


def merge_channels(lists: Mapping[str, Sequence[int]], quotas: Mapping[str, int],
                   k: int) -> list[tuple[int, str]]:
    """Up to `k` distinct (item, channel) pairs, best first within each channel's share (see the module doc).

    `quotas` fixes the order and the shares; a channel missing from `lists` (unavailable) contributes nothing,
    and its share goes to the others through the fill.
    """
    unknown = set(quotas) - set(CHANNELS)
    if unknown:
        raise ValueError(f"unknown retrieval channel(s) {sorted(unknown)}; expected some of {CHANNELS}")
    if k < 0 or any(q < 0 for q in quotas.values()):
        raise ValueError("k and every channel quota must be >= 0")
    taken: dict[int, str] = {}
    cursor = dict.fromkeys(quotas, 0)

    def take(name: str, limit: int) -> None:
        items, added = lists.get(name) or (), 0
        while cursor[name] < len(items) and added < limit and len(taken) < k:
            item = int(items[cursor[name]])
            cursor[name] += 1
            if item not in taken:
                taken[item] = name
                added += 1

    for name, quota in quotas.items():
        take(name, quota)
    for name in quotas:  # the fill: shares left by duplicates and short or missing lists
        take(name, k)
    return list(taken.items())


def merge_candidates(channel_lists: Mapping[str, tuple[Sequence[int], Sequence[float]]],
                     trending: Sequence[tuple[int, float]], exclude: set[int], quotas: Mapping[str, int],
                     n: int) -> tuple[list[int], list[float], list[str]]:
    """The request's n candidates: retrieved channel lists ({name: (items, scores)}) plus the trending list
    (seen items left out), merged by `merge_channels`. Returns items, each item's score in its own channel
    (channels' scores are not comparable: the ranker orders them) and the channel of each.

    >>> merge_candidates({"generative": ([4, 5], [-0.1, -0.2])}, [(9, 3.0), (4, 2.0)], {9},
    ...                  {"generative": 1, "trending": 1}, n=3)
    ([4, 5], [-0.1, -0.2], ['generative', 'generative'])
    """
    lists = {name: list(items) for name, (items, _) in channel_lists.items()}
    lists["trending"] = [i for i, _ in trending if i not in exclude]
    score = {(name, int(i)): float(s) for name, (items, scores) in channel_lists.items()
             for i, s in zip(items, scores)}
    score.update({("trending", int(i)): float(s) for i, s in trending})
    merged = merge_channels(lists, quotas, n)
    return [i for i, _ in merged], [score[(c, i)] for i, c in merged], [c for _, c in merged]
