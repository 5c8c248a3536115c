"""Attention kernels for HSTU / GenRank, behind one dispatcher.

`hstu_attention` has the reference's keyword signature plus `backend`:
- "reference": the plain PyTorch ground truth (`reference.hstu_attention_reference`), any device;
- "triton": the fused Triton kernels (forward + backward), CUDA tensors, or CPU tensors when
  TRITON_INTERPRET=1 was set before triton was imported (slow; that is how the CPU tests run it);
- None (auto): Triton for CUDA tensors when triton imports and the head dims fit (<= 256),
  else the reference.
Precedence: the `backend` argument, then the HSTU_ATTENTION_BACKEND environment variable
("reference" / "triton" / "auto"), then auto.

Triton is imported lazily, on the first call that wants it, so importing this package never fails
on a machine without triton or without a GPU driver.
"""

from __future__ import annotations

import os

import torch

from models.kernels.reference import hstu_attention_reference

__all__ = ["hstu_attention", "hstu_attention_reference", "resolve_backend", "triton_available"]

_BACKENDS = ("auto", "reference", "triton")
_MAX_TRITON_HEAD_DIM = 256  # beyond this a tile row no longer fits in registers / shared memory
_triton_impl = None  # the imported kernel module, or False when the import failed


def _load_triton():
    """Import the Triton kernel module once; False if triton is missing or broken."""
    global _triton_impl
    if _triton_impl is None:
        try:
            from models.kernels import triton_hstu_attention
        except Exception:  # ImportError, or a triton build that fails at import time
            _triton_impl = False
        else:
            _triton_impl = triton_hstu_attention
    return _triton_impl


def triton_available() -> bool:
    return bool(_load_triton())


def resolve_backend(q: torch.Tensor, v: torch.Tensor | None = None, backend: str | None = None) -> str:
    """The backend `hstu_attention` would use for these tensors: "triton" or "reference"."""
    choice = backend or os.environ.get("HSTU_ATTENTION_BACKEND") or "auto"
    choice = choice.lower()
    if choice not in _BACKENDS:
        raise ValueError(f"unknown attention backend {choice!r}; expected one of {_BACKENDS}")
    if choice != "auto":
        return choice
    dims_ok = q.shape[-1] <= _MAX_TRITON_HEAD_DIM and (v is None or v.shape[-1] <= _MAX_TRITON_HEAD_DIM)
    if q.is_cuda and dims_ok and triton_available():
        return "triton"
    return "reference"


def hstu_attention(
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
    backend: str | None = None,
) -> torch.Tensor:
    """Pointwise SiLU attention with the causal + target-aware candidate mask.

    Same semantics and arguments as `hstu_attention_reference`: q, k [B, N, H, Dqk]; v [B, N, H, Dv];
    lengths, num_candidates [B]; bias broadcastable to [B, H, N, N]; alibi_slopes [H];
    position_ids [B, N]. Returns [B, N, H, Dv] in q's dtype. Gradients flow to q, k, v and bias;
    with the Triton backend ALiBi slopes and positions get none (they are constants).

    >>> import torch
    >>> from models.kernels import hstu_attention, resolve_backend
    >>> q = k = v = torch.randn(2, 6, 2, 8)
    >>> lengths, cands = torch.tensor([6, 4]), torch.tensor([2, 1])
    >>> out = hstu_attention(q, k, v, lengths=lengths, num_candidates=cands, inv_n=1 / 6,
    ...                      alibi_slopes=torch.tensor([0.5, 0.25]))
    >>> tuple(out.shape), resolve_backend(q, backend="auto")
    ((2, 6, 2, 8), 'reference')
    """
    kwargs = dict(
        lengths=lengths,
        num_candidates=num_candidates,
        bias=bias,
        alibi_slopes=alibi_slopes,
        position_ids=position_ids,
        attn_scale=attn_scale,
        inv_n=inv_n,
    )
    if resolve_backend(q, v, backend) == "triton":
        impl = _load_triton()
        if not impl:
            raise RuntimeError("backend 'triton' requested but triton could not be imported")
        return impl.hstu_attention_triton(q, k, v, **kwargs)
    return hstu_attention_reference(q, k, v, **kwargs)
