"""Blocked PyTorch relation KL: exact, linear memory, any device.

The forward walks over blocks of query rows, materialising only a [B, Hq, rows, T] slab of logits at
a time, and keeps the two per-row log-sum-exps for the backward, which recomputes each slab. Both
accumulate in float32 (float64 for float64 inputs), whatever the input dtype. They are registered as
the operators linearard::attention_kl_blocked and linearard::attention_kl_blocked_backward, each name
ending in the package version (see `linearard.ops.registration`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from linearard.ops.naive import accumulation_dtype, row_is_valid, valid_pairs
from linearard.ops.registration import operator_name, register_relation_kl, skipped_gradient

# Elements of one [B, Hq, rows, cols] slab; a handful of slabs are alive at once. Small on the CPU
# (4 MB in float32), where the allocator keeps freed chunks; larger on GPUs, where each slab costs a
# few kernel launches.
_SLAB_ELEMENTS = {"cpu": 1 << 20, "cuda": 1 << 24}


def _block_rows(batch: int, heads: int, length: int, device: torch.device) -> int:
    slab = _SLAB_ELEMENTS.get(device.type, _SLAB_ELEMENTS["cpu"])
    return max(1, min(length, slab // (batch * heads * length)))


def _slab_logits(q: Tensor, k: Tensor, rows: slice, n_cols: int, scale: float, dtype: torch.dtype) -> Tensor:
    """Logits of query rows `rows` against key columns [0, n_cols). Shape: [B, Hq, rows, n_cols].

    Grouped heads are folded into the row dimension ([B, Hkv, group·rows, D]), so the keys are never
    repeated per query head; the scale goes on the small query block, not on the slab.
    """
    batch, heads, _, dim = q.shape
    kv_heads = k.shape[1]
    n_rows = rows.stop - rows.start
    q_blk = (q[:, :, rows].to(dtype) * scale).reshape(batch, kv_heads, heads // kv_heads * n_rows, dim)
    return (q_blk @ k[:, :, :n_cols].transpose(-1, -2)).view(batch, heads, n_rows, n_cols)


def _excluded(attention_mask: Tensor | None, rows: slice, n_cols: int, causal: bool, device) -> tuple | None:
    """The pairs left out of the softmax: (first column, bool mask over columns [first, n_cols)) or None.

    Without padding only the square [rows × rows] at the right edge of a causal slab is excluded.
    """
    if attention_mask is not None:
        return 0, ~valid_pairs(attention_mask, rows, n_cols, causal, device)
    if causal:
        n_rows = rows.stop - rows.start
        return rows.start, torch.ones(n_rows, n_rows, dtype=torch.bool, device=device).triu_(1)
    return None


def _fill_(slab: Tensor, excluded: tuple | None, value: float) -> Tensor:
    if excluded is not None:
        first, mask = excluded
        slab[..., first:].masked_fill_(mask, value)
    return slab


def _blocked_forward(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
    block_rows: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row KL(P_t ‖ P_s) and the two per-row log-sum-exps (natural log), each [B, Hq, T]."""
    dtype = accumulation_dtype(q_s, q_t)
    batch, heads, length, _ = q_s.shape
    ks, kt = k_s.to(dtype), k_t.to(dtype)
    rows_ok = row_is_valid(attention_mask, batch, length, q_s.device)
    kl = torch.zeros(batch, heads, length, dtype=dtype, device=q_s.device)
    lse_s = torch.empty_like(kl)
    lse_t = torch.empty_like(kl)
    for start in range(0, length, block_rows):
        rows = slice(start, min(start + block_rows, length))
        n_cols = rows.stop if causal else length
        excluded = _excluded(attention_mask, rows, n_cols, causal, q_s.device)
        s = _slab_logits(q_s, ks, rows, n_cols, scale_s, dtype)
        t = _slab_logits(q_t, kt, rows, n_cols, scale_t, dtype)
        # KL_row = Σ_j p_t (t − s) − lse_t + lse_s. Excluded pairs get p_t = 0 and a difference of 0
        # (not −inf − −inf = NaN, nor a NaN read from a padding token).
        diff = _fill_(t - s, excluded, 0.0)
        blk_lse_s = torch.logsumexp(_fill_(s, excluded, float("-inf")), dim=-1)
        blk_lse_t = torch.logsumexp(_fill_(t, excluded, float("-inf")), dim=-1)
        cross = t.sub_(blk_lse_t[..., None]).exp_().mul_(diff).sum(dim=-1)
        ok = rows_ok[:, :, rows]
        kl[:, :, rows] = torch.where(ok, cross - blk_lse_t + blk_lse_s, 0.0)
        # +inf makes every probability of an invalid row exp(x − inf) = 0 in the backward.
        lse_s[:, :, rows] = torch.where(ok, blk_lse_s, float("inf"))
        lse_t[:, :, rows] = torch.where(ok, blk_lse_t, float("inf"))
    # A logit of −inf from an Inf input gives ±Inf rather than NaN; report every such row as NaN.
    kl = torch.where(torch.isinf(kl), float("nan"), kl)
    return kl, lse_s, lse_t


