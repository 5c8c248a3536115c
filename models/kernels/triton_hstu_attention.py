"""Triton kernels for HSTU / GenRank pointwise SiLU attention (forward and backward).

Computes exactly `models.kernels.reference.hstu_attention_reference`:

    S   = attn_scale * q kᵀ + bias - slope_h * |pos_i - pos_j|
    A   = SiLU(S) * inv_n * mask            # causal history + target-aware candidates
    out = A v                               # rows at or past `length` are zero

Design (why it looks like this; the device code is in `triton_hstu_kernels.py`):
- One program per (query block, head, batch) for the forward and for dq, one program per (key block,
  head, batch) for dk / dv (and dbias). dq gets its own kernel instead of atomics in the dk/dv kernel:
  it recomputes S and dA (2 extra matmuls of 7) but is deterministic and needs no fp32 scratch.
- Pointwise attention needs no running max / row sum (no softmax), so there is no "lse" to save and
  no preprocessing pass in the backward: the forward saves only its inputs.
- Block sparsity: for a query block the kernel walks three key ranges: tiles that every row of the
  block fully sees (no mask work at all), the masked history tiles at the diagonal, and the masked
  diagonal tiles among candidates. Tiles that the mask empties (above the diagonal, past `length`,
  candidate-vs-other-candidate) are never loaded. The dk/dv kernel walks the transposed ranges.
- Inputs are loaded in their own dtype (bf16 / fp16 go to the tensor cores), every score and
  accumulator is fp32, and fp32 inputs use 3xTF32 (CUDA) or IEEE (interpreter) dots so they match
  the fp32 reference (never plain TF32).
- Only basic Triton APIs (pointer arithmetic, tl.dot, tl.trans, constexpr branches) so the same
  code runs on Triton 3.6 (CUDA) and 3.9 (TRITON_INTERPRET=1 on CPU).
"""

from __future__ import annotations

import os

import torch
import triton
from triton.runtime.errors import OutOfResources

from models.kernels.triton_hstu_kernels import _hstu_bwd_dkdv_kernel, _hstu_bwd_dq_kernel, _hstu_fwd_kernel

# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------

# Tile sizes / warps / pipeline stages per kernel, tried in order until one compiles within the
# GPU's shared memory; the first that works is remembered per (kernel, dtype, head dims).
# Tuned on an H100 (see bench/models/kernels.py --sweep). CONFIG_OVERRIDE lets the benchmark's
# sweep force one config: {"fwd" | "dq" | "dkdv": (BLOCK_M, BLOCK_N, num_warps, num_stages)}.
_GPU_CONFIGS = {
    "fwd": [(128, 128, 8, 3), (64, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 1),
            (32, 32, 4, 1)],
    "dq": [(128, 64, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 1),
           (32, 32, 4, 1)],
    "dkdv": [(32, 64, 4, 3), (64, 128, 8, 3), (64, 128, 8, 2), (64, 64, 4, 2), (32, 64, 4, 1),
             (32, 32, 4, 1)],
}
# fp32 tiles are twice as large and use IEEE dots (no tensor cores): start smaller.
_GPU_CONFIGS_FP32 = {
    "fwd": [(64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
    "dq": [(64, 64, 4, 2), (64, 32, 4, 1), (32, 32, 4, 1)],
    "dkdv": [(64, 64, 4, 2), (32, 64, 4, 1), (32, 32, 4, 1)],
}
# The CPU interpreter runs every program serially in numpy: small tiles keep tests fast (tests
# also set unequal tiles here to exercise the range logic with BLOCK_M != BLOCK_N).
INTERPRET_CONFIG = (16, 16, 1, 1)
CONFIG_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}
_chosen: dict[tuple, int] = {}
_FP32_CUDA_PRECISION = ["tf32x3"]  # becomes "ieee" if this Triton cannot compile 3xTF32 dots


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def _launch(name, kernel, grid_fn, args, constexprs, dtype, dqk, dv):
    """Launch `kernel` with the first config that fits; remember it for these shapes."""
    if interpreter_enabled():
        candidates = [INTERPRET_CONFIG]
    elif name in CONFIG_OVERRIDE:
        candidates = [CONFIG_OVERRIDE[name]]
    else:
        candidates = (_GPU_CONFIGS_FP32 if dtype == torch.float32 else _GPU_CONFIGS)[name]
    key = (name, dtype, dqk, dv, tuple(candidates))
    idx = _chosen.get(key, 0)
    error = None
    while idx < len(candidates):
        block_m, block_n, warps, stages = candidates[idx]
        try:
            kernel[grid_fn(block_m, block_n)](
                *args, **constexprs, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps, num_stages=stages
            )
        except OutOfResources as exc:  # too much shared memory: smaller tiles
            error = exc
            idx += 1
            continue
        except Exception:
            # 3xTF32 is only a speed choice for fp32 inputs; a Triton that cannot build it gets IEEE.
            if constexprs.get("PRECISION") != "tf32x3":
                raise
            _FP32_CUDA_PRECISION[0] = "ieee"
            constexprs = dict(constexprs, PRECISION="ieee")
            continue
        _chosen[key] = idx
        return
    raise RuntimeError(f"no launch config fits for {name}") from error


def _dot_precision(t: torch.Tensor) -> str | None:
    """fp32 inputs must match the fp32 reference, so never plain TF32 (10-bit mantissa). On CUDA,
    3xTF32 (error ~1e-6, tensor cores) instead of IEEE FMA dots, which at head dim 128 spill registers
    and take minutes to compile. bf16 / fp16: the default tensor-core dot."""
    if t.dtype != torch.float32:
        return None
    return _FP32_CUDA_PRECISION[0] if t.is_cuda else "ieee"


# ---------------------------------------------------------------------------------------------
# Host wrappers
# ---------------------------------------------------------------------------------------------


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))  # tl.dot needs >= 16 on every tile dimension


