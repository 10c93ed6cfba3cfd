"""The fused Triton kernels on a CUDA GPU against float64 (skipped without one)."""

import pytest
import torch
from relation_kl_cases import (
    CASES,
    Case,
    check_compiled,
    check_deterministic,
    check_flash_rule,
    check_joined_relation,
    check_nan_propagation,
    check_reductions,
    check_self_relation,
)

from linearard import attention_kl

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# Wider heads and longer sequences than the CPU cases: several tiles of every kernel shape.
GPU_CASES = [
    *CASES,
    Case("T1000-D128-gqa4/2", 2, 4, 2, 1, 1000, 128, 128, padding="right"),
    Case("T777-D64-noncausal", 1, 3, 3, 1, 777, 64, 64, causal=False, padding="left"),
    Case("T300-D256", 1, 2, 1, 1, 300, 256, 256),
    Case("T600-close-teacher", 1, 2, 2, 2, 600, 128, 128, teacher_noise=0.05),
]


@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: c.name)
def test_bfloat16_matches_float64(case):
    check_flash_rule(case, "triton", torch.bfloat16, "cuda")


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("case", [GPU_CASES[2], GPU_CASES[3], GPU_CASES[-1]], ids=lambda c: c.name)
def test_other_dtypes_match_float64(case, dtype):
    check_flash_rule(case, "triton", dtype, "cuda")


@pytest.mark.parametrize("case", [CASES[3], CASES[7]], ids=lambda c: c.name)
def test_reductions(case):
    check_reductions(case, "triton", torch.float32, "cuda")


def test_deterministic():
    check_deterministic(GPU_CASES[-4], "triton", torch.bfloat16, "cuda")


def test_nan_and_inf_propagate():
    check_nan_propagation("triton", torch.bfloat16, "cuda")


def test_auto_uses_triton_on_cuda():
    q_s, k_s, q_t, k_t, mask = CASES[2].inputs(torch.bfloat16, "cuda")
    auto = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, reduction="none")
    fused = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, reduction="none", impl="triton")
    assert torch.equal(auto, fused)


def test_self_relation():
    check_self_relation("triton", torch.bfloat16, "cuda")


# SmolLM2's Q/K/V (9, 3, 3 heads of 64), a Llama-2-7B-like layer (narrowed), and a part of one head.
@pytest.mark.parametrize(
    ("heads", "length", "dims"),
    [((9, 3, 3), 1000, (64, 64)), ((8, 8, 8), 777, (128, 128)), ((3, 1), 300, (64, 128))],
    ids=str,
)
def test_joined_relation(heads, length, dims):
    check_joined_relation("triton", torch.bfloat16, "cuda", heads=heads, length=length, dims=dims)


def test_compiled_with_inductor_matches_eager():
    torch._dynamo.reset()
    check_compiled("inductor", "auto", "cuda", rtol=1e-4)
