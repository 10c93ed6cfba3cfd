"""The Triton kernels under Triton's CPU interpreter, forward and backward, on tiny shapes.

Triton decides between compiling and interpreting when a kernel is defined, from TRITON_INTERPRET,
so these checks run in their own process:

    TRITON_INTERPRET=1 python -m pytest tests/ops/triton_interpret_cases.py

`test_relation_kl_triton_interpret.py` does exactly that from a plain pytest run. The interpreter's
tl.dot does not handle bfloat16 (it sees the raw bits), so float16 and float32 stand in for it here;
bfloat16 is covered by the CUDA tests.
"""

import os

import pytest
import torch
from relation_kl_cases import (
    CASES,
    Case,
    check_deterministic,
    check_flash_rule,
    check_joined_relation,
    check_nan_propagation,
    check_reductions,
    check_self_relation,
)

from linearard import attention_kl, relation_kl

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("run with TRITON_INTERPRET=1 (see the module docstring)", allow_module_level=True)

import triton.runtime.interpreter as _interpreter


def _index_scalars_of_any_rank() -> None:
    """Let `range()` take program-id arithmetic under numpy >= 2.4 (triton-lang/triton#9171).

    The interpreter holds scalars as 1-element arrays and converts them with int(), which numpy 2.4
    refuses for arrays of rank 1; fixed upstream after Triton 3.6.
    """
    original = _interpreter._patch_lang_tensor

    def patch(tensor, scope):
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(())))

    _interpreter._patch_lang_tensor = patch


_index_scalars_of_any_rank()

INTERPRETER_CASES = [
    CASES[0],  # T = 1
    CASES[1],  # T = 7, right padding, GQA on the student only
    Case("T45-gqa4/2/1-D16/D24-left", 2, 4, 2, 1, 45, 16, 24, padding="left"),
    Case("T40-noncausal-right", 1, 2, 2, 2, 40, 32, 16, causal=False, padding="right"),
    Case("T20-D96/D128-scales", 1, 1, 1, 1, 20, 96, 128, scale_s=0.3, scale_t=0.05),
    CASES[7],  # a sequence that is all padding
    CASES[8],  # non-contiguous inputs
    CASES[10],  # teacher close to the student
]


@pytest.mark.parametrize("case", INTERPRETER_CASES, ids=lambda c: c.name)
def test_float16_matches_float64(case):
    check_flash_rule(case, "triton", torch.float16)


@pytest.mark.parametrize("case", [INTERPRETER_CASES[2], INTERPRETER_CASES[3]], ids=lambda c: c.name)
def test_float32_matches_float64(case):
    check_flash_rule(case, "triton", torch.float32)


def test_reductions():
    check_reductions(INTERPRETER_CASES[2], "triton", torch.float32)


def test_deterministic():
    check_deterministic(INTERPRETER_CASES[3], "triton", torch.float16)


def test_nan_and_inf_propagate():
    check_nan_propagation("triton", torch.float32)


def test_self_relation():
    check_self_relation("triton", torch.float16)


@pytest.mark.parametrize("heads", [(3,), (3, 1), (3, 1, 2), (2, 1, 1, 3)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_joined_relation(heads, dtype):
    check_joined_relation("triton", dtype, heads=heads)


def test_joined_relation_with_the_teacher_joined():
    check_joined_relation("triton", torch.float32, teacher_joined=True)


def test_relation_operand_keeps_what_the_kernels_read_in_place():
    from linearard.ops import relation_operand

    xs = [torch.randn(1, h, 8, 16) for h in (4, 2, 2, 1)]
    kept = relation_operand(xs[:3], impl="triton")
    assert len(kept) == 3 and all(a is b for a, b in zip(kept, xs))
    torch.testing.assert_close(relation_operand(xs, impl="triton"), torch.cat(xs, dim=1), rtol=0, atol=0)


def test_output_can_be_modified_in_place():
    q_s, k_s, q_t, k_t, mask = INTERPRETER_CASES[1].inputs(torch.float32)
    q_s.requires_grad_(True)
    per_row = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, reduction="none", impl="triton")
    per_row.mul_(2.0)
    per_row.sum().backward()
    assert torch.isfinite(q_s.grad).all()


def test_gradient_for_keys_only():
    q_s, k_s, q_t, k_t, mask = INTERPRETER_CASES[2].inputs(torch.float32)
    k_s.requires_grad_(True)
    attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl="triton").backward()
    k_ref = k_s.detach().double().requires_grad_(True)
    attention_kl(q_s.double(), k_ref, q_t.double(), k_t.double(), attention_mask=mask, impl="naive").backward()
    torch.testing.assert_close(k_s.grad, k_ref.grad.float(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("needs", [(True, True), (False, True)], ids=str)
def test_opcheck(needs):
    from linearard.ops.triton_kernels import triton_backward, triton_forward

    q_s, k_s, q_t, k_t, mask = INTERPRETER_CASES[1].inputs(torch.float32)
    settings = (True, 0.3, 0.2)
    q_s.requires_grad_(True)
    torch.library.opcheck(triton_forward, (q_s, k_s, q_t, k_t, mask, *settings))
    kl, lse_s, lse_t = triton_forward(q_s.detach(), k_s, q_t, k_t, mask, *settings)
    grad = torch.randn_like(kl)
    torch.library.opcheck(triton_backward, (grad, lse_s, lse_t, q_s.detach(), k_s, q_t, k_t, mask, *settings, *needs))


@pytest.mark.parametrize("needs", [(True, False, True), (False, False, False)], ids=str)
def test_opcheck_joined_relation(needs):
    from linearard.ops.triton_kernels import triton_relation_backward, triton_relation_forward

    q_s, k_s, q_t, k_t, mask = INTERPRETER_CASES[2].inputs(torch.float32)
    parts = (q_s.detach().requires_grad_(True), None, k_s)
    teacher = (q_t, None, k_t.expand(-1, k_s.shape[1], -1, -1))  # each part: the student's heads
    settings = (True, 0.3, 0.2)
    torch.library.opcheck(triton_relation_forward, (*parts, *teacher, mask, *settings))
    kl, lse_s, lse_t = triton_relation_forward(q_s, None, k_s, *teacher, mask, *settings)
    grad = torch.randn_like(kl)
    args = (grad, lse_s, lse_t, q_s, None, k_s, *teacher, mask, *settings, *needs)
    torch.library.opcheck(triton_relation_backward, args)


def test_compiled_without_graph_breaks_matches_eager():
    q_s, k_s, q_t, k_t, mask = INTERPRETER_CASES[1].inputs(torch.float32)

    def loss(q_s, k_s, q_t, k_t, mask):
        attention = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl="triton")
        queries = relation_kl(q_s, q_t, attention_mask=mask, reduction="sum", causal=False, impl="triton")
        joined = relation_kl([q_s, k_s], [q_t, k_t[:, :1]], attention_mask=mask, reduction="sum", impl="triton")
        return attention + queries + joined

    params = (q_s.requires_grad_(True), k_s.requires_grad_(True))
    expected = loss(q_s, k_s, q_t, k_t, mask)
    expected_grads = torch.autograd.grad(expected, params)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(q_s, k_s, q_t, k_t, mask)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)
