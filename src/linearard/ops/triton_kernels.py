"""Fused Triton kernels for the relation KL, and the operators that launch them.

Work in base-2 units: logits are multiplied by scale·log2(e), so every exponential is one exp2.

Forward, one program per (batch, query head, block of rows): a single sweep over the key columns
keeps online max / sum-of-exponentials for student and teacher together, plus the running
Σ_j 2^(t_j − m_t)·(t_j − s_j), rescaled whenever the teacher's running max moves. At the end
    KL_row = ln2 · (Σ p_t (t − s) − lse_t + lse_s),  with Σ p_t (t − s) = cross / l_t.
Causal programs stop at the diagonal. The two per-row log-sum-exps are all that is kept.

A self-relation may join the heads of up to three tensors (a layer's Q, K and V, which need not share a
layout): a program finds its head's tensor and strides from the head index (`_head`), so nothing is
copied and one launch covers them all.

Backward (FlashAttention-2 style, no atomics, so bit-identical run to run): ∂KL_row/∂s_ij = p_s − p_t.
A dQ kernel sweeps columns per block of rows; a dK kernel sweeps rows per block of key columns and
loops over the query heads that share that key head itself. Both recompute the logit tiles of
student and teacher from the saved log-sum-exps.

The launchers are registered as the operators linearard::attention_kl_triton and
linearard::attention_kl_triton_backward, and the self-relation pair linearard::relation_kl_triton and
linearard::relation_kl_triton_backward, each name ending in the package version (see
`linearard.ops.registration`). Triton is optional:
without it this module still imports, and `attention_kl_triton` is not reached
(`linearard.ops.functional` dispatches to the blocked PyTorch path instead).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from linearard.ops.registration import RELATION, operator_name, register_relation_kl, skipped_gradient

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None
    tl = None

LOG2E = 1.4426950408889634
# Tensors whose self-relations one launch reads in place, their heads joined (`relation_kl_triton`).
RELATION_PARTS = 3


def _jit(fn):
    return triton.jit(fn) if triton is not None else fn


class Tiles(NamedTuple):
    """Launch shape of one kernel: rows and columns per tile, warps, software-pipeline depth."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# Chosen per widest head dim (D ≤ 64, ≤ 128, ≤ 256) from timings on an H100 (bf16, T = 8192); see
# benchmarks/NOTES_relation_kl.md. Forward and dQ: block_m rows per program, block_n columns per step
# (block_m % block_n == 0). dK: block_n key columns per program, block_m rows per step.
_TILES = {
    "fwd": {64: Tiles(128, 64, 4, 3), 128: Tiles(128, 64, 8, 4), 256: Tiles(64, 32, 8, 2)},
    "dq": {64: Tiles(64, 64, 4, 3), 128: Tiles(128, 64, 8, 3), 256: Tiles(64, 32, 8, 2)},
    "dk": {64: Tiles(32, 64, 4, 3), 128: Tiles(64, 128, 8, 3), 256: Tiles(64, 64, 8, 2)},
}
# GPUs with less shared memory per block than Hopper's 227 KB (Ampere has 163 KB, consumer cards
# 99 KB) get tiles that fit about 96 KB at D = 128.
_HOPPER_SHARED_MEMORY = 227 * 1024
_COMPACT_TILES = {
    "fwd": {128: Tiles(64, 64, 4, 2), 256: Tiles(32, 32, 4, 1)},
    "dq": {128: Tiles(64, 64, 4, 2), 256: Tiles(32, 32, 4, 1)},
    "dk": {128: Tiles(64, 64, 4, 2), 256: Tiles(32, 32, 4, 1)},
}
_FLOAT32_TILES = {"fwd": Tiles(64, 32, 4, 2), "dq": Tiles(64, 32, 4, 2), "dk": Tiles(32, 64, 4, 2)}
# Small tiles for the CPU interpreter, so that tiny test inputs still span several tiles.
_INTERPRETER_TILES = {"fwd": Tiles(32, 16, 1, 1), "dq": Tiles(32, 16, 1, 1), "dk": Tiles(16, 32, 1, 1)}


