"""`python -m bench.models [--quick] [--threads N] [--mfalcon-artifact PATH]`: M-FALCON and training-throughput
benchmarks.

Writes bench/results/models.json; a --quick smoke run writes <tmp>/models_quick.json instead, so it
never overwrites the recorded figures. With --mfalcon-artifact only the M-FALCON comparison runs, on that
trained ranker, and goes to bench/results/models_mfalcon_trained.json (<tmp>/models_mfalcon_trained_quick.json
with --quick).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch

from bench.models import mfalcon, train_throughput
from models.genrank import RankerConfig

RESULTS = Path(__file__).resolve().parents[1] / "results"


def machine(threads: int) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return dict(platform=platform.platform(), cpu=cpu, cpu_count=os.cpu_count(), torch=torch.__version__,
                torch_threads=threads, python=platform.python_version(), device="cpu")


def steady_malloc() -> bool:
    """Keep freed memory in glibc's heap (no mmap, no trim) so that the big [B, H, N, N] attention
    temporaries do not page-fault afresh on every call: without it half the CPU time went to the
    kernel zeroing pages. Production CPU serving gets the same effect from jemalloc/tcmalloc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-4, 0) and libc.mallopt(-1, 1 << 30))  # M_MMAP_MAX, M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m bench.models", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run in seconds")
    # choice: 1 thread by default. On a shared 2-core machine a second OpenMP thread makes every op wait
    # for the busiest core and timings swing by 5x; both sides of every ratio use the same setting.
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1)")
    ap.add_argument("--mfalcon-artifact", metavar="PATH",
                    help="run only the M-FALCON comparison, on this trained ranker artifact (GenRank or HSTU)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    malloc_tuned = steady_malloc()
    torch.manual_seed(0)

    if args.quick:
        cfg = RankerConfig(num_items=1000, num_actions=9, num_tasks=3, num_authors=100, cand_dense_dim=6,
                           max_hist_len=64, d_model=32, num_blocks=2, num_heads=2, d_qk=16, d_v=16,
                           dropout=0.0, head_hidden=32)
        mf = dict(hist_lens=(32, 64), cand_counts=(16, 64), micro_batch=32, baseline_sample=8,
                  baseline_rows=(1, 4), repeats=2)
        tr = dict(batch_size=4, hist_len=32, num_candidates=4, steps=2, repeats=1)
    else:
        # "realistic" size for the CPU: d=128, 3 blocks, 2 heads of 64
        cfg = RankerConfig(num_items=100_000, num_actions=9, num_tasks=3, num_authors=10_000, cand_dense_dim=6,
                           max_hist_len=512, d_model=128, num_blocks=3, num_heads=2, d_qk=64, d_v=64,
                           dropout=0.0, head_hidden=128)
        mf = dict(hist_lens=(128, 512), cand_counts=(64, 256, 1024, 4096), micro_batch=256,
                  baseline_sample=32, baseline_rows=(1, 8), repeats=3)
        tr = dict(batch_size=32, hist_len=256, num_candidates=16, steps=3, repeats=2)

    if args.mfalcon_artifact:
        return trained_mfalcon(args, argv, mf, malloc_tuned)

    print(f"M-FALCON vs one forward per candidate and vs one masked forward of all candidates (float32, "
          f"{args.threads} threads, d={cfg.d_model}, {cfg.num_blocks} blocks, {cfg.num_heads} heads; "
          "n = history events)", flush=True)
    mf_rows = mfalcon.run(cfg, **mf)
    print(mfalcon.table(mf_rows))
    print(baseline_note(mf), flush=True)

    train_cfg = RankerConfig(**{**asdict(cfg), "dropout": 0.2})
    print(f"Training step (forward + backward + Adam), batch {tr['batch_size']}, history {tr['hist_len']} "
          f"events, {tr['num_candidates']} candidates", flush=True)
    tr_rows = train_throughput.run(train_cfg, **tr)
    print(train_throughput.table(tr_rows))

    def pick(model, n, m):
        return next((r for r in mf_rows if (r["model"], r["n"], r["m"]) == (model, n, m)), None)

    head = pick("hstu", 512, 1024)
    head_gr = pick("genrank", 512, 1024)
    by = {r["model"]: r for r in tr_rows}
    result = dict(
        mfalcon_speedup_n512_m1024=head["speedup"] if head else None,
        mfalcon_speedup_n512_m1024_genrank=head_gr["speedup"] if head_gr else None,
        mfalcon_speedup_vs_one_pass_n512_m1024=head["speedup_vs_one_pass"] if head else None,
        **mfalcon.max_diffs(mf_rows),
        genrank_vs_hstu_train_speedup=by["genrank"]["samples_per_s"] / by["hstu"]["samples_per_s"],
        command="python -m " + " ".join(["bench.models", *(argv if argv is not None else sys.argv[1:])]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine={**machine(args.threads), "glibc_malloc_tuned": malloc_tuned},
        notes=("HSTU ranking = research HSTU block with rab and interleaved item/action tokens (2n history "
               "tokens for n events); GenRank = action-oriented tokens + ALiBi (n tokens); both pointwise SiLU "
               "attention through models.kernels (its PyTorch reference path on the CPU), float32, one torch "
               "thread, glibc malloc kept from unmapping. The headline M-FALCON speedup is HSTU ranking at "
               "n=512 events; baseline candidates/s are timed on a sample (best of 1 or 8 rows per forward) "
               "and extrapolated to every m; the one-pass baseline scores all m candidates in one masked "
               "forward, timed and compared (all candidates) at every m; all weights random. Training uses "
               "dropout 0.2 and the same batches for both models."),
        model_config=asdict(cfg),
        mfalcon=dict(settings=mf, rows=mf_rows),
        train_throughput=dict(settings=tr, rows=tr_rows),
    )
    gpu = RESULTS / "models_kernels_gpu.json"
    if gpu.exists():
        result["gpu_kernels"] = json.loads(gpu.read_text())
    out = Path(tempfile.gettempdir()) / "models_quick.json" if args.quick else RESULTS / "models.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list) + "\n")
    print(f"\nM-FALCON speedup (HSTU, n=512, m=1024): {result['mfalcon_speedup_n512_m1024']}")
    print_diffs(result)
    print(f"GenRank / HSTU training samples/s: {result['genrank_vs_hstu_train_speedup']:.2f}x")
    print(f"wrote {out}")
    return result


def print_diffs(result: dict) -> None:
    print(f"max |M-FALCON - baseline|: {result['mfalcon_max_abs_diff']:.2e}")
    one_pass = result["mfalcon_max_abs_diff_vs_one_pass"]
    print(f"max |M-FALCON - one pass|: {one_pass:.2e}" if one_pass is not None
          else "one pass: skipped at every shape (too many tokens)")


def baseline_note(mf: dict) -> str:
    return (f"per-cand c/s: timed on the first {mf['baseline_sample']} candidates (best of {mf['baseline_rows']} "
            "rows per forward), extrapolated to every m; 1-pass: all m candidates in one masked forward\n")


def trained_mfalcon(args, argv: list[str] | None, mf: dict, malloc_tuned: bool) -> dict:
    """The M-FALCON comparison on a trained artifact: random weights could make the differences look
    smaller than the ones a served model has."""
    print(f"M-FALCON vs one forward per candidate and vs one masked forward of all candidates, trained model "
          f"{args.mfalcon_artifact} (float32, {args.threads} threads; n = history events, at most the model's "
          "max_hist_len)", flush=True)
    rows = mfalcon.run(None, **mf, artifact=args.mfalcon_artifact)
    print(mfalcon.table(rows))
    print(baseline_note(mf), flush=True)
    result = dict(
        artifact=args.mfalcon_artifact,
        **mfalcon.max_diffs(rows),
        command="python -m " + " ".join(["bench.models", *(argv if argv is not None else sys.argv[1:])]),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine={**machine(args.threads), "glibc_malloc_tuned": malloc_tuned},
        mfalcon=dict(settings=mf, rows=rows),
    )
    name = "models_mfalcon_trained"
    out = Path(tempfile.gettempdir()) / f"{name}_quick.json" if args.quick else RESULTS / f"{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=list) + "\n")
    print_diffs(result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
