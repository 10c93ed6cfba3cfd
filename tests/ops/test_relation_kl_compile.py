"""The relation KL as registered operators: `torch.library.opcheck`, and `torch.compile` without graph breaks."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from relation_kl_cases import Case, check_compiled, max_error, run_impl, value_and_grads

from linearard import attention_kl, relation_kl
from linearard.ops.blocked import blocked_backward, blocked_forward

OPCHECK_CASES = [
    (Case("T9-mha", 1, 2, 2, 2, 9, 8, 8), torch.float32),
    (Case("T11-gqa4/2/1-D8/D12-left", 2, 4, 2, 1, 11, 8, 12, padding="left"), torch.float32),
    (Case("T10-noncausal-right", 2, 2, 1, 2, 10, 6, 4, causal=False, padding="right"), torch.float64),
    (Case("T8-bf16-noncontiguous", 1, 2, 1, 1, 8, 8, 4, noncontiguous=True, padding="right"), torch.bfloat16),
]


def _op_inputs(case: Case, dtype: torch.dtype) -> tuple:
    q_s, k_s, q_t, k_t, mask = case.inputs(dtype)
    return q_s.requires_grad_(True), k_s.requires_grad_(True), q_t, k_t, mask, case.causal, 0.7, 0.4, 4


@pytest.mark.parametrize(("case", "dtype"), OPCHECK_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_opcheck_forward(case, dtype):
    torch.library.opcheck(blocked_forward, _op_inputs(case, dtype))


# (need_dq, need_dk): both for every case, one at a time for the GQA case.
BACKWARD_CASES = [
    *((case, dtype, (True, True)) for case, dtype in OPCHECK_CASES),
    (*OPCHECK_CASES[1], (True, False)),
    (*OPCHECK_CASES[1], (False, True)),
]


@pytest.mark.parametrize(("case", "dtype", "needs"), BACKWARD_CASES, ids=lambda c: getattr(c, "name", str(c)))
def test_opcheck_backward(case, dtype, needs):
    q_s, k_s, q_t, k_t, mask, *settings = _op_inputs(case, dtype)
    with torch.no_grad():
        kl, lse_s, lse_t = blocked_forward(q_s, k_s, q_t, k_t, mask, *settings)
    grad = torch.randn_like(kl)
    args = (grad, lse_s, lse_t, q_s.detach(), k_s.detach(), q_t, k_t, mask, *settings, *needs)
    torch.library.opcheck(blocked_backward, args)
    dq, dk = blocked_backward(*args)
    assert dq.shape == (q_s.shape if needs[0] else (0,))
    assert dk.shape == (k_s.shape if needs[1] else (0,))


@pytest.mark.parametrize("wanted", ["q_s", "k_s"])
def test_gradient_for_one_student_tensor_only(wanted):
    case = OPCHECK_CASES[1][0]
    q_s, k_s, q_t, k_t, mask = case.inputs(torch.float32)
    student = {"q_s": q_s, "k_s": k_s}
    student[wanted].requires_grad_(True)
    attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl="torch").backward()
    assert all(x.grad is None for name, x in student.items() if name != wanted)
    weights = torch.full((case.batch, case.heads, case.length), 1.0, dtype=torch.float64)
    ref = value_and_grads(q_s.detach(), k_s.detach(), q_t, k_t, mask, case.kwargs(), run_impl("naive"), weights)
    rows = mask.sum().item() * case.heads  # the mean's divisor
    expected = ref[1 if wanted == "q_s" else 2] / rows
    assert max_error(student[wanted].grad, expected) <= 1e-5 * (1 + expected.abs().max().item())


def test_compiled_with_aot_eager_is_one_graph_and_matches_eager():
    torch._dynamo.reset()
    graphs = []

    def recording_aot_eager(gm, example_inputs):
        graphs.append(gm)
        return torch._dynamo.lookup_backend("aot_eager")(gm, example_inputs)

    check_compiled(recording_aot_eager)
    assert len(graphs) == 1
    calls = [node.target for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert calls.count(blocked_forward._opoverload) == 2


def test_compiled_across_lengths_matches_eager():
    """A new length recompiles once with a symbolic length; the fake implementations serve it too."""
    torch._dynamo.reset()

    def loss(x_s, x_t, mask):
        return relation_kl(x_s, x_t, attention_mask=mask)

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    for length in (10, 12, 17):
        x_s, _, x_t, _, mask = Case("lengths", 2, 3, 3, 3, length, 8, 5, padding="left").inputs(torch.float32)
        x_s.requires_grad_(True)
        got = compiled(x_s, x_t, mask)
        (got_grad,) = torch.autograd.grad(got, x_s)
        expected = loss(x_s, x_t, mask)
        (expected_grad,) = torch.autograd.grad(expected, x_s)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
        torch.testing.assert_close(got_grad, expected_grad, rtol=1e-5, atol=1e-7)


@pytest.mark.slow  # inductor's C++ build takes tens of seconds on a small CPU
def test_compiled_with_inductor_matches_eager():
    torch._dynamo.reset()
    check_compiled("inductor")


# Compiles a call of the blocked operator with inductor, as package version argv[1], and prints inductor's
# counters: whether the graph came from the on-disk cache.
_CACHE_PROBE = textwrap.dedent(
    """
    import json, sys
    import linearard
    linearard.__version__ = sys.argv[1]  # before the operators register
    import torch
    from torch._dynamo.utils import counters
    from linearard.ops.blocked import attention_kl_blocked
    q = torch.randn(1, 2, 9, 8)
    with torch.no_grad():
        torch.compile(lambda a, b: attention_kl_blocked(a, a, b, b, None, True, 0.5, 0.5, 4))(q, q + 1)
    print(json.dumps(counters["inductor"]))
    """
)


def test_a_new_version_does_not_reuse_graphs_compiled_for_the_old_operators(tmp_path):
    """torch's compiled-graph cache knows an operator by its name, not by what its fake returns: the
    version in the names keeps an upgrade whose fakes changed from running graphs compiled for the old."""

    def compile_as(version: str) -> dict:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
        result = subprocess.run(
            [sys.executable, "-c", _CACHE_PROBE, version], env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return json.loads(result.stdout.strip().splitlines()[-1])

    assert compile_as("0.1.0").get("fxgraph_cache_miss") == 1
    assert compile_as("0.1.0").get("fxgraph_cache_hit") == 1  # the cache is on, and serves the same version
    assert compile_as("0.2.0rc1").get("fxgraph_cache_miss") == 1