def pick_tiles(kind: str, head_dim: int, dtype: torch.dtype, device: torch.device) -> Tiles:
    """Tiles for kernel `kind` ("fwd", "dq" or "dk") at the widest of the two head dims."""
    if device.type == "cpu":
        return _INTERPRETER_TILES[kind]
    if dtype == torch.float32:
        return _FLOAT32_TILES[kind]
    table = _TILES[kind]
    props = torch.cuda.get_device_properties(device)
    if getattr(props, "shared_memory_per_block_optin", _HOPPER_SHARED_MEMORY) < _HOPPER_SHARED_MEMORY:
        table = _COMPACT_TILES[kind]
    return table[min(d for d in table if d >= head_dim)]


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------


@_jit
def _load_rows(base, idx, stride, d, T, D: tl.constexpr, BD: tl.constexpr, CHECK_IDX: tl.constexpr):
    """Rows `idx` of a [T, D] matrix as a [len(idx), BD] tile, zero-padded past T and past D."""
    ptrs = base + idx[:, None] * stride + d[None, :]
    if CHECK_IDX:
        if D == BD:
            return tl.load(ptrs, mask=(idx < T)[:, None], other=0.0)
        return tl.load(ptrs, mask=(idx < T)[:, None] & (d < D)[None, :], other=0.0)
    if D == BD:
        return tl.load(ptrs)
    return tl.load(ptrs, mask=(d < D)[None, :], other=0.0)


@_jit
def _head(
    X, X1, X2, s_b, s_h, s_t, s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, b, h, H0, H01, PARTS: tl.constexpr,
):
    """Start of head h of batch b, and its row stride. With PARTS > 1 the heads are numbered across
    the tensors X (heads [0, H0)), X1 ([H0, H01)) and X2 ([H01, …)), each with its own strides."""
    if PARTS == 1:
        base = X + b * s_b + h * s_h
        stride = s_t
    else:
        zero = (h * 0).to(tl.int32)  # one type for the stride in every branch
        base = X + b * s_b + h * s_h
        stride = zero + s_t
        if h >= H0:
            base = X1 + b * s1_b + (h - H0) * s1_h
            stride = zero + s1_t
        if PARTS == 3:  # noqa: SIM102 (compile-time; run-time conditions cannot join it)
            if h >= H01:
                base = X2 + b * s2_b + (h - H01) * s2_h
                stride = zero + s2_t
    return base, stride


