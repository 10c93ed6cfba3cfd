"""What every relation-KL implementation registers with PyTorch besides its kernels.

Each implementation (blocked PyTorch, fused Triton) is a pair of `torch.library.custom_op` operators:

    linearard::attention_kl_<impl>(q_s, k_s, q_t, k_t, attention_mask, causal, scale_s, scale_t, ...)
        -> (kl, lse_s, lse_t), each [B, Hq, T]
    linearard::attention_kl_<impl>_backward(grad_kl, lse_s, lse_t, q_s, k_s, q_t, k_t, attention_mask,
        causal, scale_s, scale_t, ..., need_dq, need_dk) -> (dq, dk)

where "..." are the implementation's own settings. The fused implementation also has a self-relation
pair over up to three tensors whose heads it joins without copying them (`RELATION`):

    linearard::relation_kl_triton(s0, s1?, s2?, t0, t1?, t2?, attention_mask, causal, scale_s, scale_t)
        -> (kl, lse_s, lse_t), each [B, ΣH, T]
    linearard::relation_kl_triton_backward(grad_kl, lse_s, lse_t, s0, ..., t2, attention_mask, causal,
        scale_s, scale_t, need0, need1, need2) -> the joined gradient [B, ΣH, T, Ds]

`register_relation_kl` gives such a pair its fake implementations (shapes, dtypes and device only), so
that `torch.compile` keeps each call as one node of its graph, and the forward its autograd formula,
which calls the backward operator: that is the only autograd path of every implementation.

Each name ends in the package version (`operator_name`): torch's on-disk cache of compiled graphs knows
an operator by its name alone, not by what its fake implementation returns, so a release whose fakes
changed would otherwise run graphs compiled against the old ones.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import Tensor

from linearard import __version__
from linearard.ops.naive import accumulation_dtype

if TYPE_CHECKING:
    from torch.library import CustomOpDef


def operator_name(name: str) -> str:
    """The qualified name of one of the package's operators: ``linearard::<name>_v<version>``."""
    return f"linearard::{name}_v{re.sub(r'[^0-9A-Za-z]', '_', __version__)}"


class Signature(NamedTuple):
    """How a forward/backward pair takes its tensors and gives their gradients."""

    students: int  # the student tensors that lead the arguments; as many teacher tensors and the mask follow
    fake_forward: Callable
    fake_backward: Callable
    gradients: Callable  # (backward's result, student tensors) -> one gradient per student tensor


def _fake_forward(q_s: Tensor, k_s: Tensor, q_t: Tensor, *_settings) -> tuple[Tensor, Tensor, Tensor]:
    batch, heads, length, _ = q_s.shape
    dtype = accumulation_dtype(q_s, q_t)
    return tuple(q_s.new_empty(batch, heads, length, dtype=dtype) for _ in range(3))


def _fake_backward(_grad: Tensor, _lse_s: Tensor, _lse_t: Tensor, q_s: Tensor, k_s: Tensor, *rest) -> tuple:
    need_dq, need_dk = rest[-2:]  # the backward's last two arguments
    return (
        q_s.new_empty(q_s.shape) if need_dq else skipped_gradient(q_s),
        k_s.new_empty(k_s.shape) if need_dk else skipped_gradient(k_s),
    )


ATTENTION = Signature(2, _fake_forward, _fake_backward, lambda result, _students: result)


def _joined_heads(parts: tuple[Tensor | None, ...]) -> int:
    return sum(x.shape[1] for x in parts if x is not None)


def _fake_relation_forward(s0: Tensor, s1: Tensor | None, s2: Tensor | None, t0: Tensor, *_rest) -> tuple:
    batch, _, length, _ = s0.shape
    dtype = accumulation_dtype(s0, t0)
    return tuple(s0.new_empty(batch, _joined_heads((s0, s1, s2)), length, dtype=dtype) for _ in range(3))


