"""Public relation-KL functions: argument checks, implementation choice, reduction."""

from __future__ import annotations

import importlib.util
import math
import os
from collections.abc import Sequence

import torch
from torch import Tensor

from linearard.ops.blocked import attention_kl_blocked
from linearard.ops.naive import attention_kl_naive

IMPLS = ("auto", "triton", "torch", "naive")
REDUCTIONS = ("none", "sum", "mean")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def attention_kl(
    q_s: Tensor,
    k_s: Tensor,
    q_t: Tensor,
    k_t: Tensor,
    *,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    scale_s: float | None = None,
    scale_t: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """KL(teacher ‖ student) between the row-wise softmax distributions of two relation matrices.

    With P_s = rowsoftmax(q_s k_sᵀ · scale_s) and P_t = rowsoftmax(q_t k_tᵀ · scale_t), both restricted
    to the allowed columns (j <= i when causal, real tokens only), the per-row value is
    KL(P_t,row ‖ P_s,row) = Σ_j P_t,ij (log P_t,ij − log P_s,ij). No T×T matrix is ever stored except by
    ``impl="naive"``. Gradients flow to ``q_s`` and ``k_s`` only (they may be the same tensor); the
    teacher tensors are treated as constants. A NaN or Inf among the inputs that enter a real row makes
    the result NaN.

    Args:
        q_s: student queries (the rows of the student relation).
        k_s: student keys (its columns); query head h reads key head h // (Hq / Hkv_s).
        q_t: teacher queries.
        k_t: teacher keys; query head h reads key head h // (Hq / Hkv_t).
        attention_mask: optional [B, T] bool or integer mask, nonzero = real token. A padding column is
            excluded from every row; a padding row contributes exactly 0 and gets zero gradient.
        causal: keep only columns j <= i.
        scale_s: student logit scale, a positive finite number; default Ds ** -0.5.
        scale_t: teacher logit scale; default Dt ** -0.5.
        reduction: "none" (per-row KL), "sum", or "mean" (sum / (real rows × Hq)).
        impl: "auto" (Triton on CUDA when Triton is installed, else "torch"), "triton" (fused kernels),
            "torch" (blocked PyTorch, any device) or "naive" (materialised, for tests and tiny inputs).

    Shape:
        q_s [B, Hq, T, Ds], k_s [B, Hkv_s, T, Ds], q_t [B, Hq, T, Dt], k_t [B, Hkv_t, T, Dt].
        Returns [B, Hq, T] for reduction="none", else a scalar; float32 (float64 for float64 inputs).
        Inputs may be float16, bfloat16, float32 or float64; accumulation is in float32 or better.

    Example:
        >>> import torch
        >>> from linearard import attention_kl
        >>> q_s = torch.randn(1, 4, 16, 8, requires_grad=True)
        >>> k_s = torch.randn(1, 2, 16, 8, requires_grad=True)
        >>> q_t, k_t = torch.randn(1, 4, 16, 8), torch.randn(1, 2, 16, 8)
        >>> loss = attention_kl(q_s, k_s, q_t, k_t)
        >>> loss.backward()
        >>> bool(loss > 0), q_s.grad.shape
        (True, torch.Size([1, 4, 16, 8]))
    """
    _check_inputs(q_s, k_s, q_t, k_t, attention_mask)
    scale_s = _check_scale("scale_s", scale_s, q_s.shape[-1])
    scale_t = _check_scale("scale_t", scale_t, q_t.shape[-1])
    _check_reduction(reduction)
    impl = _resolve_impl(impl, q_s, q_t)
    q_t, k_t = q_t.detach(), k_t.detach()
    args = (q_s, k_s, q_t, k_t, attention_mask, bool(causal), scale_s, scale_t)
    if impl == "naive":
        per_row = attention_kl_naive(*args)
    elif impl == "torch":
        per_row = attention_kl_blocked(*args)
    else:
        # Imported on first use: Triton is optional, and slow to import.
        from linearard.ops.triton_kernels import attention_kl_triton

        per_row = attention_kl_triton(*args)
    return _reduce(per_row, reduction, attention_mask)


def relation_kl(
    x_s: Tensor | Sequence[Tensor],
    x_t: Tensor | Sequence[Tensor],
    *,
    attention_mask: Tensor | None = None,
    causal: bool = True,
    scale_s: float | None = None,
    scale_t: float | None = None,
    reduction: str = "mean",
    impl: str = "auto",
) -> Tensor:
    """KL(teacher ‖ student) between the row-wise softmax of the self-relations x_s x_sᵀ and x_t x_tᵀ.

    The same as ``attention_kl(x_s, x_s, x_t, x_t, ...)``: the relation of a tensor with itself, as used
    for the Q·Qᵀ, K·Kᵀ and V·Vᵀ relations of a layer. A self-relation relates each head only to itself,
    so several tensors' relations are one relation over their joined heads: pass sequences (the Q, K
    and V of a layer, say) and the result is that of their heads joined in order, in one kernel launch
    that reads each tensor where it lies (the fused implementation; the others join them first).

    Args:
        x_s: student tensor, or a sequence of them with the same B, T, head dim and dtype.
        x_t: teacher tensor(s), one per student tensor with its heads, B and T; the head dim may differ.
            Either side may instead be one tensor with the other side's heads joined in order (as
            `relation_operand` keeps them).
        attention_mask, causal, scale_s, scale_t, reduction, impl: as in `attention_kl`.

    Shape:
        x_s [B, H, T, Ds], x_t [B, H, T, Dt] (or sequences of [B, H_i, T, D]); returns [B, ΣH_i, T] for
        reduction="none", else a scalar.

    Example:
        >>> import torch
        >>> from linearard import relation_kl
        >>> k_s = torch.randn(2, 2, 32, 16, requires_grad=True)
        >>> k_t = k_s.detach() + 0.1 * torch.randn(2, 2, 32, 16)
        >>> mask = torch.ones(2, 32, dtype=torch.bool)
        >>> mask[1, :5] = False  # left padding in the second sequence
        >>> loss = relation_kl(k_s, k_t, attention_mask=mask)
        >>> loss.backward()
        >>> k_s.grad[1, :, :5].abs().max().item()
        0.0
        >>> q_s, q_t = torch.randn(2, 6, 32, 16), torch.randn(2, 6, 32, 16)
        >>> relation_kl([q_s, k_s], [q_t, k_t], reduction="none").shape
        torch.Size([2, 8, 32])
    """
    parts_s, parts_t = _relation_parts(x_s, x_t)
    first_s, first_t = parts_s[0], parts_t[0]
    _check_inputs(first_s, first_s, first_t, first_t, attention_mask)
    scale_s = _check_scale("scale_s", scale_s, first_s.shape[-1])
    scale_t = _check_scale("scale_t", scale_t, first_t.shape[-1])
    _check_reduction(reduction)
    impl = _resolve_impl(impl, first_s, first_t)
    parts_t = [x.detach() for x in parts_t]
    settings = (attention_mask, bool(causal), scale_s, scale_t)
    if impl == "triton":
        from linearard.ops.triton_kernels import RELATION_PARTS, relation_kl_triton

        if len(parts_s) > RELATION_PARTS:  # more than the kernels read in place: the last ones are joined
            parts_s = [*parts_s[: RELATION_PARTS - 1], _joined(parts_s[RELATION_PARTS - 1 :])]
            parts_t = [*parts_t[: RELATION_PARTS - 1], _joined(parts_t[RELATION_PARTS - 1 :])]
        per_row = relation_kl_triton(parts_s, parts_t, *settings)
    else:
        # a side given joined is used as it is (its parts are views of it)
        joined_s = x_s if isinstance(x_s, Tensor) else _joined(parts_s)
        joined_t = x_t.detach() if isinstance(x_t, Tensor) else _joined(parts_t)
        run = attention_kl_naive if impl == "naive" else attention_kl_blocked
        per_row = run(joined_s, joined_s, joined_t, joined_t, *settings)
    return _reduce(per_row, reduction, attention_mask)


def _relation_parts(x_s: Tensor | Sequence[Tensor], x_t: Tensor | Sequence[Tensor]) -> tuple[list, list]:
    parts = []
    for name, x in (("x_s", x_s), ("x_t", x_t)):
        if not isinstance(x, (Tensor, list, tuple)) or (not isinstance(x, Tensor) and not x):
            raise TypeError(f"{name} must be a torch.Tensor or a non-empty sequence of them, got {type(x).__name__}")
        xs = [x] if isinstance(x, Tensor) else list(x)
        for i, part in enumerate(xs):
            label = name if isinstance(x, Tensor) else f"{name}[{i}]"
            if not isinstance(part, Tensor):
                raise TypeError(f"{label} must be a torch.Tensor, got {type(part).__name__}")
            if part.dim() != 4:
                raise ValueError(f"{label} must be 4-D [B, heads, T, head_dim], got shape {tuple(part.shape)}")
        parts.append(xs)
    parts_s, parts_t = parts
    # One side joined, the other in parts: the joined one is split into views of the parts' heads.
    if isinstance(x_t, Tensor) and len(parts_s) > 1:
        parts_t = _split_like(x_t, "x_t", parts_s, "x_s")
    elif isinstance(x_s, Tensor) and len(parts_t) > 1:
        parts_s = _split_like(x_s, "x_s", parts_t, "x_t")
    if len(parts_s) != len(parts_t):
        raise ValueError(f"x_s has {len(parts_s)} tensors but x_t has {len(parts_t)}")
    for name, xs in (("x_s", parts_s), ("x_t", parts_t)):
        first = xs[0]
        for i, part in enumerate(xs[1:], start=1):
            same = (part.shape[0], part.shape[2], part.shape[3], part.dtype, part.device)
            if same != (first.shape[0], first.shape[2], first.shape[3], first.dtype, first.device):
                raise ValueError(
                    f"{name}[{i}] has shape {tuple(part.shape)} ({part.dtype}, {part.device}); it must match "
                    f"{name}[0] ({tuple(first.shape)}, {first.dtype}, {first.device}) in all but the heads"
                )
    for i, (part_s, part_t) in enumerate(zip(parts_s, parts_t)):
        if part_s.shape[1] != part_t.shape[1]:
            raise ValueError(f"x_t[{i}] has {part_t.shape[1]} heads, x_s[{i}] has {part_s.shape[1]}")
    return parts_s, parts_t


def _split_like(joined: Tensor, name: str, parts: list[Tensor], parts_name: str) -> list[Tensor]:
    heads = [x.shape[1] for x in parts]
    if joined.shape[1] != sum(heads):
        raise ValueError(f"{name} has {joined.shape[1]} heads; the {len(parts)} tensors of {parts_name} have "
                         f"{sum(heads)} in all")
    return list(joined.split(heads, dim=1))


def _joined(parts: list[Tensor]) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def relation_operand(parts: Sequence[Tensor], *, impl: str = "auto") -> Tensor | list[Tensor]:
    """Tensors whose self-relations will be taken together by `relation_kl`, in the form it reads
    without a copy: as they are where the fused kernels read them in place, else joined along the heads
    (the copy made now, once). For an operand kept for later, such as a teacher's Q/K/V across a
    forward pass: kept joined, the parts need not be kept beside a copy.

    Example:
        >>> import torch
        >>> q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
        >>> relation_operand([q, k]).shape  # on the CPU: joined
        torch.Size([1, 6, 8, 16])
    """
    parts = list(parts)
    if _resolve_impl(impl, parts[0], parts[0]) == "triton":
        from linearard.ops.triton_kernels import RELATION_PARTS

        if len(parts) <= RELATION_PARTS:
            return parts
    return _joined(parts)


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _reduce(per_row: Tensor, reduction: str, attention_mask: Tensor | None) -> Tensor:
    if reduction == "none":
        return per_row
    total = per_row.sum()
    if reduction == "sum":
        return total
    batch, heads, length = per_row.shape
    if attention_mask is None:
        return total / (batch * length * heads)
    # Stays on the device: no synchronisation. An all-padding batch gives 0 / 1 = 0.
    return total / (attention_mask.bool().sum() * heads).clamp(min=1)


def _check_inputs(q_s: Tensor, k_s: Tensor, q_t: Tensor, k_t: Tensor, mask: Tensor | None) -> None:
    named = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    for name, x in named.items():
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"{name} must be 4-D [B, heads, T, head_dim], got shape {tuple(x.shape)}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
        if x.device != q_s.device:
            raise ValueError(f"{name} is on {x.device} but q_s is on {q_s.device}")
    batch, heads, length, _ = q_s.shape
    if batch == 0 or length == 0:
        raise ValueError(f"q_s must have a non-empty batch and length, got shape {tuple(q_s.shape)}")
    for name, x in named.items():
        if x.shape[0] != batch:
            raise ValueError(f"{name} has batch size {x.shape[0]}, q_s has {batch}")
        if x.shape[2] != length:
            raise ValueError(f"{name} has length {x.shape[2]}, q_s has {length} (student and teacher must match)")
    if q_t.shape[1] != heads:
        raise ValueError(f"q_t has {q_t.shape[1]} heads, q_s has {heads}")
    for q_name, k_name in (("q_s", "k_s"), ("q_t", "k_t")):
        q, k = named[q_name], named[k_name]
        if k.shape[1] == 0 or heads % k.shape[1]:
            raise ValueError(f"{k_name} has {k.shape[1]} heads, which must divide the {heads} heads of {q_name}")
        if k.shape[3] != q.shape[3]:
            raise ValueError(f"{k_name} has head dim {k.shape[3]}, {q_name} has {q.shape[3]}")
        if k.dtype != q.dtype:
            raise TypeError(f"{k_name} is {k.dtype} but {q_name} is {q.dtype}")
    if mask is None:
        return
    if not isinstance(mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, length):
        raise ValueError(f"attention_mask must have shape [B, T] = {(batch, length)}, got {tuple(mask.shape)}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex:
        raise TypeError(f"attention_mask must be bool or integer, got {mask.dtype}")
    if mask.device != q_s.device:
        raise ValueError(f"attention_mask is on {mask.device} but q_s is on {q_s.device}")


def _check_scale(name: str, scale: float | None, head_dim: int) -> float:
    if scale is None:
        return head_dim**-0.5
    value = float(scale)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {scale}")
    return value


# Looked up once (importing Triton is left to the first Triton call); a constant to torch.compile.
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Whether the Triton package is installed."""
    return _TRITON_INSTALLED


def _resolve_impl(impl: str, q_s: Tensor, q_t: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    has_float64 = torch.float64 in (q_s.dtype, q_t.dtype)
    if impl == "auto":
        return "triton" if q_s.is_cuda and not has_float64 and triton_available() else "torch"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl='triton' needs the triton package; install it or use impl='torch'")
        interpreted = os.environ.get("TRITON_INTERPRET") == "1" and q_s.device.type == "cpu"
        if not (q_s.is_cuda or interpreted):
            raise ValueError(
                f"impl='triton' needs CUDA tensors, got {q_s.device} (or TRITON_INTERPRET=1 with CPU tensors)"
            )
        if has_float64:
            raise TypeError("impl='triton' supports float16, bfloat16 and float32 inputs; use impl='torch'")
    return impl
