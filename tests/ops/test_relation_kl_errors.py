"""Bad arguments to attention_kl / relation_kl raise a clear error naming the argument."""

import importlib

import pytest
import torch

from linearard import attention_kl, relation_kl

# The package exports the function relation_kl under the module's own name; fetch the module itself.
relation_kl_module = importlib.import_module("linearard.ops.functional")


def inputs(batch=2, heads=4, kv=2, length=8, dim=16, dtype=torch.float32):
    q = torch.randn(batch, heads, length, dim, dtype=dtype)
    k = torch.randn(batch, kv, length, dim, dtype=dtype)
    return q, k, q.clone(), k.clone()


def test_wrong_rank():
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(ValueError, match="k_s must be 4-D"):
        attention_kl(q_s, k_s[0], q_t, k_t)
    with pytest.raises(ValueError, match="x_s must be 4-D"):
        relation_kl(q_s[0], q_t)
    with pytest.raises(TypeError, match="x_t must be a torch.Tensor"):
        relation_kl(q_s, None)


def test_not_a_tensor_or_not_floating():
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(TypeError, match="q_t must be a torch.Tensor"):
        attention_kl(q_s, k_s, q_t.numpy(), k_t)
    with pytest.raises(TypeError, match="k_t must be float16, bfloat16, float32 or float64"):
        attention_kl(q_s, k_s, q_t, k_t.long())
    with pytest.raises(TypeError, match="k_s is torch.float16 but q_s is torch.float32"):
        attention_kl(q_s, k_s.half(), q_t, k_t)


def test_batch_and_length_mismatch():
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(ValueError, match="k_t has batch size 1, q_s has 2"):
        attention_kl(q_s, k_s, q_t, k_t[:1])
    with pytest.raises(ValueError, match="q_t has length 7, q_s has 8"):
        attention_kl(q_s, k_s, q_t[:, :, :7], k_t)
    with pytest.raises(ValueError, match="k_s has length 5"):
        attention_kl(q_s, k_s[:, :, :5], q_t, k_t)


def test_heads_must_divide():
    q_s, k_s, q_t, k_t = inputs(heads=4, kv=2)
    with pytest.raises(ValueError, match="k_s has 3 heads, which must divide the 4 heads of q_s"):
        attention_kl(q_s, torch.randn(2, 3, 8, 16), q_t, k_t)
    with pytest.raises(ValueError, match="q_t has 2 heads, q_s has 4"):
        attention_kl(q_s, k_s, q_t[:, :2], k_t)
    with pytest.raises(ValueError, match="k_t has head dim 8, q_t has 16"):
        attention_kl(q_s, k_s, q_t, k_t[..., :8])


def test_empty_input():
    q_s, k_s, q_t, k_t = inputs(length=0)
    with pytest.raises(ValueError, match="non-empty"):
        attention_kl(q_s, k_s, q_t, k_t)


def test_mask_shape_and_dtype():
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(ValueError, match=r"attention_mask must have shape \[B, T\] = \(2, 8\)"):
        attention_kl(q_s, k_s, q_t, k_t, attention_mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        attention_kl(q_s, k_s, q_t, k_t, attention_mask=torch.ones(2, 8))
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        attention_kl(q_s, k_s, q_t, k_t, attention_mask=[[1] * 8] * 2)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), 0.0, -1.0])
def test_bad_scale(scale):
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(ValueError, match="scale_t must be a positive finite number"):
        attention_kl(q_s, k_s, q_t, k_t, scale_t=scale)


def test_unknown_reduction_or_impl():
    q_s, k_s, q_t, k_t = inputs()
    with pytest.raises(ValueError, match="reduction must be one of"):
        attention_kl(q_s, k_s, q_t, k_t, reduction="avg")
    with pytest.raises(ValueError, match="impl must be one of"):
        attention_kl(q_s, k_s, q_t, k_t, impl="cuda")


def test_triton_needs_cuda_or_the_interpreter(monkeypatch):
    q_s, k_s, q_t, k_t = inputs()
    monkeypatch.setattr(relation_kl_module, "triton_available", lambda: True)  # whether or not triton is installed
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        attention_kl(q_s, k_s, q_t, k_t, impl="triton")


def test_triton_needs_triton(monkeypatch):
    q_s, k_s, q_t, k_t = inputs()
    monkeypatch.setattr(relation_kl_module, "triton_available", lambda: False)
    with pytest.raises(ValueError, match="impl='triton' needs the triton package"):
        attention_kl(q_s, k_s, q_t, k_t, impl="triton")
    # "auto" quietly takes the blocked path instead.
    assert torch.isfinite(attention_kl(q_s, k_s, q_t, k_t, impl="auto"))


def test_triton_refuses_float64(monkeypatch):
    q_s, k_s, q_t, k_t = inputs(dtype=torch.float64)
    monkeypatch.setattr(relation_kl_module, "triton_available", lambda: True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(TypeError, match="impl='triton' supports float16, bfloat16 and float32"):
        attention_kl(q_s, k_s, q_t, k_t, impl="triton")
