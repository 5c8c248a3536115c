"""Benchmark: Triton HSTU attention vs the PyTorch reference on one CUDA GPU.

    python -m bench.models.kernels            # the table + bench/results/models_kernels_gpu.json
    python -m bench.models.kernels --sweep    # also time launch configs per kernel (for tuning)

bf16, head dim 128, 16 heads, full-length causal sequences (no candidates), batch chosen so every
length processes 16,384 tokens (the GPU stays full at every length). Variants: no bias, and ALiBi.
FLOPs follow the FlashAttention convention for causal attention: forward = 4·B·H·N²·D / 2 (two
matmuls, half the tiles), forward + backward = 3.5 × forward. The reference is timed with the same
FLOP count (it actually computes the full square), so its TFLOP/s is "effective".
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[1] / "results" / "models_kernels_gpu.json"
LENGTHS = (1024, 2048, 4096, 8192)
TOKENS, HEADS, HEAD_DIM = 16384, 16, 128
GOAL_SPEEDUP, GOAL_FWD_TFLOPS = 3.0, 300.0

# Configs the sweep tries, (BLOCK_M, BLOCK_N, num_warps, num_stages); defaults live in the kernel module.
SWEEP = {
    "fwd": [(64, 64, 4, 3), (64, 64, 4, 4), (128, 128, 8, 3), (128, 64, 8, 3), (64, 128, 4, 3),
            (64, 64, 8, 3), (128, 64, 4, 4), (64, 32, 4, 4)],
    "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 2), (64, 64, 4, 4), (128, 32, 4, 4),
           (64, 64, 8, 3)],
    "dkdv": [(32, 64, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (32, 128, 8, 3), (64, 64, 8, 3),
             (64, 64, 4, 4), (32, 32, 4, 4)],
}


def time_ms(fn, min_total_ms: float = 300.0, max_reps: int = 50) -> float:
    """Median milliseconds of `fn` over enough repetitions to cover ~min_total_ms (CUDA events)."""
    fn()  # warm-up: compilation, autotuning caches, allocator
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    reps = int(min(max_reps, max(3, min_total_ms / max(start.elapsed_time(end), 1e-3))))
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def make_inputs(n: int, alibi: bool):
    b = max(1, TOKENS // n)
    gen = torch.Generator(device="cuda").manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_()

    q, k, v = rnd(b, n, HEADS, HEAD_DIM), rnd(b, n, HEADS, HEAD_DIM), rnd(b, n, HEADS, HEAD_DIM)
    kwargs = dict(lengths=torch.full((b,), n, device="cuda", dtype=torch.int32),
                  attn_scale=HEAD_DIM ** -0.5, inv_n=1.0 / n)
    if alibi:
        kwargs["alibi_slopes"] = torch.tensor([2.0 ** (-8 * (i + 1) / HEADS) for i in range(HEADS)],
                                              device="cuda")
    return b, q, k, v, kwargs


def measure(attn, q, k, v, kwargs):
    """(forward ms, forward + backward ms, output) for one implementation; None on OOM."""
    dout = torch.randn_like(q)
    try:
        with torch.no_grad():
            out = attn(q, k, v, **kwargs)
            fwd = time_ms(lambda: attn(q, k, v, **kwargs))
        both = time_ms(lambda: torch.autograd.grad(attn(q, k, v, **kwargs), (q, k, v), dout))
        return fwd, both, out
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        torch.cuda.empty_cache()


def tflops(ms, b, n, mult=1.0):
    if ms is None:
        return None
    return mult * 4.0 * b * HEADS * n * n * HEAD_DIM / 2 / (ms * 1e-3) / 1e12


def run_table(impl, ref):
    rows = []
    for alibi in (False, True):
        for n in LENGTHS:
            b, q, k, v, kwargs = make_inputs(n, alibi)
            got = measure(impl, q, k, v, kwargs)
            want = measure(ref, q, k, v, kwargs)
            row = dict(variant="alibi" if alibi else "causal", n=n, batch=b, heads=HEADS, head_dim=HEAD_DIM)
            row["kernel_fwd_ms"], row["kernel_fwd_bwd_ms"] = (got[0], got[1]) if got else (None, None)
            row["ref_fwd_ms"], row["ref_fwd_bwd_ms"] = (want[0], want[1]) if want else (None, None)
            row["ref_status"] = "ok" if want else "OOM"
            row["kernel_fwd_tflops"] = tflops(row["kernel_fwd_ms"], b, n)
            row["kernel_fwd_bwd_tflops"] = tflops(row["kernel_fwd_bwd_ms"], b, n, 3.5)
            row["ref_fwd_tflops"] = tflops(row["ref_fwd_ms"], b, n)
            row["ref_fwd_bwd_tflops"] = tflops(row["ref_fwd_bwd_ms"], b, n, 3.5)
            both = got is not None and want is not None
            row["fwd_speedup"] = row["ref_fwd_ms"] / row["kernel_fwd_ms"] if both else None
            row["fwd_bwd_speedup"] = row["ref_fwd_bwd_ms"] / row["kernel_fwd_bwd_ms"] if both else None
            if got and want:  # sanity: the timed kernel computes the same thing (bf16 rounding)
                diff = (got[2].float() - want[2].float()).abs().max().item()
                row["max_rel_err_vs_ref"] = diff / max(want[2].float().abs().max().item(), 1e-6)
            rows.append(row)
            print_row(row)
            del q, k, v, got, want
            torch.cuda.empty_cache()
    return rows


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


HEADER = (f"{'variant':8} {'N':>5} {'B':>3} | {'fwd ms':>8} {'ref ms':>8} {'x':>6} {'TFLOP/s':>8} | "
          f"{'f+b ms':>8} {'ref ms':>8} {'x':>6} {'TFLOP/s':>8}")


def print_row(r):
    print(f"{r['variant']:8} {r['n']:>5} {r['batch']:>3} | "
          f"{fmt(r['kernel_fwd_ms']):>8} {fmt(r['ref_fwd_ms']):>8} "
          f"{fmt(r['fwd_speedup']):>6} {fmt(r['kernel_fwd_tflops'], '.0f'):>8} | "
          f"{fmt(r['kernel_fwd_bwd_ms']):>8} {fmt(r['ref_fwd_bwd_ms']):>8} {fmt(r['fwd_bwd_speedup']):>6} "
          f"{fmt(r['kernel_fwd_bwd_tflops'], '.0f'):>8}", flush=True)


def _sweep_length(kern, impl, n, results):
    """{kernel: {config: ms}} at length n for every SWEEP config (failures are left out)."""
    _, q, k, v, kwargs = make_inputs(n, alibi=False)
    dout = torch.randn_like(q)

    def forward():
        with torch.no_grad():
            impl(q, k, v, **kwargs)

    def forward_backward():
        torch.autograd.grad(impl(q, k, v, **kwargs), (q, k, v), dout)

    times = {}
    for name, configs in SWEEP.items():
        for cfg in configs:
            kern.CONFIG_OVERRIDE.clear()
            kern.CONFIG_OVERRIDE[name] = cfg
            try:
                ms = time_ms(forward if name == "fwd" else forward_backward, min_total_ms=100)
                times.setdefault(name, {})[cfg] = ms
                res = round(ms, 3)
            except Exception as exc:  # out of shared memory / registers, or a compile error
                res = f"fail: {type(exc).__name__}"
            results[f"n={n} {name} {cfg}"] = res
            unit = "" if isinstance(res, str) else " ms (fwd+bwd)" if name != "fwd" else " ms"
            print(f"sweep n={n} {name} {cfg}: {res}{unit}", flush=True)
    kern.CONFIG_OVERRIDE.clear()
    return times


def sweep(kern, impl, lengths=(1024, 8192)):
    """Time each candidate config of one kernel (others at their defaults) at a short and a long
    length; return the timings and, per kernel, the config with the lowest summed time relative to
    the best at each length."""
    results, rel = {}, {}
    for n in lengths:
        for name, by_cfg in _sweep_length(kern, impl, n, results).items():
            best = min(by_cfg.values())
            for cfg, ms in by_cfg.items():
                rel.setdefault(name, {}).setdefault(cfg, []).append(ms / best)
        torch.cuda.empty_cache()
    chosen = {name: min((c for c in by_cfg if len(by_cfg[c]) == len(lengths)), key=lambda c: sum(by_cfg[c]))
              for name, by_cfg in rel.items()}
    return results, chosen


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sweep", action="store_true", help="also time launch configs (tuning)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench.models.kernels needs a CUDA GPU (torch.cuda.is_available() is False); "
                         "nothing was measured.")

    import triton

    from models.kernels import hstu_attention, hstu_attention_reference
    from models.kernels import triton_hstu_attention as kern

    def impl(q, k, v, **kw):
        return hstu_attention(q, k, v, backend="triton", **kw)

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    print(f"bf16, {HEADS} heads, head dim {HEAD_DIM}, {TOKENS} tokens per batch, causal, no candidates")
    sweep_results = None
    if args.sweep:
        sweep_results, tuned = sweep(kern, impl)
        kern.CONFIG_OVERRIDE.update(tuned)  # the table below runs with the tuned configs
        print(f"tuned configs (BLOCK_M, BLOCK_N, num_warps, num_stages): {tuned}")
    print(HEADER)
    rows = run_table(impl, hstu_attention_reference)

    ok = [r for r in rows if r["fwd_speedup"] is not None]
    summary = dict(
        min_fwd_speedup=min((r["fwd_speedup"] for r in ok), default=None),
        min_fwd_bwd_speedup=min((r["fwd_bwd_speedup"] for r in ok), default=None),
        max_kernel_fwd_tflops=max(r["kernel_fwd_tflops"] for r in rows if r["kernel_fwd_tflops"]),
        goal_speedup=GOAL_SPEEDUP,
        goal_fwd_tflops=GOAL_FWD_TFLOPS,
    )
    min_speedup = summary["min_fwd_speedup"]
    summary["speedup_goal_met"] = min_speedup is not None and min_speedup >= GOAL_SPEEDUP
    summary["tflops_goal_met"] = summary["max_kernel_fwd_tflops"] >= GOAL_FWD_TFLOPS
    report = dict(
        machine=torch.cuda.get_device_name(),
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        command="python -m bench.models.kernels" + (" " + " ".join(sys.argv[1:]) if sys.argv[1:] else ""),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype="bfloat16",
        setup=dict(tokens_per_batch=TOKENS, heads=HEADS, head_dim=HEAD_DIM, mask="causal, full lengths",
                   attn_scale=1 / math.sqrt(HEAD_DIM), inv_n="1/N"),
        flops="forward 4*B*H*N*N*D/2; forward+backward 3.5x that (same count for the reference)",
        timing="median of CUDA-event timings after one warm-up call",
        launch_configs={f"{key[0]} {key[1]} d={key[2]}/{key[3]}": key[4][idx]
                        for key, idx in kern._chosen.items()},
        results=rows,
        summary=summary,
    )
    if sweep_results is not None:
        report["sweep"] = sweep_results
        report["launch_configs"] = {name: list(cfg) for name, cfg in kern.CONFIG_OVERRIDE.items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(summary))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
