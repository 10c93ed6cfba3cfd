"""The blocked PyTorch path: exact gradients, block boundaries, and linear memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from relation_kl_cases import CASES, Case, max_error, run_impl, value_and_grads

from linearard.ops.blocked import attention_kl_blocked


@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_float64(causal):
    case = Case("gradcheck", 2, 2, 2, 1, 6, 3, 2, causal=causal, padding="left")
    q_s, k_s, q_t, k_t, mask = case.inputs(torch.float64)
    q_s.requires_grad_(True)
    k_s.requires_grad_(True)

    def f(q, k):
        return attention_kl_blocked(q, k, q_t, k_t, mask, causal, 0.7, 0.4, block_rows=4)

    assert torch.autograd.gradcheck(f, (q_s, k_s))


def test_gradcheck_self_relation():
    x = torch.randn(1, 2, 7, 3, dtype=torch.float64, requires_grad=True)
    x_t = torch.randn(1, 2, 7, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda x: attention_kl_blocked(x, x, x_t, x_t, None, True, 0.5, 0.5, 3), (x,))


@pytest.mark.parametrize(
    ("case", "block_rows"), [(CASES[3], 16), (CASES[3], 50), (CASES[8], 1), (CASES[8], 5)], ids=str
)
def test_any_block_size_gives_the_same_result(case, block_rows):
    q_s, k_s, q_t, k_t, mask = case.inputs(torch.float32)
    weights = torch.randn(case.batch, case.heads, case.length, dtype=torch.float64)
    whole = value_and_grads(q_s, k_s, q_t, k_t, mask, case.kwargs(), run_impl("naive"), weights)

    def blocked(q_s, k_s, q_t, k_t, mask, kwargs):
        scale_s, scale_t = q_s.shape[-1] ** -0.5, q_t.shape[-1] ** -0.5
        return attention_kl_blocked(q_s, k_s, q_t, k_t, mask, kwargs["causal"], scale_s, scale_t, block_rows)

    got = value_and_grads(q_s, k_s, q_t, k_t, mask, case.kwargs(), blocked, weights)
    for g, w in zip(got, whole):
        assert max_error(g, w) <= 1e-5 * (1 + w.abs().max().item())


def test_backward_keeps_only_per_row_statistics():
    case = Case("saved", 2, 4, 2, 2, 64, 16, 8)
    q_s, k_s, q_t, k_t, _ = case.inputs(torch.float32)
    q_s.requires_grad_(True)
    out = attention_kl_blocked(q_s, k_s, q_t, k_t, None, True, 0.25, 0.35, block_rows=8)
    inputs = {x.data_ptr() for x in (q_s, k_s, q_t, k_t)}
    extra = [t for t in out.grad_fn.saved_tensors if t is not None and t.data_ptr() not in inputs]
    assert sum(t.numel() for t in extra) == 2 * case.batch * case.heads * case.length


# The child measures its own peak resident memory around one forward+backward at T=16384: a single
# float32 T×T matrix would be 1 GiB, while the blocked path needs a few slabs of 4M elements.
_MEMORY_PROBE = textwrap.dedent(
    """
    import json, resource, sys
    import torch
    from linearard import relation_kl

    torch.set_num_threads(2)
    unit = 1 if sys.platform == "darwin" else 1024  # ru_maxrss is bytes on macOS, KiB on Linux
    def peak():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * unit

    T = 16384
    x_s = torch.randn(1, 1, T, 16, requires_grad=True)
    x_t = torch.randn(1, 1, T, 16)
    relation_kl(x_s[:, :, :64], x_t[:, :, :64], impl="torch").backward()  # warm up lazy init
    before = peak()
    loss = relation_kl(x_s, x_t, impl="torch")
    loss.backward()
    print(json.dumps({"extra": peak() - before, "finite": bool(torch.isfinite(x_s.grad).all())}))
    """
)


def test_memory_is_far_below_quadratic_at_16k():
    result = subprocess.run(
        [sys.executable, "-c", _MEMORY_PROBE], capture_output=True, text=True, timeout=300, check=True
    )
    probe = json.loads(result.stdout.strip().splitlines()[-1])
    one_matrix = 16384 * 16384 * 4
    assert probe["finite"]
    assert probe["extra"] < one_matrix / 8, f"peak extra memory {probe['extra'] / 2**20:.0f} MiB"