def _strides3(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, position, head) strides of a [B, N, H, D] tensor whose last dim is contiguous."""
    return t.stride(0), t.stride(1), t.stride(2)


def _prepare(q, k, v, lengths, num_candidates, bias, alibi_slopes, position_ids):
    b, n, h, _ = q.shape
    if k.shape[:3] != (b, n, h) or v.shape[:3] != (b, n, h) or k.shape[3] != q.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
    dev = q.device
    lengths_i = lengths.to(device=dev, dtype=torch.int32).contiguous()
    if num_candidates is None:
        cand_i = torch.zeros_like(lengths_i)
    else:
        cand_i = num_candidates.to(device=dev, dtype=torch.int32).contiguous()
    if alibi_slopes is not None:
        slopes = alibi_slopes.detach().to(device=dev, dtype=torch.float32).contiguous()
    else:
        slopes = lengths_i  # never read (HAS_ALIBI is False); any pointer will do
    if alibi_slopes is not None and position_ids is not None:
        pos_dtype = torch.float32 if position_ids.is_floating_point() else torch.int32
        pos = position_ids.to(device=dev, dtype=pos_dtype).expand(b, n)
        pos_strides = (pos.stride(0), pos.stride(1))
    else:
        pos, pos_strides = lengths_i, (0, 0)
    if bias is not None:
        bias_e = bias.expand(b, h, n, n)  # a view: broadcast dims get stride 0, no copy
        bias_strides = tuple(bias_e.stride())
    else:
        bias_e, bias_strides = q, (0, 0, 0, 0)
    return lengths_i, cand_i, slopes, pos, pos_strides, bias_e, bias_strides


def _contig_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class HSTUAttentionFunction(torch.autograd.Function):
    """Autograd wrapper: forward and backward in Triton. Gradients for q, k, v and a dense bias;
    lengths, candidates, ALiBi slopes and positions are constants (no gradient)."""

    @staticmethod
    def forward(ctx, q, k, v, lengths, num_candidates, bias, alibi_slopes, position_ids, attn_scale, inv_n):
        q, k, v = _contig_last(q), _contig_last(k), _contig_last(v)
        bsz, n, h, dqk = q.shape
        dv = v.shape[3]
        lengths_i, cand_i, slopes, pos, pos_strides, bias_e, bias_strides = _prepare(
            q, k, v, lengths, num_candidates, bias, alibi_slopes, position_ids
        )
        out = torch.empty(bsz, n, h, dv, device=q.device, dtype=q.dtype)
        flags = dict(
            HAS_BIAS=bias is not None,
            HAS_ALIBI=alibi_slopes is not None,
            HAS_POS=alibi_slopes is not None and position_ids is not None,
            BLOCK_DQK=_block_d(dqk),
            BLOCK_DV=_block_d(dv),
            PRECISION=_dot_precision(q),
        )
        args = (
            q, k, v, out, bias_e, slopes, pos, lengths_i, cand_i,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out),
            *bias_strides, *pos_strides, n, float(attn_scale), float(inv_n), dqk, dv,
        )
        _launch("fwd", _hstu_fwd_kernel, lambda bm, bn: (triton.cdiv(n, bm), h, bsz), args, flags,
                q.dtype, dqk, dv)
        ctx.save_for_backward(q, k, v, lengths_i, cand_i, bias_e if bias is not None else None, slopes, pos)
        ctx.flags = flags
        ctx.meta = (pos_strides, bias_strides, float(attn_scale), float(inv_n))
        ctx.bias_shape = None if bias is None else bias.shape
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, lengths_i, cand_i, bias_e, slopes, pos = ctx.saved_tensors
        pos_strides, bias_strides, attn_scale, inv_n = ctx.meta
        flags = ctx.flags
        bsz, n, h, dqk = q.shape
        dv_dim = v.shape[3]
        dout = _contig_last(dout.to(q.dtype))
        need_dbias = ctx.bias_shape is not None and ctx.needs_input_grad[5]
        bias_arg = bias_e if bias_e is not None else q

        dq = dk = dv = dbias = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(q)
            args = (
                q, k, v, dout, dq, bias_arg, slopes, pos, lengths_i, cand_i,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout), *_strides3(dq),
                *bias_strides, *pos_strides, n, attn_scale, inv_n, dqk, dv_dim,
            )
            _launch("dq", _hstu_bwd_dq_kernel, lambda bm, bn: (triton.cdiv(n, bm), h, bsz), args, flags,
                    q.dtype, dqk, dv_dim)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2] or need_dbias:
            dk = torch.empty_like(k)
            dv = torch.empty_like(v)
            # Full [B, H, N, N] fp32 dS; zeros where tiles are skipped (their dS is 0 by the mask).
            dbias_full = torch.zeros(bsz, h, n, n, device=q.device, dtype=torch.float32) if need_dbias else q
            dbias_strides = tuple(dbias_full.stride()) if need_dbias else (0, 0, 0, 0)
            args = (
                q, k, v, dout, dk, dv, dbias_full, bias_arg, slopes, pos, lengths_i, cand_i,
                *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(dout),
                *_strides3(dk), *_strides3(dv),
                *bias_strides, *dbias_strides, *pos_strides, n, attn_scale, inv_n, dqk, dv_dim,
            )
            _launch("dkdv", _hstu_bwd_dkdv_kernel, lambda bm, bn: (triton.cdiv(n, bn), h, bsz), args,
                    dict(flags, STORE_DBIAS=need_dbias), q.dtype, dqk, dv_dim)
            if need_dbias:
                dbias = dbias_full.sum_to_size(ctx.bias_shape).to(ctx.bias_dtype)
        return dq, dk, dv, None, None, dbias, None, None, None, None


def hstu_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    lengths: torch.Tensor,
    num_candidates: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    alibi_slopes: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    attn_scale: float = 1.0,
    inv_n: float = 1.0,
) -> torch.Tensor:
    """Triton version of `hstu_attention_reference` (same arguments, same result)."""
    if not q.is_cuda and not interpreter_enabled():
        raise RuntimeError(
            "the Triton HSTU kernel needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
            "imported to run on CPU (slow; for tests)"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:  # like the reference, compute as q's dtype
        k, v = k.to(q.dtype), v.to(q.dtype)
    return HSTUAttentionFunction.apply(
        q, k, v, lengths, num_candidates, bias, alibi_slopes, position_ids, attn_scale, inv_n
    )
