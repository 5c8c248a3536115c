"""Decoder latency at a dataset's shape: NEZHA vs backbone beam search, prefix table vs per-expansion probes.

    python -m bench.decoders              # Beauty's shape, the configured codes: 256 balanced clusters + item head
    python -m bench.decoders --levels 3 --no-item-head --no-balanced      # the earlier shape: 3 x 256 codes
    python -m bench.decoders --items 17000 --requests 100
    python -m bench.decoders --k 200 --exclude-history --sizes "" --out bench/results/decoders_serving.json  # serving

Latency depends on the model's shape (items, codebooks, width, depth, beam), not on its training, so this times
an untrained NEZHA retriever (HSTU backbone, the configured draft cell and item head) with random distinct
semantic IDs (the configured number of levels of 256 codes, balanced or not, plus a collision code) over random
histories: a quick, quiet-machine companion to
`bench/retrieval.py`, whose quality figures need the trained models. Per decoder (verified every step): mean ms
per `retrieve` call at batch 1 and batch 32 (one torch thread, k=10 unless `--k`, beam 20; every variant below
takes its turn on the same histories). Verification is done two ways in the same run: the prefix table, one
gather per beam (`SemanticIdIndex.extend`, what the decoders use), and the baseline that probes a hash set of
valid prefixes once per (beam, code) expansion. With the item head, its last level is also read per beam
(`per_beam_rows`, the training path) against once per distinct prefix (what decoding uses). NEZHA's prompt pass
alone (the backbone over the history and its placeholders) is timed beside them: beam search's time over it is
the most NEZHA could be faster at this shape if its draft levels and verification cost nothing
(`bound_if_decoding_were_free_b1/b32`). Then the NEZHA vs beam search ratio, and that bound, for larger
backbones (`--sizes`, d_model x blocks), since both grow with a backbone step's cost.
Writes bench/results/decoders.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from unittest import mock

import numpy as np
import torch

from config.schema import GenerativeRetrieverConfig
from models import nezha
from models.nezha import NezhaConfig, NezhaRetriever
from models.semantic_ids import IntHashSet, SemanticIdIndex, prefix_values, radix_products, with_collision_code

RESULTS = Path(__file__).resolve().parent / "results" / "decoders.json"
DEFAULTS = GenerativeRetrieverConfig()


def probe_every_expansion(self: SemanticIdIndex, level: int, rows: torch.Tensor) -> torch.Tensor:
    """The baseline for `SemanticIdIndex.extend`: the integer of every (beam, code) expansion looked up in a
    hash set of the valid prefixes of level + 1 codes (payload: the prefix's row), W x T lookups per level."""
    if not hasattr(self, "_probe_sets"):  # per level: row -> prefix integer, and the next level's hash set
        self._probe_sets = []
        for lv in range(len(self.radices)):
            full = self.item_values[1:]
            here = torch.unique(prefix_values(full, self.radices, lv))
            nxt = prefix_values(full, self.radices, lv + 1)
            keys, nrow = torch.unique(nxt, return_inverse=True) if lv + 1 < len(self.radices) else (nxt, None)
            payload = torch.arange(len(keys)) if nrow is not None else torch.arange(1, len(full) + 1)
            self._probe_sets.append((here, IntHashSet(keys, payload=payload)))
    here, valid = self._probe_sets[level]
    weight = radix_products(self.radices)[level]
    expansions = here[rows.clamp(min=0)][..., None] + torch.arange(self.radices[level]) * weight
    return valid.get(expansions).masked_fill((rows < 0)[..., None], -1)


def model_of_shape(items: int, codebook: int, levels: int, seed: int, d_model: int = 64, blocks: int = 2,
                   draft_cell: str = DEFAULTS.draft_cell, item_head: bool = DEFAULTS.item_head,
                   balanced: bool = DEFAULTS.balanced) -> NezhaRetriever:
    g = torch.Generator().manual_seed(seed)
    if balanced:  # every code used by ceil(items / codebook) items or one fewer, as balanced k-means leaves them
        raw = torch.stack([torch.randperm(items, generator=g) % codebook for _ in range(levels)], dim=1)
    else:
        raw = torch.randint(codebook, (items, levels), generator=g)
    codes = with_collision_code(raw)
    radices = (codebook,) * levels + (int(codes[:, -1].max()) + 1,)
    cfg = NezhaConfig(num_items=items, codebook_sizes=radices, dropout=0.0, d_model=d_model, num_blocks=blocks,
                      num_heads=max(d_model // 32, 2), draft_cell=draft_cell, item_head=item_head)
    model = NezhaRetriever(cfg).eval()
    model.set_semantic_ids(torch.cat([codes.new_zeros(1, levels + 1), codes]))
    return model


def time_calls(model: NezhaRetriever, calls: dict, batch: int, requests: int, seed: int) -> dict[str, float]:
    """Mean ms of each of `calls` ({name: (patch factory, call(history, lengths, seen))}) over the same `requests`
    batches of `batch` random 50-item histories, after 3 warm-up rounds; `seen` (each history's items as a set) is
    made before the clock starts. The calls take turns on each batch, in an order that rotates, so a drift in the
    machine's speed reaches them all alike."""
    g = torch.Generator().manual_seed(seed)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(requests + 3):
        hist = torch.randint(1, model.cfg.num_items + 1, (batch, model.cfg.max_history), generator=g)
        lengths = torch.full((batch,), model.cfg.max_history)
        seen = [set(h.tolist()) for h in hist]
        for name in names[i % len(names):] + names[:i % len(names)]:
            patch, call = calls[name]
            with patch():
                t0 = time.perf_counter()
                call(hist, lengths, seen)
                if i >= 3:
                    times[name].append((time.perf_counter() - t0) * 1000)
    return {name: float(np.mean(t)) for name, t in times.items()}


def decoding(model: NezhaRetriever, decoder: str, k: int = 10, exclude_history: bool = False):
    """A `retrieve` call of top-k; with `exclude_history` each request excludes its history, as serving does."""
    def call(hist, lengths, seen):
        exclude = seen if exclude_history else None
        return model.retrieve(hist, lengths, k, decoder=decoder, verify="step", exclude=exclude)
    return call


def prompt_pass(model: NezhaRetriever):
    """NEZHA's backbone pass over the history and its placeholders: what a NEZHA call costs if its draft levels
    and verification were free (beam search's prefill is the same pass without the placeholders)."""
    return lambda hist, lengths, seen: model.prompt_states(model.item_tokens(hist), lengths)


def time_batches(model: NezhaRetriever, calls: dict, requests: int, seed: int) -> dict[str, dict[str, float]]:
    """{name: {"ms_b1", "ms_b32"}}: `requests` rounds at batch 1, a fifth as many (at least 5) at batch 32."""
    rows: dict[str, dict[str, float]] = {name: {} for name in calls}
    with torch.no_grad():
        for b in (1, 32):
            for name, ms in time_calls(model, calls, b, requests if b == 1 else max(requests // 5, 5), seed).items():
                rows[name][f"ms_b{b}"] = round(ms, 3)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=12101, help="catalogue size (Beauty: 12,101)")
    parser.add_argument("--codebook", type=int, default=256)
    parser.add_argument("--levels", type=int, default=len(DEFAULTS.codebooks),
                        help="code levels before the collision code")
    parser.add_argument("--item-head", action=argparse.BooleanOptionalAction, default=DEFAULTS.item_head,
                        help="the last level scored by the items' own rows (the configured default)")
    parser.add_argument("--balanced", action=argparse.BooleanOptionalAction, default=DEFAULTS.balanced,
                        help="codes used equally often, as balanced k-means leaves them (the configured default)")
    parser.add_argument("--requests", type=int, default=50, help="timed calls per decoder and batch size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sizes", default="64x2,128x4,256x4,512x8",
                        help="backbones (d_model x blocks) for the speed-up vs size sweep; empty: skip it")
    parser.add_argument("--k", type=int, default=10, help="items per request (serving asks the channel for 200)")
    parser.add_argument("--exclude-history", action="store_true",
                        help="each request excludes its history's items, as serving does")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as a serving replica runs it
    shape = {"item_head": args.item_head, "balanced": args.balanced}
    model = model_of_shape(args.items, args.codebook, args.levels, args.seed, **shape)
    # The baselines of the same run: verification by a hash-set probe per expansion instead of the prefix table,
    # and (item head) the last level's item rows read per beam instead of once per distinct prefix.
    patches = {"table": contextlib.nullcontext,
               "probe": lambda: mock.patch.object(SemanticIdIndex, "extend", probe_every_expansion)}
    if args.item_head:
        patches["per_beam_rows"] = lambda: mock.patch.object(nezha, "_item_logits_per_prefix", lambda *a: None)
    calls = {f"{decoder}_{check}": (patch, decoding(model, decoder, args.k, args.exclude_history))
             for check, patch in patches.items() for decoder in ("nezha", "beam")}
    calls["nezha_prompt_pass"] = (contextlib.nullcontext, prompt_pass(model))
    rows = time_batches(model, calls, args.requests, args.seed)
    for name, row in rows.items():
        print(f"{name:24s} {row}", flush=True)
    speedup = {}
    for b in (1, 32):
        beam = rows["beam_table"][f"ms_b{b}"]
        speedup[f"nezha_vs_beam_b{b}"] = round(beam / rows["nezha_table"][f"ms_b{b}"], 2)
        # The most NEZHA could gain at this shape: its own prompt pass is a floor under its time.
        speedup[f"bound_if_decoding_were_free_b{b}"] = round(beam / rows["nezha_prompt_pass"][f"ms_b{b}"], 2)
    for d in ("nezha", "beam"):
        for b in (1, 32):
            probe, table = rows[f"{d}_probe"][f"ms_b{b}"], rows[f"{d}_table"][f"ms_b{b}"]
            speedup[f"table_vs_probe_{d}_b{b}"] = round(probe / table, 2)
            if args.item_head:
                per_beam = rows[f"{d}_per_beam_rows"][f"ms_b{b}"]
                speedup[f"prefix_rows_vs_per_beam_rows_{d}_b{b}"] = round(per_beam / table, 2)
    # The speed-up vs backbone size: NEZHA saves L-1 cached backbone steps per request, so the ratio grows
    # with what a backbone step costs; the default shape above is the one the benchmarks train.
    scaling = []
    for size in filter(None, args.sizes.split(",")):
        d, blocks = (int(v) for v in size.split("x"))
        sized = model_of_shape(args.items, args.codebook, args.levels, args.seed, d_model=d, blocks=blocks, **shape)
        row = {"d_model": d, "blocks": blocks, "parameters": sum(p.numel() for p in sized.parameters())}
        sized_calls = {"nezha": (contextlib.nullcontext, decoding(sized, "nezha", args.k, args.exclude_history)),
                       "beam": (contextlib.nullcontext, decoding(sized, "beam", args.k, args.exclude_history)),
                       "prompt": (contextlib.nullcontext, prompt_pass(sized))}
        for name, times in time_batches(sized, sized_calls, args.requests, args.seed).items():
            row.update({f"{name}_{k}": v for k, v in times.items()})
        for b in (1, 32):
            row[f"speedup_b{b}"] = round(row[f"beam_ms_b{b}"] / row[f"nezha_ms_b{b}"], 2)
            row[f"bound_b{b}"] = round(row[f"beam_ms_b{b}"] / row[f"prompt_ms_b{b}"], 2)
        scaling.append(row)
        print(f"backbone {size}: {row}", flush=True)
    out = {"command": "python -m bench.decoders " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "date": datetime.now(UTC).isoformat(timespec="seconds"), "items": args.items,
           "radices": list(model.cfg.codebook_sizes), **shape, "beam": model.cfg.beam_size, "k": args.k,
           "exclude_history": args.exclude_history, "history": 50,
           "torch_threads": 1, "decoders": rows, "speedups": speedup,
           "backbone_scaling": scaling}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(speedup, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