@_jit
def _key_heads(
    QS, sqs_t, QT, sqt_t, KS, sks_b, sks_h, sks_t, KT, skt_b, skt_h, skt_t, b, h, GROUP_S, GROUP_T,
    PARTS: tl.constexpr,
):
    """The key heads that query head h reads (student, teacher) and their row strides: its group's,
    or with joined parts (a self-relation) the query head itself."""
    if PARTS == 1:
        KS += b * sks_b + (h // GROUP_S) * sks_h
        KT += b * skt_b + (h // GROUP_T) * skt_h
    else:
        KS = QS
        sks_t = sqs_t
        KT = QT
        skt_t = sqt_t
    return KS, sks_t, KT, skt_t


@_jit
def _valid_pairs(rows, cols, T, MASK, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EDGE: tl.constexpr):
    """[rows, cols] (or broadcastable) mask of the pairs that enter the softmax, for one tile.

    EDGE tiles hold the diagonal (causal) or run past T (non-causal tail); others need only padding.
    """
    valid = (cols < T)[None, :] & (rows >= 0)[:, None]
    if EDGE and CAUSAL:
        valid = valid & (cols[None, :] <= rows[:, None])
    if HAS_MASK:
        valid = valid & (tl.load(MASK + cols, mask=cols < T, other=0) != 0)[None, :]
    return valid


@_jit
def _fwd_step(
    qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t,
    m_s, m_t, l_s, l_t, cross,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EDGE: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    ks = _load_rows(KS, cols, sks_t, tl.arange(0, BDS), T, DS, BDS, EDGE)
    kt = _load_rows(KT, cols, skt_t, tl.arange(0, BDT), T, DT, BDT, EDGE)
    s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION)
    t = tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
    if EDGE or HAS_MASK:
        valid = _valid_pairs(rows, cols, T, MASK, CAUSAL, HAS_MASK, EDGE)
        s = tl.where(valid, s, float("-inf"))
        t = tl.where(valid, t, float("-inf"))
    # The scales are positive, so max(s)·c is the max of the scaled row.
    m_s_new = tl.maximum(m_s, tl.max(s, 1) * c_s)
    m_t_new = tl.maximum(m_t, tl.max(t, 1) * c_t)
    w_s = tl.exp2(s * c_s - m_s_new[:, None])
    w_t = tl.exp2(t * c_t - m_t_new[:, None])
    alpha_s = tl.exp2(m_s - m_s_new)
    alpha_t = tl.exp2(m_t - m_t_new)
    diff = t * c_t - s * c_s
    if EDGE or HAS_MASK:
        diff = tl.where(valid, diff, 0.0)  # masked pairs: w_t = 0 but −inf − −inf = NaN
    cross = cross * alpha_t + tl.sum(w_t * diff, 1)
    l_s = l_s * alpha_s + tl.sum(w_s, 1)
    l_t = l_t * alpha_t + tl.sum(w_t, 1)
    return m_s_new, m_t_new, l_s, l_t, cross


@_jit
def _fwd_kernel(
    QS, KS, QT, KT, QS1, QS2, QT1, QT2, MASK,
    sqs_b, sqs_h, sqs_t, sks_b, sks_h, sks_t, sqt_b, sqt_h, sqt_t, skt_b, skt_h, skt_t,
    s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t, H0, H01,
    KL, LSE_S, LSE_T, T, HQ, GROUP_S, GROUP_T, c_s, c_t,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, PARTS: tl.constexpr,
):
    # Longest causal rows first, so that the short ones fill in the tail of the launch.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B·H·T·D may pass 2^31
    b = bh // HQ
    h = bh % HQ
    rows = start_m + tl.arange(0, BLOCK_M)
    QS, sqs_t = _head(QS, QS1, QS2, sqs_b, sqs_h, sqs_t, s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, b, h, H0, H01, PARTS)
    QT, sqt_t = _head(QT, QT1, QT2, sqt_b, sqt_h, sqt_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t, b, h, H0, H01, PARTS)
    qs = _load_rows(QS, rows, sqs_t, tl.arange(0, BDS), T, DS, BDS, True)
    qt = _load_rows(QT, rows, sqt_t, tl.arange(0, BDT), T, DT, BDT, True)
    KS, sks_t, KT, skt_t = _key_heads(QS, sqs_t, QT, sqt_t, KS, sks_b, sks_h, sks_t, KT, skt_b, skt_h, skt_t,
                                      b, h, GROUP_S, GROUP_T, PARTS)
    MASK += b * T
    # A finite start for the running maxima: a row whose first tiles are all padding then keeps
    # l = 0 and rescale factors of 1 instead of exp2(−inf − −inf) = NaN.
    m_s = tl.full([BLOCK_M], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    cross = tl.zeros([BLOCK_M], tl.float32)
    if CAUSAL:
        inner_end = start_m
        edge_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        inner_end = (T // BLOCK_N) * BLOCK_N
        edge_end = T
    for start_n in range(0, inner_end, BLOCK_N):
        m_s, m_t, l_s, l_t, cross = _fwd_step(
            qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t, m_s, m_t, l_s, l_t, cross,
            DS, DT, BDS, BDT, BLOCK_N, CAUSAL, HAS_MASK, False, PRECISION,
        )
    for start_n in range(inner_end, edge_end, BLOCK_N):
        m_s, m_t, l_s, l_t, cross = _fwd_step(
            qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t, m_s, m_t, l_s, l_t, cross,
            DS, DT, BDS, BDT, BLOCK_N, CAUSAL, HAS_MASK, True, PRECISION,
        )
    in_range = rows < T
    row_ok = in_range
    if HAS_MASK:
        row_ok = row_ok & (tl.load(MASK + rows, mask=in_range, other=0) != 0)
    log_l_s = tl.log2(l_s)
    log_l_t = tl.log2(l_t)
    kl = 0.6931471805599453 * (cross / l_t + (m_s - m_t) + (log_l_s - log_l_t))
    # An Inf input can give a ±Inf row (a −inf logit where p_t > 0): report NaN, like a NaN input.
    kl = tl.where(tl.abs(kl) == float("inf"), float("nan"), kl)
    out = bh * T + rows
    tl.store(KL + out, tl.where(row_ok, kl, 0.0), mask=in_range)
    # +inf for rows that do not count: the backward's exp2(s − lse) is then 0 for them.
    tl.store(LSE_S + out, tl.where(row_ok, m_s + log_l_s, float("inf")), mask=in_range)
    tl.store(LSE_T + out, tl.where(row_ok, m_t + log_l_t, float("inf")), mask=in_range)


@_jit
def _dq_step(
    qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t, lse_s, lse_t, acc,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, EDGE: tl.constexpr, PRECISION: tl.constexpr,
):
    cols = start_n + tl.arange(0, BLOCK_N)
    ks = _load_rows(KS, cols, sks_t, tl.arange(0, BDS), T, DS, BDS, EDGE)
    kt = _load_rows(KT, cols, skt_t, tl.arange(0, BDT), T, DT, BDT, EDGE)
    s = tl.dot(qs, tl.trans(ks), input_precision=PRECISION)
    t = tl.dot(qt, tl.trans(kt), input_precision=PRECISION)
    d_logits = tl.exp2(s * c_s - lse_s[:, None]) - tl.exp2(t * c_t - lse_t[:, None])
    if EDGE or HAS_MASK:
        d_logits = tl.where(_valid_pairs(rows, cols, T, MASK, CAUSAL, HAS_MASK, EDGE), d_logits, 0.0)
    return acc + tl.dot(d_logits.to(ks.dtype), ks, input_precision=PRECISION)


@_jit
def _dq_kernel(
    QS, KS, QT, KT, QS1, QS2, QT1, QT2, MASK,
    sqs_b, sqs_h, sqs_t, sks_b, sks_h, sks_t, sqt_b, sqt_h, sqt_t, skt_b, skt_h, skt_t,
    s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t, H0, H01,
    LSE_S, LSE_T, GRAD, DQ, T, HQ, GROUP_S, GROUP_T, c_s, c_t, scale_s,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, PARTS: tl.constexpr,
):
    # Longest causal rows first, so that the short ones fill in the tail of the launch.
    start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)  # 64-bit offsets: B·H·T·D may pass 2^31
    b = bh // HQ
    h = bh % HQ
    rows = start_m + tl.arange(0, BLOCK_M)
    d_s = tl.arange(0, BDS)
    QS, sqs_t = _head(QS, QS1, QS2, sqs_b, sqs_h, sqs_t, s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, b, h, H0, H01, PARTS)
    QT, sqt_t = _head(QT, QT1, QT2, sqt_b, sqt_h, sqt_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t, b, h, H0, H01, PARTS)
    qs = _load_rows(QS, rows, sqs_t, d_s, T, DS, BDS, True)
    qt = _load_rows(QT, rows, sqt_t, tl.arange(0, BDT), T, DT, BDT, True)
    KS, sks_t, KT, skt_t = _key_heads(QS, sqs_t, QT, sqt_t, KS, sks_b, sks_h, sks_t, KT, skt_b, skt_h, skt_t,
                                      b, h, GROUP_S, GROUP_T, PARTS)
    MASK += b * T
    in_range = rows < T
    stats = bh * T + rows
    lse_s = tl.load(LSE_S + stats, mask=in_range, other=float("inf"))
    lse_t = tl.load(LSE_T + stats, mask=in_range, other=float("inf"))
    acc = tl.zeros([BLOCK_M, BDS], tl.float32)
    if CAUSAL:
        inner_end = start_m
        edge_end = tl.minimum(start_m + BLOCK_M, T)
    else:
        inner_end = (T // BLOCK_N) * BLOCK_N
        edge_end = T
    for start_n in range(0, inner_end, BLOCK_N):
        acc = _dq_step(
            qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t, lse_s, lse_t, acc,
            DS, DT, BDS, BDT, BLOCK_N, CAUSAL, HAS_MASK, False, PRECISION,
        )
    for start_n in range(inner_end, edge_end, BLOCK_N):
        acc = _dq_step(
            qs, qt, KS, KT, MASK, sks_t, skt_t, rows, start_n, T, c_s, c_t, lse_s, lse_t, acc,
            DS, DT, BDS, BDT, BLOCK_N, CAUSAL, HAS_MASK, True, PRECISION,
        )
    grad = tl.load(GRAD + stats, mask=in_range, other=0.0) * scale_s
    dq = acc * grad[:, None]
    tl.store(DQ + stats[:, None] * DS + d_s[None, :], dq.to(DQ.dtype.element_ty),
             mask=in_range[:, None] & (d_s < DS)[None, :])


@_jit
def _dk_step(
    ks, kt, QS, QT, LSE_S, LSE_T, GRAD, sqs_t, sqt_t, cols, start_m, T, c_s, c_t, acc,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr, BLOCK_M: tl.constexpr,
    DIAGONAL: tl.constexpr, PRECISION: tl.constexpr,
):
    rows = start_m + tl.arange(0, BLOCK_M)
    in_range = rows < T
    qs = _load_rows(QS, rows, sqs_t, tl.arange(0, BDS), T, DS, BDS, True)
    qt = _load_rows(QT, rows, sqt_t, tl.arange(0, BDT), T, DT, BDT, True)
    # Rows past T or padding rows have lse = +inf, hence zero probabilities: no row mask needed.
    lse_s = tl.load(LSE_S + rows, mask=in_range, other=float("inf"))
    lse_t = tl.load(LSE_T + rows, mask=in_range, other=float("inf"))
    grad = tl.load(GRAD + rows, mask=in_range, other=0.0)
    s_tr = tl.dot(ks, tl.trans(qs), input_precision=PRECISION)  # [cols, rows]
    t_tr = tl.dot(kt, tl.trans(qt), input_precision=PRECISION)
    d_logits = tl.exp2(s_tr * c_s - lse_s[None, :]) - tl.exp2(t_tr * c_t - lse_t[None, :])
    d_logits = d_logits * grad[None, :]
    if DIAGONAL:
        d_logits = tl.where(rows[None, :] >= cols[:, None], d_logits, 0.0)
    return acc + tl.dot(d_logits.to(qs.dtype), qs, input_precision=PRECISION)


@_jit
def _dk_kernel(
    QS, KS, QT, KT, QS1, QS2, QT1, QT2, MASK,
    sqs_b, sqs_h, sqs_t, sks_b, sks_h, sks_t, sqt_b, sqt_h, sqt_t, skt_b, skt_h, skt_t,
    s1_b, s1_h, s1_t, s2_b, s2_h, s2_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t, H0, H01,
    LSE_S, LSE_T, GRAD, DK, T, HQ, HKV_S, GROUP_S, GROUP_T, c_s, c_t, scale_s,
    DS: tl.constexpr, DT: tl.constexpr, BDS: tl.constexpr, BDT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr,
    PRECISION: tl.constexpr, PARTS: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    b = bhk // HKV_S
    hk = bhk % HKV_S
    cols = start_n + tl.arange(0, BLOCK_N)
    d_s = tl.arange(0, BDS)
    if PARTS == 1:
        ks_base = KS + b * sks_b + hk * sks_h
    else:  # a self-relation over joined parts: key head hk is query head hk
        ks_base, sks_t = _head(QS, QS1, QS2, sqs_b, sqs_h, sqs_t, s1_b, s1_h, s1_t, s2_b, s2_h, s2_t,
                               b, hk, H0, H01, PARTS)
    ks = _load_rows(ks_base, cols, sks_t, d_s, T, DS, BDS, True)
    acc = tl.zeros([BLOCK_N, BDS], tl.float32)
    # This program owns these key columns for every query head of its group: no other program
    # writes them, so the sum needs no atomics and its order is fixed.
    for g in range(0, GROUP_S):
        h = hk * GROUP_S + g
        qs_base, sqs_t_h = _head(QS, QS1, QS2, sqs_b, sqs_h, sqs_t, s1_b, s1_h, s1_t, s2_b, s2_h, s2_t,
                                 b, h, H0, H01, PARTS)
        qt_base, sqt_t_h = _head(QT, QT1, QT2, sqt_b, sqt_h, sqt_t, t1_b, t1_h, t1_t, t2_b, t2_h, t2_t,
                                 b, h, H0, H01, PARTS)
        _, _, kt_base, skt_t_h = _key_heads(qs_base, sqs_t_h, qt_base, sqt_t_h, KS, sks_b, sks_h, sks_t,
                                            KT, skt_b, skt_h, skt_t, b, h, GROUP_S, GROUP_T, PARTS)
        kt = _load_rows(kt_base, cols, skt_t_h, tl.arange(0, BDT), T, DT, BDT, True)
        stats = (b * HQ + h) * T
        if CAUSAL:
            # Rows above the diagonal band see none of these columns; the band needs the causal mask.
            for start_m in range(start_n, start_n + BLOCK_N, BLOCK_M):
                acc = _dk_step(
                    ks, kt, qs_base, qt_base, LSE_S + stats, LSE_T + stats, GRAD + stats, sqs_t_h, sqt_t_h,
                    cols, start_m, T, c_s, c_t, acc, DS, DT, BDS, BDT, BLOCK_M, True, PRECISION,
                )
            first_free = start_n + BLOCK_N
        else:
            first_free = 0
        for start_m in range(first_free, T, BLOCK_M):
            acc = _dk_step(
                ks, kt, qs_base, qt_base, LSE_S + stats, LSE_T + stats, GRAD + stats, sqs_t_h, sqt_t_h,
                cols, start_m, T, c_s, c_t, acc, DS, DT, BDS, BDT, BLOCK_M, False, PRECISION,
            )
    dk = acc * scale_s
    col_in = cols < T
    if HAS_MASK:
        # A padding column is excluded from every row, so its key gets no gradient.
        dk = tl.where((tl.load(MASK + b * T + cols, mask=col_in, other=0) != 0)[:, None], dk, 0.0)
    tl.store(DK + (bhk * T + cols)[:, None] * DS + d_s[None, :], dk.to(DK.dtype.element_ty),
             mask=col_in[:, None] & (d_s < DS)[None, :])


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------


class _Problem(NamedTuple):
    """Everything the three kernels share about one call.

    A self-relation may join the heads of up to three tensors without copying them: `q_s` (= `k_s`)
    and `q_t` (= `k_t`) are then the first parts, `more_s` and `more_t` the others, whose heads follow.
    """

    q_s: Tensor
    k_s: Tensor
    q_t: Tensor
    k_t: Tensor
    mask: Tensor | None
    causal: bool
    scale_s: float
    scale_t: float
    more_s: tuple[Tensor, ...] = ()
    more_t: tuple[Tensor, ...] = ()

    @property
    def heads(self) -> int:
        return self.q_s.shape[1] + sum(x.shape[1] for x in self.more_s)

    @property
    def key_heads(self) -> int:
        return self.heads if self.more_s else self.k_s.shape[1]

    @property
    def groups(self) -> tuple[int, int]:
        """Query heads per key head, student and teacher (1 for joined parts)."""
        if self.more_s:
            return 1, 1
        return self.heads // self.k_s.shape[1], self.heads // self.k_t.shape[1]

    def common_args(self) -> list:
        """The kernels' leading arguments: the inputs, their strides and the parts' first heads."""
        spare = RELATION_PARTS - 1 - len(self.more_s)  # slots of missing parts: never read
        more_s = (*self.more_s, *(self.q_s,) * spare)
        more_t = (*self.more_t, *(self.q_t,) * spare)
        tensors = (self.q_s, self.k_s, self.q_t, self.k_t, *more_s, *more_t)
        strides = [stride for x in tensors for stride in (x.stride(0), x.stride(1), x.stride(2))]
        first = self.q_s.shape[1]
        second = first + (self.more_s[0].shape[1] if self.more_s else 0)
        return [*tensors, self.mask_arg, *strides, first, second]

    def constexprs(self) -> dict:
        ds, dt = self.q_s.shape[-1], self.q_t.shape[-1]
        return dict(
            DS=ds, DT=dt, BDS=_block_dim(ds), BDT=_block_dim(dt), CAUSAL=self.causal,
            HAS_MASK=self.mask is not None,
            PRECISION="ieee" if torch.float32 in (self.q_s.dtype, self.q_t.dtype) else "tf32",
            PARTS=1 + len(self.more_s),
        )

    def tiles(self, kind: str) -> Tiles:
        widest = max(self.q_s.shape[-1], self.q_t.shape[-1])
        dtype = torch.float32 if torch.float32 in (self.q_s.dtype, self.q_t.dtype) else self.q_s.dtype
        return pick_tiles(kind, widest, dtype, self.q_s.device)

    @property
    def mask_arg(self) -> Tensor:
        return self.mask if self.mask is not None else self.q_s  # never read when HAS_MASK is False


def _block_dim(dim: int) -> int:
    return max(16, triton.next_power_of_2(dim))  # tl.dot needs a power of two, at least 16


def _unit_stride(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()  # the kernels index the head dim with unit stride


def _prepare(q_s, k_s, q_t, k_t, mask, causal, scale_s, scale_t) -> _Problem:
    q_s, k_s, q_t, k_t = (_unit_stride(x) for x in (q_s, k_s, q_t, k_t))
    if mask is not None:
        mask = mask.to(torch.int8).contiguous()
    return _Problem(q_s, k_s, q_t, k_t, mask, causal, scale_s, scale_t)


def _prepare_relation(parts_s: list[Tensor], parts_t: list[Tensor], mask, causal, scale_s, scale_t) -> _Problem:
    first_s, *more_s = (_unit_stride(x) for x in parts_s)
    first_t, *more_t = (_unit_stride(x) for x in parts_t)
    p = _prepare(first_s, first_s, first_t, first_t, mask, causal, scale_s, scale_t)
    return p._replace(more_s=tuple(more_s), more_t=tuple(more_t))


def kl_forward(p: _Problem, tiles: Tiles | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Launch the forward kernel. Returns per-row KL and the base-2 log-sum-exps, each [B, Hq, T]."""
    batch, _, length, _ = p.q_s.shape
    heads = p.heads
    tiles = tiles or p.tiles("fwd")
    # Three separate tensors: the outputs of an operator may not be views of one another.
    kl, lse_s, lse_t = (
        torch.empty(batch, heads, length, dtype=torch.float32, device=p.q_s.device) for _ in range(3)
    )
    grid = (triton.cdiv(length, tiles.block_m), batch * heads)
    _fwd_kernel[grid](
        *p.common_args(), kl, lse_s, lse_t,
        length, heads, *p.groups, p.scale_s * LOG2E, p.scale_t * LOG2E,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **p.constexprs(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return kl, lse_s, lse_t


def kl_backward_dq(p: _Problem, lse_s: Tensor, lse_t: Tensor, grad: Tensor, tiles: Tiles | None = None) -> Tensor:
    """Launch the dQ kernel: the gradient of Σ_rows grad_row · KL_row with respect to q_s (with joined
    parts, to all their heads: [B, Hq, T, Ds] contiguous)."""
    batch, _, length, dim = p.q_s.shape
    heads = p.heads
    tiles = tiles or p.tiles("dq")
    dq = torch.empty(batch, heads, length, dim, dtype=p.q_s.dtype, device=p.q_s.device)
    grid = (triton.cdiv(length, tiles.block_m), batch * heads)
    _dq_kernel[grid](
        *p.common_args(), lse_s, lse_t, grad, dq,
        length, heads, *p.groups, p.scale_s * LOG2E, p.scale_t * LOG2E, p.scale_s,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **p.constexprs(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return dq


def kl_backward_dk(p: _Problem, lse_s: Tensor, lse_t: Tensor, grad: Tensor, tiles: Tiles | None = None) -> Tensor:
    """Launch the dK kernel: the gradient of Σ_rows grad_row · KL_row with respect to k_s (with joined
    parts, to all their heads: [B, Hq, T, Ds] contiguous)."""
    batch, _, length, dim = p.q_s.shape
    heads, kv_heads = p.heads, p.key_heads
    tiles = tiles or p.tiles("dk")
    dk = torch.empty(batch, kv_heads, length, dim, dtype=p.k_s.dtype, device=p.k_s.device)
    grid = (triton.cdiv(length, tiles.block_n), batch * kv_heads)
    _dk_kernel[grid](
        *p.common_args(), lse_s, lse_t, grad, dk,
        length, heads, kv_heads, *p.groups, p.scale_s * LOG2E, p.scale_t * LOG2E, p.scale_s,
        BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n, **p.constexprs(),
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    return dk


def _triton_forward(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL(P_t ‖ P_s) and the two per-row base-2 log-sum-exps, each [B, Hq, T] float32."""
    return kl_forward(_prepare(q_s, k_s, q_t, k_t, attention_mask, causal, scale_s, scale_t))


def _triton_backward(
    grad_kl: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
    need_dq: bool,
    need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of Σ_rows grad_kl · KL_row for q_s and k_s (an empty tensor for one not needed)."""
    p = _prepare(q_s, k_s, q_t, k_t, attention_mask, causal, scale_s, scale_t)
    grad = grad_kl.float().contiguous()
    dq = kl_backward_dq(p, lse_s, lse_t, grad) if need_dq else skipped_gradient(q_s)
    dk = kl_backward_dk(p, lse_s, lse_t, grad) if need_dk else skipped_gradient(k_s)
    return dq, dk


def _triton_relation_forward(
    s0: Tensor,
    s1: Tensor | None,
    s2: Tensor | None,
    t0: Tensor,
    t1: Tensor | None,
    t2: Tensor | None,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL of the self-relations of student parts s0..s2 and teacher parts t0..t2 (heads joined
    in that order; absent parts are None) and the two log-sum-exps, each [B, ΣH, T] float32."""
    parts_s, parts_t = _present(s0, s1, s2), _present(t0, t1, t2)
    return kl_forward(_prepare_relation(parts_s, parts_t, attention_mask, causal, scale_s, scale_t))


def _triton_relation_backward(
    grad_kl: Tensor,
    lse_s: Tensor,
    lse_t: Tensor,
    s0: Tensor,
    s1: Tensor | None,
    s2: Tensor | None,
    t0: Tensor,
    t1: Tensor | None,
    t2: Tensor | None,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
    need0: bool,
    need1: bool,
    need2: bool,
) -> Tensor:
    """The gradient of Σ_rows grad_kl · KL_row for the student parts' joined heads, [B, ΣH, T, Ds]
    (as queries and as keys), or an empty tensor when no part needs one."""
    if not (need0 or need1 or need2):
        return skipped_gradient(s0)
    p = _prepare_relation(_present(s0, s1, s2), _present(t0, t1, t2), attention_mask, causal, scale_s, scale_t)
    grad = grad_kl.float().contiguous()
    dx = kl_backward_dq(p, lse_s, lse_t, grad)
    return dx.add_(kl_backward_dk(p, lse_s, lse_t, grad))


def _present(*parts: Tensor | None) -> list[Tensor]:
    return [x for x in parts if x is not None]


triton_forward = torch.library.custom_op(operator_name("attention_kl_triton"), _triton_forward, mutates_args=())
triton_backward = torch.library.custom_op(
    operator_name("attention_kl_triton_backward"), _triton_backward, mutates_args=()
)
_triton_kl = register_relation_kl(triton_forward, triton_backward, eager=(_triton_forward, _triton_backward))
triton_relation_forward = torch.library.custom_op(
    operator_name("relation_kl_triton"), _triton_relation_forward, mutates_args=()
)
triton_relation_backward = torch.library.custom_op(
    operator_name("relation_kl_triton_backward"), _triton_relation_backward, mutates_args=()
)
_triton_relation_kl = register_relation_kl(
    triton_relation_forward,
    triton_relation_backward,
    eager=(_triton_relation_forward, _triton_relation_backward),
    signature=RELATION,
)


def attention_kl_triton(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> Tensor:
    """Per-row KL(P_t ‖ P_s) by the fused kernels; arguments as `linearard.ops.attention_kl` (validated).

    Shape:
        returns [B, Hq, T] float32; masked rows are exactly 0.
    """
    return _triton_kl(q_s, k_s, q_t, k_t, attention_mask, causal, scale_s, scale_t)


def relation_kl_triton(
    parts_s: list[Tensor],
    parts_t: list[Tensor],
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
) -> Tensor:
    """Per-row KL of the self-relations of 1 to 3 parts whose heads are joined, by the fused kernels,
    which read each part where it lies; arguments as `linearard.ops.relation_kl` (validated).

    Shape:
        returns [B, ΣH, T] float32; masked rows are exactly 0.
    """
    spare = [None] * (RELATION_PARTS - len(parts_s))
    return _triton_relation_kl(*parts_s, *spare, *parts_t, *spare, attention_mask, causal, scale_s, scale_t)