def _blocked_backward(
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
    block_rows: int,
    need_dq: bool,
    need_dk: bool,
) -> tuple[Tensor, Tensor]:
    """Gradients of Σ_rows grad_kl · KL_row for q_s and k_s (an empty tensor for one not needed)."""
    dtype = lse_s.dtype
    batch, heads, length, dim = q_s.shape
    kv_heads = k_s.shape[1]
    ks, kt = k_s.to(dtype), k_t.to(dtype)
    # ∂KL_row/∂logit_s = p_s − p_t, times the logit scale and the incoming per-row gradient.
    row_grad = grad_kl.to(dtype) * scale_s
    dq = torch.zeros(batch, heads, length, dim, dtype=dtype, device=q_s.device) if need_dq else None
    dk = torch.zeros(batch, kv_heads, length, dim, dtype=dtype, device=q_s.device) if need_dk else None
    for start in range(0, length, block_rows):
        rows = slice(start, min(start + block_rows, length))
        n_rows = rows.stop - rows.start
        n_cols = rows.stop if causal else length
        excluded = _excluded(attention_mask, rows, n_cols, causal, q_s.device)
        s = _fill_(_slab_logits(q_s, ks, rows, n_cols, scale_s, dtype), excluded, float("-inf"))
        t = _fill_(_slab_logits(q_t, kt, rows, n_cols, scale_t, dtype), excluded, float("-inf"))
        p_s = s.sub_(lse_s[:, :, rows, None]).exp_()
        p_t = t.sub_(lse_t[:, :, rows, None]).exp_()
        d_logits = p_s.sub_(p_t).mul_(row_grad[:, :, rows, None])
        d_logits = d_logits.view(batch, kv_heads, heads // kv_heads * n_rows, n_cols)
        if dq is not None:
            dq[:, :, rows] = (d_logits @ ks[:, :, :n_cols]).view(batch, heads, n_rows, dim)
        if dk is not None:
            q_blk = q_s[:, :, rows].to(dtype).reshape(batch, kv_heads, -1, dim)
            dk[:, :, :n_cols] += d_logits.transpose(-1, -2) @ q_blk
    return (
        dq.to(q_s.dtype) if dq is not None else skipped_gradient(q_s),
        dk.to(k_s.dtype) if dk is not None else skipped_gradient(k_s),
    )


blocked_forward = torch.library.custom_op(operator_name("attention_kl_blocked"), _blocked_forward, mutates_args=())
blocked_backward = torch.library.custom_op(
    operator_name("attention_kl_blocked_backward"), _blocked_backward, mutates_args=()
)
_blocked_kl = register_relation_kl(blocked_forward, blocked_backward, eager=(_blocked_forward, _blocked_backward))


def attention_kl_blocked(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
    block_rows: int | None = None,
) -> Tensor:
    """Per-row KL(P_t ‖ P_s) by row blocks; arguments as `linearard.ops.attention_kl` (validated).

    Args:
        block_rows: query rows per slab; by default sized so one slab holds about 1M elements on the
            CPU and 16M on a GPU.

    Shape:
        returns [B, Hq, T] in float32 (float64 for float64 inputs); masked rows are exactly 0.
    """
    batch, heads, length, _ = q_s.shape
    rows = block_rows or _block_rows(batch, heads, length, q_s.device)
    return _blocked_kl(q_s, k_s, q_t, k_t, attention_mask, causal, scale_s, scale_t, rows)
