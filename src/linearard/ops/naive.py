"""Materialised reference: builds the full T×T logit matrices. For tests and tiny inputs only.

Memory is O(B·H·T²); everything else in `linearard.ops` must agree with this function.
"""

from __future__ import annotations

import torch
from torch import Tensor


def accumulation_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the precision every implementation accumulates in."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def valid_pairs(
    attention_mask: Tensor | None, rows: slice, n_cols: int, causal: bool, device: torch.device
) -> Tensor:
    """Which (row, column) pairs enter the softmax, for the query rows `rows` and columns [0, n_cols).

    Shape: [B or 1, 1, len(rows), n_cols] bool, broadcastable against [B, H, rows, cols] logits.
    """
    row_idx = torch.arange(rows.start, rows.stop, device=device)
    col_idx = torch.arange(n_cols, device=device)
    if causal:
        valid = (col_idx[None, :] <= row_idx[:, None])[None, None]
    else:
        valid = torch.ones(1, 1, len(row_idx), n_cols, dtype=torch.bool, device=device)
    if attention_mask is not None:
        valid = valid & attention_mask[:, None, None, :n_cols].bool()
    return valid


def row_is_valid(attention_mask: Tensor | None, batch: int, length: int, device: torch.device) -> Tensor:
    """Rows that count: real tokens. A real row always sees at least its own column. Shape: [B, 1, T] bool."""
    if attention_mask is None:
        return torch.ones(batch, 1, length, dtype=torch.bool, device=device)
    return attention_mask.bool()[:, None, :]


def _logits(q: Tensor, k: Tensor, scale: float, dtype: torch.dtype) -> Tensor:
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)  # query head h reads key head h // group
    return (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale


def attention_kl_naive(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    attention_mask: Tensor | None,
    causal: bool,
    scale_s: float,
    scale_t: float,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Per-row KL(P_t ‖ P_s) from the full logit matrices, differentiable by plain autograd.

    Args:
        q_s, k_s, q_t, k_t: as in `linearard.ops.attention_kl` (already validated).
        attention_mask: [B, T] or None; nonzero = real token.
        causal: keep only columns j <= i.
        scale_s, scale_t: logit scales.
        compute_dtype: dtype of every intermediate; default float32 (float64 for float64 inputs).
            Tests pass the input dtype to get "plain PyTorch in that dtype" as an error yardstick.

    Shape:
        returns [B, Hq, T] in float32 (float64 for float64 inputs); masked rows are exactly 0; a row
        that reads a non-finite input is NaN.
    """
    out_dtype = accumulation_dtype(q_s, q_t)
    dtype = compute_dtype or out_dtype
    batch, _, length, _ = q_s.shape
    valid = valid_pairs(attention_mask, slice(0, length), length, causal, q_s.device)
    rows = row_is_valid(attention_mask, batch, length, q_s.device)
    # A row with no valid column would give log_softmax(-inf...) = NaN, whose backward leaks NaN into
    # the gradient even where the value is masked out; give such rows finite dummy logits instead.
    live = valid.any(dim=-1, keepdim=True)

    def log_probs(q: Tensor, k: Tensor, scale: float) -> Tensor:
        logits = _logits(q, k, scale, dtype).masked_fill(~valid, float("-inf"))
        return torch.log_softmax(logits.masked_fill(~live, 0.0), dim=-1)

    logp_s = log_probs(q_s, k_s, scale_s)
    logp_t = log_probs(q_t, k_t, scale_t)
    terms = torch.where(valid, logp_t.exp() * (logp_t - logp_s), 0.0)
    kl = torch.where(rows, terms.sum(dim=-1), 0.0).to(out_dtype)
    return torch.where(torch.isinf(kl), float("nan"), kl)  # Inf inputs can give ±Inf: report NaN