def _fake_relation_backward(_grad: Tensor, _lse_s: Tensor, _lse_t: Tensor, s0: Tensor, s1, s2, *rest) -> Tensor:
    if not any(rest[-3:]):  # need0, need1, need2
        return skipped_gradient(s0)
    batch, _, length, dim = s0.shape
    return s0.new_empty(batch, _joined_heads((s0, s1, s2)), length, dim)


def _split_joined(joined: Tensor, parts: tuple[Tensor | None, ...]) -> list[Tensor | None]:
    """Each part's gradient, a view of the joined one (or None for an absent part)."""
    grads, start = [], 0
    for x in parts:
        if x is None or joined.numel() == 0:
            grads.append(None)
            continue
        grads.append(joined[:, start : start + x.shape[1]])
        start += x.shape[1]
    return grads


RELATION = Signature(3, _fake_relation_forward, _fake_relation_backward, _split_joined)


def register_relation_kl(
    forward: CustomOpDef,
    backward: CustomOpDef,
    *,
    eager: tuple[Callable, Callable],
    signature: Signature = ATTENTION,
) -> Callable[..., Tensor]:
    """Register the fake implementations of a forward/backward pair and the forward's autograd formula;
    returns the function that computes the per-row KL with gradients.

    That function calls the operator inside a compiled graph, and outside one the operator's own Python
    functions (`eager`) through a plain autograd.Function: the same kernels and formula without the
    dispatcher's per-call cost, which on an H200 host added 18% to a 32K-token restore step of SmolLM2
    (60 calls a step). `signature` says how the pair takes its tensors: `ATTENTION` or `RELATION`.
    """
    students = signature.students
    tensor_inputs = 2 * students + 1
    forward.register_fake(signature.fake_forward)
    backward.register_fake(signature.fake_backward)

    def setup_context(ctx, inputs: tuple, output: tuple[Tensor, Tensor, Tensor]) -> None:
        _, lse_s, lse_t = output
        ctx.save_for_backward(*inputs[:tensor_inputs], lse_s, lse_t)
        ctx.config = inputs[tensor_inputs:]
        # The log-sum-exps are statistics for the backward, not results: no zero gradients for them.
        ctx.mark_non_differentiable(lse_s, lse_t)
        ctx.set_materialize_grads(False)

    def gradients(ctx, grad_kl: Tensor | None, run_backward: Callable) -> tuple:
        # Teacher tensors, mask and settings get no gradient; nor does anything when kl got none.
        no_grads = (None,) * len(ctx.needs_input_grad)
        if grad_kl is None:
            return no_grads
        *tensors, lse_s, lse_t = ctx.saved_tensors
        needs = ctx.needs_input_grad[:students]
        result = run_backward(grad_kl, lse_s, lse_t, *tensors, *ctx.config, *needs)
        grads = signature.gradients(result, tensors[:students])
        return (*(g if need else None for g, need in zip(grads, needs)), *no_grads[students:])

    def backward_formula(ctx, grad_kl: Tensor | None, _grad_lse_s: None, _grad_lse_t: None) -> tuple:
        return gradients(ctx, grad_kl, backward)

    forward.register_autograd(backward_formula, setup_context=setup_context)
    eager_forward, eager_backward = eager

    class EagerKL(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *inputs):
            kl, lse_s, lse_t = eager_forward(*inputs)
            setup_context(ctx, inputs, (kl, lse_s, lse_t))
            return kl

        @staticmethod
        def backward(ctx, grad_kl):
            return gradients(ctx, grad_kl, eager_backward)

    def relation_kl_rows(*inputs) -> Tensor:
        if torch.compiler.is_compiling():
            return forward(*inputs)[0]
        return EagerKL.apply(*inputs)

    return relation_kl_rows


def skipped_gradient(like: Tensor) -> Tensor:
    """What a backward operator returns for a gradient it was told not to compute (read as None)."""
    return like.new_empty(0)
