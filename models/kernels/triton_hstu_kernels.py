"""Triton kernels (device code) for HSTU pointwise SiLU attention; the host side, launch configs
and autograd wrapper are in `triton_hstu_attention.py`, which documents the design."""

from __future__ import annotations

import triton
import triton.language as tl

# ---------------------------------------------------------------------------------------------
# Shared tile helpers (inlined by Triton). Index tensors are 2-D and broadcastable, so the same
# helper serves the [queries, keys] tiles of the forward / dq kernels and the transposed
# [keys, queries] tiles of the dk / dv kernel.
# ---------------------------------------------------------------------------------------------


@triton.jit
def _visible(i, j, n_hist, length):
    """The reference's mask: history rows are causal, a candidate row sees history and itself."""
    history_row = (i < n_hist) & (j <= i)
    candidate_row = (i >= n_hist) & ((j < n_hist) | (j == i))
    return (i < length) & (j < length) & (history_row | candidate_row)


@triton.jit
def _add_bias(s, i, j, pos_i, pos_j, bias_ptr, sbi, sbj, slope, N,
              HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr):
    if HAS_BIAS:
        s += tl.load(bias_ptr + i * sbi + j * sbj, mask=(i < N) & (j < N), other=0.0).to(tl.float32)
    if HAS_ALIBI:
        # Integer positions: subtract first, then convert, exactly like the reference's abs().to().
        s -= slope * tl.abs(pos_i - pos_j).to(tl.float32)
    return s


