"""The Triton HSTU attention kernels equal `hstu_attention_reference`, forward and backward.

How the kernel tests run without a GPU: Triton's CPU interpreter is switched on by TRITON_INTERPRET=1,
which Triton reads when a kernel is decorated, i.e. when the kernel module is first imported. In one
pytest process running the whole suite, another test may already have imported triton / our kernel
module without it, and setting the variable from here would leak into every later test. So:
- `test_interpreter_suite` (the only interpreter test that runs in a normal pytest run) starts one
  subprocess, `pytest <this file> -k interp` with TRITON_INTERPRET=1, and fails with its output;
- the `test_interp_*` tests run only in a process started with TRITON_INTERPRET=1 (that subprocess,
  or by hand: `TRITON_INTERPRET=1 pytest tests/models/test_kernels.py -k interp` for tracebacks).
`@pytest.mark.gpu` tests run the compiled kernels on CUDA (fp32 and bf16) and skip without CUDA.
This file imports only torch, pytest and hypothesis (and triton lazily, via models.kernels).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from models.kernels import hstu_attention, hstu_attention_reference, resolve_backend

REPO = Path(__file__).resolve().parents[2]
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
HAS_CUDA = torch.cuda.is_available()
HAS_TRITON = importlib.util.find_spec("triton") is not None

needs_interpreter = pytest.mark.skipif(
    not INTERPRET, reason="runs inside the TRITON_INTERPRET=1 subprocess of test_interpreter_suite"
)

BIAS_KINDS = ("none", "full", "heads", "batch", "shared")  # full [B,H,N,N] ... shared [N,N]
ALIBI_KINDS = ("none", "default_pos", "pos")


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------


def make_case(seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale, dtype, device):
    """Inputs for one comparison; lengths / cands are lists (cands None = no candidates)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    q, k, v = rnd(b, n, h, dqk), rnd(b, n, h, dqk), rnd(b, n, h, dv)
    bias_shape = {"none": None, "full": (b, h, n, n), "heads": (1, h, n, n), "batch": (b, 1, n, n),
                  "shared": (n, n)}[bias_kind]
    bias = None if bias_shape is None else rnd(*bias_shape, scale=0.5)
    lengths_t = torch.tensor(lengths, device=device)
    cands_t = None if cands is None else torch.tensor(cands, device=device)
    slopes = pos = None
    if alibi_kind != "none":
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)], device=device)
    if alibi_kind == "pos":
        # GenRank positions: history 0..n_hist-1, every candidate shares the next position.
        pos = torch.arange(n).repeat(b, 1)
        for row, length in enumerate(lengths):
            n_hist = max(length - (cands[row] if cands else 0), 0)
            pos[row, n_hist:] = n_hist
        pos = pos.to(device)
    kwargs = dict(lengths=lengths_t, num_candidates=cands_t, bias=bias, alibi_slopes=slopes,
                  position_ids=pos, attn_scale=attn_scale, inv_n=1.0 / max(n, 1))
    return q, k, v, kwargs


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| relative to the largest |want| (robust for values near zero)."""
    scale = want.abs().max().item()
    return (got.float() - want.float()).abs().max().item() / max(scale, 1e-6)


def compare(q, k, v, kwargs, tol, with_backward=True):
    """Kernel on (q, k, v) vs the fp32 reference on the same values: output and all gradients."""
    leaves = [q, k, v] + ([kwargs["bias"]] if kwargs["bias"] is not None else [])
    leaves = [t.detach().clone().requires_grad_(with_backward) for t in leaves]
    ref_leaves = [t.detach().float().requires_grad_(with_backward) for t in leaves]
    bias_kw = {"bias": leaves[3]} if len(leaves) == 4 else {}
    ref_bias_kw = {"bias": ref_leaves[3]} if len(leaves) == 4 else {}

    out = hstu_attention(*leaves[:3], **{**kwargs, **bias_kw}, backend="triton")
    ref = hstu_attention_reference(*ref_leaves[:3], **{**kwargs, **ref_bias_kw})
    assert out.shape == ref.shape and out.dtype == q.dtype
    assert rel_err(out, ref) < tol, f"forward: {rel_err(out, ref)}"
    for row, length in enumerate(kwargs["lengths"].tolist()):  # padded rows are exactly zero
        assert torch.all(out[row, length:] == 0)
    if not with_backward:
        return
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    got = torch.autograd.grad(out, leaves, grad.to(out.dtype))
    want = torch.autograd.grad(ref, ref_leaves, grad)
    for name, g_got, g_want in zip(("dq", "dk", "dv", "dbias"), got, want):
        assert g_got.shape == g_want.shape and g_got.dtype == q.dtype
        assert rel_err(g_got, g_want) < tol, f"{name}: {rel_err(g_got, g_want)}"


@st.composite
def cases(draw, max_n, dims):
    """Small random problems: ragged lengths, candidates (sometimes more than the length), every
    bias broadcast, ALiBi with default or GenRank positions."""
    b = draw(st.integers(1, 2))
    h = draw(st.integers(1, 2))
    n = draw(st.integers(1, max_n))
    dqk, dv = draw(st.sampled_from(dims)), draw(st.sampled_from(dims))
    lengths = [draw(st.integers(0, n)) for _ in range(b)]
    cands = draw(st.none() | st.just([draw(st.integers(0, length + 1)) for length in lengths]))
    bias_kind = draw(st.sampled_from(BIAS_KINDS))
    alibi_kind = draw(st.sampled_from(ALIBI_KINDS))
    attn_scale = draw(st.sampled_from([1.0, dqk ** -0.5]))
    seed = draw(st.integers(0, 2**16))
    return seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale


# --------------------------------------------------------------------------------------------
# Always run (CPU): dispatcher, and the interpreter suite in a subprocess
# --------------------------------------------------------------------------------------------


def test_dispatcher_picks_reference_on_cpu(monkeypatch):
    monkeypatch.delenv("HSTU_ATTENTION_BACKEND", raising=False)
    q, k, v, kwargs = make_case(0, 2, 9, 2, 8, 8, [9, 5], [2, 1], "heads", "pos", 0.5, torch.float32, "cpu")
    assert resolve_backend(q, v) == "reference"
    torch.testing.assert_close(hstu_attention(q, k, v, **kwargs), hstu_attention_reference(q, k, v, **kwargs),
                               rtol=0, atol=0)
    monkeypatch.setenv("HSTU_ATTENTION_BACKEND", "triton")
    assert resolve_backend(q, v) == "triton"
    assert resolve_backend(q, v, backend="reference") == "reference"  # the argument wins
    with pytest.raises(ValueError):
        resolve_backend(q, v, backend="cuda")


def test_import_without_triton():
    """models.kernels imports and falls back to the reference when triton is missing."""
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, models.kernels as m\n"
        "q = torch.randn(1, 4, 1, 8)\n"
        "assert not m.triton_available() and m.resolve_backend(q) == 'reference'\n"
        "m.hstu_attention(q, q, q, lengths=torch.tensor([3]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.skipif(INTERPRET, reason="already inside the interpreter run")
@pytest.mark.skipif(not HAS_TRITON, reason="triton not installed")
def test_interpreter_suite():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(REPO)}
    env.pop("HSTU_ATTENTION_BACKEND", None)
    cmd = [sys.executable, "-m", "pytest", str(Path(__file__)), "-q", "-p", "no:cacheprovider",
           "-k", "interp"]
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if res.returncode != 0:
        pytest.fail(f"interpreter tests failed:\n{res.stdout[-8000:]}\n{res.stderr[-3000:]}")
    assert " passed" in res.stdout


# --------------------------------------------------------------------------------------------
# TRITON_INTERPRET=1 (CPU) tests: fp32 and fp16 (the interpreter's bf16 tl.dot is wrong in triton
# 3.9, so bf16 is covered by the GPU tests only)
# --------------------------------------------------------------------------------------------


@needs_interpreter
@settings(max_examples=25, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(max_n=40, dims=(8, 16, 20, 32)))
def test_interp_matches_reference(case):
    seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale = case
    q, k, v, kwargs = make_case(seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale,
                                torch.float32, "cpu")
    compare(q, k, v, kwargs, tol=1e-5)


@needs_interpreter
@pytest.mark.parametrize("tiles", [(32, 16), (16, 32)])
def test_interp_unequal_tiles(monkeypatch, tiles):
    """The GPU configs use BLOCK_M != BLOCK_N; the block-range logic must hold for both orders."""
    from models.kernels import triton_hstu_attention as kern

    monkeypatch.setattr(kern, "INTERPRET_CONFIG", (*tiles, 1, 1))
    q, k, v, kwargs = make_case(3, 2, 70, 1, 16, 16, [70, 45], [7, 1], "heads", "pos", 0.25, torch.float32,
                                "cpu")
    compare(q, k, v, kwargs, tol=1e-5)
    q, k, v, kwargs = make_case(4, 1, 70, 1, 16, 8, [61], None, "none", "none", 0.25, torch.float32, "cpu")
    compare(q, k, v, kwargs, tol=1e-5)


@needs_interpreter
def test_interp_edge_cases():
    # empty sequence, all-candidate sequence, candidates > length, lengths > N
    q, k, v, kwargs = make_case(5, 3, 18, 1, 8, 8, [0, 6, 18], [0, 6, 20], "batch", "default_pos", 1.0,
                                torch.float32, "cpu")
    compare(q, k, v, kwargs, tol=1e-5)
    kwargs["lengths"] = torch.tensor([25, 6, 18])
    compare(q, k, v, kwargs, tol=1e-5)


@needs_interpreter
def test_interp_strided_inputs_and_fp16():
    """q/k/v as views of one fused projection (HSTU splits [u, v, q, k]); fp16 inputs."""
    b, n, h, d = 2, 21, 2, 16
    fused = torch.randn(b, n, h, 3 * d)
    q, k, v = fused.split(d, dim=-1)  # non-contiguous, last dim contiguous
    _, _, _, kwargs = make_case(6, b, n, h, d, d, [21, 13], [4, 2], "shared", "pos", d ** -0.5,
                                torch.float32, "cpu")
    compare(q, k, v, kwargs, tol=1e-5)
    kt = torch.randn(b, n, d, h).transpose(-1, -2)  # stride(-1) != 1: made contiguous inside
    compare(q, kt, v, kwargs, tol=1e-5)
    compare(q.half(), k.half(), v.half(), {**kwargs, "bias": kwargs["bias"].half()}, tol=2e-3)


@needs_interpreter
def test_interp_env_var_forces_triton(monkeypatch):
    from models.kernels import triton_hstu_attention as kern

    calls = []
    monkeypatch.setattr(kern, "hstu_attention_triton",
                        lambda *a, **kw: calls.append(1) or hstu_attention_reference(*a, **kw))
    monkeypatch.setenv("HSTU_ATTENTION_BACKEND", "triton")
    q = torch.randn(1, 4, 1, 8)
    hstu_attention(q, q, q, lengths=torch.tensor([4]))
    assert calls == [1]


# --------------------------------------------------------------------------------------------
# GPU tests (compiled kernels): fp32 (IEEE dots, tight) and bf16 (looser)
# --------------------------------------------------------------------------------------------

GPU_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}  # fp32 runs 3xTF32 dots on CUDA


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "b,n,h,dqk,dv,lengths,cands,bias_kind,alibi_kind",
    [
        (2, 300, 2, 64, 64, [300, 181], [20, 3], "none", "pos"),
        (2, 257, 2, 128, 128, [257, 100], None, "none", "none"),
        (2, 200, 4, 32, 48, [200, 77], [64, 0], "heads", "none"),
        (3, 130, 2, 50, 50, [0, 130, 129], [0, 130, 1], "full", "default_pos"),
        (2, 1024, 2, 128, 128, [1024, 700], [128, 16], "shared", "pos"),
    ],
)
@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_matches_reference(dtype, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind):
    q, k, v, kwargs = make_case(7, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, dqk ** -0.5,
                                dtype, "cuda")
    compare(q, k, v, kwargs, tol=GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
@settings(max_examples=5, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(case=cases(max_n=300, dims=(32, 64)))
def test_gpu_sweep(case):
    seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale = case
    for dtype in (torch.float32, torch.bfloat16):
        q, k, v, kwargs = make_case(seed, b, n, h, dqk, dv, lengths, cands, bias_kind, alibi_kind, attn_scale,
                                    dtype, "cuda")
        compare(q, k, v, kwargs, tol=GPU_TOL[dtype])


@pytest.mark.gpu
@pytest.mark.skipif(not (HAS_CUDA and HAS_TRITON), reason="needs CUDA and triton")
def test_gpu_dispatcher_picks_triton(monkeypatch):
    monkeypatch.delenv("HSTU_ATTENTION_BACKEND", raising=False)
    q = torch.randn(1, 8, 1, 16, device="cuda")
    assert resolve_backend(q, q) == "triton"
    assert resolve_backend(q.cpu(), q.cpu()) == "reference"
