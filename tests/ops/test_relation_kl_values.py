"""attention_kl / relation_kl on the CPU paths (naive and blocked) against float64."""

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
from linearard.ops import relation_operand

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_matches_float64_reference(case, impl, dtype):
    check_flash_rule(case, impl, dtype)


@pytest.mark.parametrize("impl", ["naive", "torch"])
@pytest.mark.parametrize("case", [CASES[2], CASES[3], CASES[7]], ids=lambda c: c.name)
def test_reductions(case, impl):
    check_reductions(case, impl, torch.float32)


def test_auto_is_blocked_on_cpu():
    q_s, k_s, q_t, k_t, mask = CASES[2].inputs(torch.float32)
    auto = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl="auto", reduction="none")
    blocked = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl="torch", reduction="none")
    assert torch.equal(auto, blocked)


def test_relation_kl_is_attention_kl_of_self_relations():
    x_s = torch.randn(2, 3, 21, 16, requires_grad=True)
    x_t = torch.randn(2, 3, 21, 8)
    mask = torch.ones(2, 21, dtype=torch.long)
    mask[0, :4] = 0
    rel = relation_kl(x_s, x_t, attention_mask=mask, scale_t=0.2)
    (grad_rel,) = torch.autograd.grad(rel, x_s)
    att = attention_kl(x_s, x_s, x_t, x_t, attention_mask=mask, scale_t=0.2, impl="naive")
    (grad_att,) = torch.autograd.grad(att, x_s)
    torch.testing.assert_close(rel, att)
    torch.testing.assert_close(grad_rel, grad_att)


def test_identical_relations_have_zero_kl_and_gradient():
    x = torch.randn(1, 2, 30, 16, requires_grad=True)
    kl = relation_kl(x, x.detach(), reduction="none")
    (grad,) = torch.autograd.grad(kl.sum(), x)
    assert kl.abs().max() < 1e-5 and grad.abs().max() < 1e-5


def test_teacher_gets_no_gradient():
    q_s, k_s, q_t, k_t, _ = CASES[1].inputs(torch.float32)
    q_t.requires_grad_(True)
    q_s.requires_grad_(True)
    attention_kl(q_s, k_s, q_t, k_t).backward()
    assert q_t.grad is None and q_s.grad is not None


def test_all_padding_batch_gives_zero_mean():
    q_s, k_s, q_t, k_t, _ = CASES[1].inputs(torch.float32)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    for impl in ("naive", "torch"):
        assert attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl=impl).item() == 0.0


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_deterministic(impl):
    check_deterministic(CASES[3], impl, torch.bfloat16)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_nan_and_inf_propagate(impl):
    check_nan_propagation(impl, torch.float32)


def test_masked_rows_get_zero_gradient_with_integer_mask():
    case = Case("int-mask", 2, 2, 2, 2, 12, 16, 16, padding="left")
    q_s, k_s, q_t, k_t, mask = case.inputs(torch.float32)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)
    attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask.long(), impl="torch").backward()
    pad = ~mask
    assert (q_s.grad.permute(0, 2, 1, 3)[pad] == 0).all()
    assert (k_s.grad.permute(0, 2, 1, 3)[pad] == 0).all()


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_self_relation(impl):
    check_self_relation(impl, torch.bfloat16)


@pytest.mark.parametrize("heads", [(3,), (3, 1), (3, 1, 2), (2, 1, 1, 3)], ids=str)
def test_joined_relation(heads):
    check_joined_relation("torch", torch.bfloat16, heads=heads)


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_joined_relation_with_the_teacher_joined(impl):
    check_joined_relation(impl, torch.bfloat16, teacher_joined=True)


def test_relation_operand_joins_where_the_implementation_would_copy():
    q, k = torch.randn(1, 4, 8, 16), torch.randn(1, 2, 8, 16)
    joined = relation_operand([q, k])
    torch.testing.assert_close(joined, torch.cat([q, k], dim=1), rtol=0, atol=0)
    assert relation_operand([q]) is q


def test_joined_relation_refuses_mismatched_parts():
    x = torch.randn(1, 2, 8, 4)
    with pytest.raises(ValueError, match=r"x_s has 2 tensors but x_t has 1"):
        relation_kl([x, x], [x])
    with pytest.raises(ValueError, match=r"x_s\[1\] has shape \(1, 2, 8, 5\)"):
        relation_kl([x, torch.randn(1, 2, 8, 5)], [x, x])
    with pytest.raises(ValueError, match=r"x_t\[1\] has 3 heads, x_s\[1\] has 2"):
        relation_kl([x, x], [x, torch.randn(1, 3, 8, 4)])
    with pytest.raises(TypeError, match="x_s must be a torch.Tensor or a non-empty sequence"):
        relation_kl([], [])
    with pytest.raises(ValueError, match=r"x_t has 3 heads; the 2 tensors of x_s have 4 in all"):
        relation_kl([x, x], torch.randn(1, 3, 8, 4))


def test_docstring_examples_run():
    import doctest
    import importlib

    module = importlib.import_module("linearard.ops.functional")
    result = doctest.testmod(module)
    assert result.attempted >= 2 and result.failed == 0