@triton.jit
def _positions(pos_ptr, spn, offs, N, HAS_POS: tl.constexpr):
    if HAS_POS:
        pos = tl.load(pos_ptr + offs * spn, mask=offs < N, other=0)
    else:
        pos = offs  # the reference's default position_ids = arange(N)
    return pos


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _row_block_ranges(m0, n_hist, length, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges for query rows [m0, m0 + BLOCK_M), as (full_end, end1, start2, end2).

    [0, full_end): every row sees every key (keys < m0 and < history end): no mask.
    [full_end, end1): masked history tiles (the causal diagonal).
    [start2, end2): masked tiles on the diagonal of the candidate rows (a candidate sees itself).
    Everything else is fully masked and skipped. All starts are multiples of BLOCK_N.
    """
    hist_end = tl.maximum(tl.minimum(n_hist, length), 0)
    row_hi = tl.where(m0 < length, tl.minimum(m0 + BLOCK_M, length), 0)
    full_end = (tl.minimum(tl.minimum(m0, hist_end), row_hi) // BLOCK_N) * BLOCK_N
    end1 = tl.minimum(hist_end, row_hi)
    after1 = full_end + ((tl.maximum(end1 - full_end, 0) + BLOCK_N - 1) // BLOCK_N) * BLOCK_N
    start2 = tl.maximum(after1, (tl.maximum(hist_end, m0) // BLOCK_N) * BLOCK_N)
    return full_end, end1, start2, row_hi


# ---------------------------------------------------------------------------------------------
# Forward
# ---------------------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, q, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj, slope,
              pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
              MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
              HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + offs_n[:, None] * skn + offs_dqk[None, :],
                mask=(offs_n[:, None] < length) & (offs_dqk[None, :] < DQK), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * attn_scale
    pos_n = _positions(pos_ptr, spn, offs_n, N, HAS_POS)
    s = _add_bias(s, offs_m[:, None], offs_n[None, :], pos_m[:, None], pos_n[None, :],
                  bias_ptr, sbi, sbj, slope, N, HAS_BIAS, HAS_ALIBI)
    a = s * _sigmoid(s) * inv_n
    if MASKED:
        a = tl.where(_visible(offs_m[:, None], offs_n[None, :], n_hist, length), a, 0.0)
    v = tl.load(v_ptr + offs_n[:, None] * svn + offs_dv[None, :],
                mask=(offs_n[:, None] < length) & (offs_dv[None, :] < DV), other=0.0)
    return tl.dot(a.to(v.dtype), v, acc, input_precision=PRECISION)


@triton.jit
def _hstu_fwd_kernel(
    Q, K, V, Out, Bias, Slopes, Pos, Lengths, NumCand,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sob, son, soh,
    sbb, sbh, sbi, sbj, spb, spn,
    N, attn_scale, inv_n, DQK: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Late query blocks see the most keys: launch them first so the tail of the grid is short.
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)  # int64: b * stride overflows int32 for large tensors
    b = tl.program_id(2).to(tl.int64)
    raw_len = tl.load(Lengths + b)
    n_hist = raw_len - tl.load(NumCand + b)  # from the unclamped length, as in the reference
    length = tl.minimum(raw_len, N)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    bias_ptr = Bias + b * sbb + h * sbh
    pos_ptr = Pos + b * spb
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    pos_m = _positions(pos_ptr, spn, offs_m, N, HAS_POS)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_dqk[None, :],
                mask=(offs_m[:, None] < length) & (offs_dqk[None, :] < DQK), other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    full_end, end1, start2, end2 = _row_block_ranges(m0, n_hist, length, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        acc = _fwd_tile(acc, q, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                        slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                        False, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_n in range(full_end, end1, BLOCK_N):
        acc = _fwd_tile(acc, q, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                        slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                        True, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_n in range(start2, end2, BLOCK_N):
        acc = _fwd_tile(acc, q, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                        slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                        True, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)

    # Padded rows are zero in the reference (their mask row is empty); the unmasked tiles above
    # computed them anyway, so clear them here.
    acc = tl.where(offs_m[:, None] < length, acc, 0.0)
    tl.store(Out + b * sob + h * soh + offs_m[:, None] * son + offs_dv[None, :],
             acc.to(Out.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_dv[None, :] < DV))


# ---------------------------------------------------------------------------------------------
# Backward: dq (query blocks), then dk / dv / dbias (key blocks)
# ---------------------------------------------------------------------------------------------


@triton.jit
def _dq_tile(dq, q, do, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj, slope,
             pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
             MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
             HAS_POS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr,
             BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + offs_n[:, None] * skn + offs_dqk[None, :],
                mask=(offs_n[:, None] < length) & (offs_dqk[None, :] < DQK), other=0.0)
    v = tl.load(v_ptr + offs_n[:, None] * svn + offs_dv[None, :],
                mask=(offs_n[:, None] < length) & (offs_dv[None, :] < DV), other=0.0)
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * attn_scale
    pos_n = _positions(pos_ptr, spn, offs_n, N, HAS_POS)
    s = _add_bias(s, offs_m[:, None], offs_n[None, :], pos_m[:, None], pos_n[None, :],
                  bias_ptr, sbi, sbj, slope, N, HAS_BIAS, HAS_ALIBI)
    sig = _sigmoid(s)
    da = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    # d SiLU(s) / ds = sig * (1 + s * (1 - sig))
    ds = da * (inv_n * sig * (1.0 + s * (1.0 - sig)))
    if MASKED:
        ds = tl.where(_visible(offs_m[:, None], offs_n[None, :], n_hist, length), ds, 0.0)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)


@triton.jit
def _hstu_bwd_dq_kernel(
    Q, K, V, DO, DQ, Bias, Slopes, Pos, Lengths, NumCand,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh, sdqb, sdqn, sdqh,
    sbb, sbh, sbi, sbj, spb, spn,
    N, attn_scale, inv_n, DQK: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    m0 = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    raw_len = tl.load(Lengths + b)
    n_hist = raw_len - tl.load(NumCand + b)
    length = tl.minimum(raw_len, N)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    k_ptr = K + b * skb + h * skh
    v_ptr = V + b * svb + h * svh
    bias_ptr = Bias + b * sbb + h * sbh
    pos_ptr = Pos + b * spb
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    pos_m = _positions(pos_ptr, spn, offs_m, N, HAS_POS)
    row_ok = offs_m[:, None] < length
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_dqk[None, :],
                mask=row_ok & (offs_dqk[None, :] < DQK), other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_dv[None, :],
                 mask=row_ok & (offs_dv[None, :] < DV), other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    full_end, end1, start2, end2 = _row_block_ranges(m0, n_hist, length, BLOCK_M, BLOCK_N)
    for start_n in range(0, full_end, BLOCK_N):
        dq = _dq_tile(dq, q, do, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                      slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                      False, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_n in range(full_end, end1, BLOCK_N):
        dq = _dq_tile(dq, q, do, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                      slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                      True, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_n in range(start2, end2, BLOCK_N):
        dq = _dq_tile(dq, q, do, start_n, offs_m, pos_m, k_ptr, v_ptr, skn, svn, bias_ptr, sbi, sbj,
                      slope, pos_ptr, spn, n_hist, length, N, DQK, DV, attn_scale, inv_n,
                      True, HAS_BIAS, HAS_ALIBI, HAS_POS, BLOCK_N, BLOCK_DQK, BLOCK_DV, PRECISION)

    dq = tl.where(row_ok, dq * attn_scale, 0.0)
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_dqk[None, :],
             dq.to(DQ.dtype.element_ty), mask=(offs_m[:, None] < N) & (offs_dqk[None, :] < DQK))


@triton.jit
def _dkdv_tile(dk, dv, k, v, start_m, offs_n, pos_n, q_ptr, do_ptr, sqn, sdon, bias_ptr, sbi, sbj,
               dbias_ptr, sdbi, sdbj, slope, pos_ptr, spn, n_hist, length, N, DQK, DV,
               attn_scale, inv_n,
               MASKED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr,
               HAS_POS: tl.constexpr, STORE_DBIAS: tl.constexpr, BLOCK_M: tl.constexpr,
               BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr):
    # Tiles are transposed, [keys, queries], so dk / dv accumulate without transposing A or dS.
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_ptr + offs_m[:, None] * sqn + offs_dqk[None, :],
                mask=(offs_m[:, None] < length) & (offs_dqk[None, :] < DQK), other=0.0)
    do = tl.load(do_ptr + offs_m[:, None] * sdon + offs_dv[None, :],
                 mask=(offs_m[:, None] < length) & (offs_dv[None, :] < DV), other=0.0)
    st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * attn_scale
    pos_m = _positions(pos_ptr, spn, offs_m, N, HAS_POS)
    st = _add_bias(st, offs_m[None, :], offs_n[:, None], pos_m[None, :], pos_n[:, None],
                   bias_ptr, sbi, sbj, slope, N, HAS_BIAS, HAS_ALIBI)
    sig = _sigmoid(st)
    at = st * sig * inv_n
    dat = tl.dot(v, tl.trans(do), input_precision=PRECISION)
    dst = dat * (inv_n * sig * (1.0 + st * (1.0 - sig)))
    if MASKED:
        vis = _visible(offs_m[None, :], offs_n[:, None], n_hist, length)
        at = tl.where(vis, at, 0.0)
        dst = tl.where(vis, dst, 0.0)
    if STORE_DBIAS:
        # dS is dbias before the broadcast reduction (done by torch on the host side).
        tl.store(dbias_ptr + offs_m[None, :] * sdbi + offs_n[:, None] * sdbj, dst,
                 mask=(offs_m[None, :] < N) & (offs_n[:, None] < N))
    dv = tl.dot(at.to(do.dtype), do, dv, input_precision=PRECISION)
    dk = tl.dot(dst.to(q.dtype), q, dk, input_precision=PRECISION)
    return dk, dv


@triton.jit
def _hstu_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV_, DBias, Bias, Slopes, Pos, Lengths, NumCand,
    sqb, sqn, sqh, skb, skn, skh, svb, svn, svh, sdob, sdon, sdoh,
    sdkb, sdkn, sdkh, sdvb, sdvn, sdvh,
    sbb, sbh, sbi, sbj, sdbb, sdbh, sdbi, sdbj, spb, spn,
    N, attn_scale, inv_n, DQK: tl.constexpr, DV: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_POS: tl.constexpr,
    STORE_DBIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # Early key blocks are seen by the most queries: program 0 is the heaviest, launched first.
    n0 = tl.program_id(0) * BLOCK_N
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    raw_len = tl.load(Lengths + b)
    n_hist = raw_len - tl.load(NumCand + b)
    length = tl.minimum(raw_len, N)
    hist_end = tl.maximum(tl.minimum(n_hist, length), 0)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_ptr = Q + b * sqb + h * sqh
    do_ptr = DO + b * sdob + h * sdoh
    bias_ptr = Bias + b * sbb + h * sbh
    dbias_ptr = DBias + b * sdbb + h * sdbh
    pos_ptr = Pos + b * spb
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Slopes + h).to(tl.float32)
    pos_n = _positions(pos_ptr, spn, offs_n, N, HAS_POS)
    col_ok = offs_n[:, None] < length
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_dqk[None, :],
                mask=col_ok & (offs_dqk[None, :] < DQK), other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_dv[None, :],
                mask=col_ok & (offs_dv[None, :] < DV), other=0.0)

    # Query ranges that see keys [n0, n0 + BLOCK_N): rows >= n0 only (j <= i always holds).
    # - keys wholly in the history: rows past the block see all of it (unmasked middle range),
    #   the diagonal and the ragged end (rows near `length`) are masked;
    # - keys straddling the history end: every later row may see part of it (all masked);
    # - candidate keys: only the diagonal (a candidate sees itself, no other candidate).
    kv_live = n0 < length
    lo = (n0 // BLOCK_M) * BLOCK_M
    full_ok = (n0 + BLOCK_N <= hist_end) & kv_live
    full_start = ((n0 + BLOCK_N + BLOCK_M - 1) // BLOCK_M) * BLOCK_M
    full_end = tl.maximum(full_start, (length // BLOCK_M) * BLOCK_M)
    end1 = tl.where(n0 < hist_end, length, tl.minimum(n0 + BLOCK_N, length))
    end1 = tl.where(full_ok, tl.minimum(full_start, length), end1)
    end1 = tl.where(kv_live, end1, 0)
    full_end = tl.where(full_ok, full_end, 0)
    end2 = tl.where(full_ok, length, 0)

    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    for start_m in range(lo, end1, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, pos_n, q_ptr, do_ptr, sqn, sdon, bias_ptr,
                            sbi, sbj, dbias_ptr, sdbi, sdbj, slope, pos_ptr, spn, n_hist, length, N,
                            DQK, DV, attn_scale, inv_n, True, HAS_BIAS, HAS_ALIBI, HAS_POS,
                            STORE_DBIAS, BLOCK_M, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_m in range(full_start, full_end, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, pos_n, q_ptr, do_ptr, sqn, sdon, bias_ptr,
                            sbi, sbj, dbias_ptr, sdbi, sdbj, slope, pos_ptr, spn, n_hist, length, N,
                            DQK, DV, attn_scale, inv_n, False, HAS_BIAS, HAS_ALIBI, HAS_POS,
                            STORE_DBIAS, BLOCK_M, BLOCK_DQK, BLOCK_DV, PRECISION)
    for start_m in range(full_end, end2, BLOCK_M):
        dk, dv = _dkdv_tile(dk, dv, k, v, start_m, offs_n, pos_n, q_ptr, do_ptr, sqn, sdon, bias_ptr,
                            sbi, sbj, dbias_ptr, sdbi, sdbj, slope, pos_ptr, spn, n_hist, length, N,
                            DQK, DV, attn_scale, inv_n, True, HAS_BIAS, HAS_ALIBI, HAS_POS,
                            STORE_DBIAS, BLOCK_M, BLOCK_DQK, BLOCK_DV, PRECISION)

    out_ok = offs_n[:, None] < N
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_dqk[None, :],
             (dk * attn_scale).to(DK.dtype.element_ty), mask=out_ok & (offs_dqk[None, :] < DQK))
    tl.store(DV_ + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_dv[None, :],
             dv.to(DV_.dtype.element_ty), mask=out_ok & (offs_dv[None, :] < DV))
