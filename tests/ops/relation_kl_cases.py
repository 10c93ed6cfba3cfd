"""Shared shapes and checks for the relation-KL tests (CPU, Triton interpreter and CUDA).

Every implementation is compared with the materialised float64 computation on the very same (rounded)
inputs, under the flash-attention rule: its error in dtype X may be at most twice the error of plain
PyTorch computed entirely in dtype X, plus a tiny epsilon.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from linearard.ops import attention_kl, relation_kl
from linearard.ops.naive import attention_kl_naive


@dataclass(frozen=True)
class Case:
    """One input shape. padding: None, "right", "left" or "all" (one sequence is all padding).

    teacher_noise: if set, the teacher is the student plus this much noise (needs equal shapes), so
    that P_t is close to P_s and the gradient is a small difference of probabilities.
    """

    name: str
    batch: int
    heads: int
    kv_s: int
    kv_t: int
    length: int
    dim_s: int
    dim_t: int
    causal: bool = True
    padding: str | None = None
    scale_s: float | None = None
    scale_t: float | None = None
    noncontiguous: bool = False
    teacher_noise: float | None = None

    def inputs(self, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
        """(q_s, k_s, q_t, k_t, attention_mask) drawn from a fixed seed."""
        gen = torch.Generator().manual_seed(seed)

        def draw(heads: int, dim: int) -> torch.Tensor:
            if self.noncontiguous:
                # [B, T, H, 2D] sliced and transposed: strides in every dim differ from contiguous.
                x = torch.randn(self.batch, self.length, heads, 2 * dim, generator=gen)
                x = x[..., :dim].transpose(1, 2)
            else:
                x = torch.randn(self.batch, heads, self.length, dim, generator=gen)
            return (1.5 * x).to(device=device, dtype=dtype)

        q_s, k_s = draw(self.heads, self.dim_s), draw(self.kv_s, self.dim_s)
        if self.teacher_noise is None:
            q_t, k_t = draw(self.heads, self.dim_t), draw(self.kv_t, self.dim_t)
        else:
            noise = self.teacher_noise / 1.5
            q_t = (q_s.float() + noise * draw(self.heads, self.dim_t).float()).to(dtype)
            k_t = (k_s.float() + noise * draw(self.kv_t, self.dim_t).float()).to(dtype)
        return q_s, k_s, q_t, k_t, self.mask(device)

    def mask(self, device: str = "cpu") -> torch.Tensor | None:
        if self.padding is None:
            return None
        mask = torch.ones(self.batch, self.length, dtype=torch.bool)
        for b in range(self.batch):
            pad = min(self.length - 1, 3 * b + 2)
            if self.padding == "right":
                mask[b, self.length - pad :] = False
            elif self.padding == "left":
                mask[b, :pad] = False
        if self.padding == "all":
            mask[-1] = False
            mask[0, : self.length // 3] = False
        return mask.to(device)

    def kwargs(self) -> dict:
        return dict(causal=self.causal, scale_s=self.scale_s, scale_t=self.scale_t)


CASES = [
    Case("T1", 1, 2, 2, 2, 1, 16, 16),
    Case("T7-right", 2, 2, 1, 2, 7, 16, 16, padding="right"),
    Case("T129-gqa9/3-left", 1, 9, 3, 3, 129, 64, 64, padding="left"),
    Case("T129-noncausal-left", 2, 9, 3, 9, 129, 16, 16, causal=False, padding="left"),
    Case("gqa32/8-scales", 1, 32, 8, 8, 33, 16, 16, scale_s=0.3, scale_t=0.05),
    Case("D96/D128-right", 1, 2, 1, 2, 40, 96, 128, padding="right"),
    Case("D256/D64-noncausal", 1, 2, 2, 1, 24, 256, 64, causal=False),
    Case("all-padding-row", 3, 2, 2, 1, 17, 16, 16, padding="all"),
    Case("noncontiguous-gqa", 2, 4, 2, 1, 19, 32, 16, padding="left", noncontiguous=True),
    Case("T1000", 1, 1, 1, 1, 1000, 16, 16, padding="left"),
    Case("close-teacher", 1, 2, 1, 1, 50, 32, 32, teacher_noise=0.05),
]


def max_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    return (x.double() - ref.double()).abs().max().item()


def value_and_grads(q_s, k_s, q_t, k_t, mask, kwargs, run, weights):
    """Per-row KL and the gradients of Σ weights·KL for q_s and k_s, with `run` as the implementation."""
    q_s = q_s.detach().requires_grad_(True)
    k_s = k_s.detach().requires_grad_(True)
    out = run(q_s, k_s, q_t, k_t, mask, kwargs)
    (out.double() * weights).sum().backward()
    return out.detach(), q_s.grad, k_s.grad


def run_impl(impl: str):
    def run(q_s, k_s, q_t, k_t, mask, kwargs):
        return attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, reduction="none", impl=impl, **kwargs)

    return run


def run_plain(dtype: torch.dtype):
    """Plain materialised PyTorch with every intermediate in `dtype`: the error yardstick."""

    def run(q_s, k_s, q_t, k_t, mask, kwargs):
        scale_s = kwargs["scale_s"] or q_s.shape[-1] ** -0.5
        scale_t = kwargs["scale_t"] or q_t.shape[-1] ** -0.5
        return attention_kl_naive(q_s, k_s, q_t, k_t, mask, kwargs["causal"], scale_s, scale_t, dtype)

    return run


def check_flash_rule(case: Case, impl: str, dtype: torch.dtype, device: str = "cpu", seed: int = 0) -> None:
    """Value and both gradients of `impl` in `dtype` against float64, within 2× plain PyTorch's error."""
    q_s, k_s, q_t, k_t, mask = case.inputs(dtype, device, seed)
    kwargs = case.kwargs()
    weights = torch.randn(case.batch, case.heads, case.length, generator=torch.Generator().manual_seed(seed + 1))
    weights = weights.double().to(device)
    as64 = [x.double() for x in (q_s, k_s, q_t, k_t)]
    ref = value_and_grads(*as64, mask, kwargs, run_impl("naive"), weights)
    plain = value_and_grads(q_s, k_s, q_t, k_t, mask, kwargs, run_plain(dtype), weights)
    got = value_and_grads(q_s, k_s, q_t, k_t, mask, kwargs, run_impl(impl), weights)
    assert got[0].dtype == torch.float32 and got[0].shape == (case.batch, case.heads, case.length)
    assert got[1].dtype == q_s.dtype and got[2].dtype == k_s.dtype
    tiny = 1e-6 if dtype == torch.float32 else 1e-5
    for what, g, p, r in zip(("value", "dq_s", "dk_s"), got, plain, ref):
        assert torch.isfinite(g).all(), f"{case.name} {impl} {dtype}: non-finite {what}"
        err, base = max_error(g, r), max_error(p, r)
        bound = 2 * base + tiny * (1 + r.abs().max().item())
        assert err <= bound, f"{case.name} {impl} {dtype}: {what} error {err:.3g} > {bound:.3g} (plain {base:.3g})"
    if mask is not None:
        # Padding rows: exactly zero value and zero query gradient.
        pad = ~mask.bool()
        assert (got[0].permute(0, 2, 1)[pad] == 0).all()
        assert (got[1].permute(0, 2, 1, 3)[pad] == 0).all()


def check_reductions(case: Case, impl: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """sum and mean agree with the float64 per-row values; mean divides by real rows × heads."""
    q_s, k_s, q_t, k_t, mask = case.inputs(dtype, device)
    kwargs = dict(attention_mask=mask, impl=impl, **case.kwargs())
    per_row = attention_kl(*(x.double() for x in (q_s, k_s, q_t, k_t)), reduction="none", **{**kwargs, "impl": "naive"})
    rows = mask.sum().item() if mask is not None else case.batch * case.length
    total = attention_kl(q_s, k_s, q_t, k_t, reduction="sum", **kwargs)
    mean = attention_kl(q_s, k_s, q_t, k_t, reduction="mean", **kwargs)
    assert total.shape == () and mean.shape == ()
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    assert abs(total.item() - per_row.sum().item()) <= tol * (1 + per_row.abs().sum().item())
    expected_mean = per_row.sum().item() / max(1, rows * case.heads)
    assert abs(mean.item() - expected_mean) <= tol * (1 + abs(expected_mean))


def check_deterministic(case: Case, impl: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """Two runs of forward and backward give bit-identical results."""
    q_s, k_s, q_t, k_t, mask = case.inputs(dtype, device)
    weights = torch.rand(case.batch, case.heads, case.length, dtype=torch.float64).to(device)
    first = value_and_grads(q_s, k_s, q_t, k_t, mask, case.kwargs(), run_impl(impl), weights)
    second = value_and_grads(q_s, k_s, q_t, k_t, mask, case.kwargs(), run_impl(impl), weights)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def check_nan_propagation(impl: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """NaN or Inf in any input that a real row reads gives NaN; one hidden behind padding does not."""
    case = Case("nan", 2, 2, 1, 2, 9, 16, 16, padding="right")
    for which in range(4):
        for bad in (float("nan"), float("inf"), float("-inf")):
            inputs = list(case.inputs(dtype, device))
            inputs[which][0, 0, 2, 3] = bad
            q_s, k_s, q_t, k_t, mask = inputs
            out = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl=impl)
            assert torch.isnan(out), f"input {which} = {bad}: got {out.item()}"
    q_s, k_s, q_t, k_t, mask = case.inputs(dtype, device)
    k_s[0, 0, -1] = float("nan")  # the last token of sequence 0 is padding
    assert torch.isfinite(attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl=impl))
    q_s, k_s, q_t, k_t, _ = case.inputs(dtype, device)
    k_t[0, 0, 5] = float("nan")  # teacher key head 0 serves query head 0; causal: rows >= 5 read it
    per_row = attention_kl(q_s, k_s, q_t, k_t, reduction="none", impl=impl)
    assert torch.isnan(per_row[0, 0, 5:]).all()
    per_row[0, 0, 5:] = 0.0
    assert torch.isfinite(per_row).all()


def check_self_relation(impl: str, dtype: torch.dtype, device: str = "cpu") -> None:
    """relation_kl(x_s, x_t): x_s is both queries and keys; its gradient sums both roles."""
    case = Case("self", 2, 3, 3, 3, 40, 32, 16, padding="left")
    x_s, _, x_t, _, mask = case.inputs(dtype, device)
    weights = torch.randn(case.batch, case.heads, case.length, dtype=torch.float64).to(device)

    def grad_of(x, teacher, run):
        x = x.detach().requires_grad_(True)
        (run(x, teacher).double() * weights).sum().backward()
        return x.grad

    def kl(impl_name):
        return lambda x, t: relation_kl(x, t, attention_mask=mask, reduction="none", impl=impl_name)

    def plain(x, t):
        return attention_kl_naive(x, x, t, t, mask, True, x.shape[-1] ** -0.5, t.shape[-1] ** -0.5, dtype)

    ref = grad_of(x_s.double(), x_t.double(), kl("naive"))
    err = max_error(grad_of(x_s, x_t, kl(impl)), ref)
    base = max_error(grad_of(x_s, x_t, plain), ref)
    tiny = 1e-6 if dtype == torch.float32 else 1e-5
    assert err <= 2 * base + tiny * (1 + ref.abs().max().item()), f"{impl} {dtype}: {err:.3g} vs plain {base:.3g}"


def _joined_inputs(dtype: torch.dtype, device: str, heads: tuple[int, ...], length: int, dims: tuple[int, int]):
    """Student and teacher parts with `heads` heads each, laid out as a model holds them: even parts
    contiguous [B, H, T, D], odd ones a projection's [B, T, H, D] output seen through a transpose."""
    gen = torch.Generator().manual_seed(1)
    batch = 2

    def draw(h: int, dim: int, transposed: bool) -> torch.Tensor:
        if transposed:
            x = torch.randn(batch, length, h, dim, generator=gen).transpose(1, 2)
        else:
            x = torch.randn(batch, h, length, dim, generator=gen)
        return (1.5 * x).to(device=device, dtype=dtype)

    parts_s = [draw(h, dims[0], i % 2 == 1) for i, h in enumerate(heads)]
    parts_t = [draw(h, dims[1], i % 2 == 0) for i, h in enumerate(heads)]
    mask = torch.ones(batch, length, dtype=torch.bool)
    mask[1, :5] = False
    return parts_s, parts_t, mask.to(device)


def check_joined_relation(
    impl: str, dtype: torch.dtype, device: str = "cpu", heads=(3, 1, 2), length=45, dims=(32, 16),
    teacher_joined: bool = False,
) -> None:
    """relation_kl over several tensors: the relation of their joined heads, each tensor getting its
    own heads' gradient, within 2× plain PyTorch's error against float64; a part that needs no
    gradient gets none. With `teacher_joined` the teacher comes as one tensor of all the heads."""
    parts_s, parts_t, mask = _joined_inputs(dtype, device, heads, length, dims)
    weights = torch.randn(2, sum(heads), length, generator=torch.Generator().manual_seed(2)).double().to(device)

    def run(fn, parts_s, parts_t):
        xs = [x.detach().requires_grad_(i != 1) for i, x in enumerate(parts_s)]
        out = fn(xs, parts_t)
        (out.double() * weights).sum().backward()
        return [out.detach()] + [x.grad for x in xs if x.requires_grad], [x.grad for x in xs if not x.requires_grad]

    def joined_naive(xs, ts, dt=None):
        x, t = torch.cat(xs, 1), torch.cat(ts, 1)
        return attention_kl_naive(x, x, t, t, mask, True, x.shape[-1] ** -0.5, t.shape[-1] ** -0.5, dt)

    ref, _ = run(joined_naive, [x.double() for x in parts_s], [t.double() for t in parts_t])
    plain, _ = run(lambda xs, ts: joined_naive(xs, ts, dtype), parts_s, parts_t)
    teacher = torch.cat(parts_t, dim=1) if teacher_joined else parts_t
    got, untrained = run(
        lambda xs, ts: relation_kl(xs, ts, attention_mask=mask, reduction="none", impl=impl), parts_s, teacher
    )
    assert all(grad is None for grad in untrained)
    assert got[0].shape == (2, sum(heads), length)
    tiny = 1e-6 if dtype == torch.float32 else 1e-5
    for i, (g, p, r) in enumerate(zip(got, plain, ref)):
        assert torch.isfinite(g).all()
        err, base = max_error(g, r), max_error(p, r)
        bound = 2 * base + tiny * (1 + r.abs().max().item())
        assert err <= bound, f"{impl} {dtype} output {i}: error {err:.3g} > {bound:.3g} (plain {base:.3g})"


def _student_and_teacher(impl: str, device: str = "cpu"):
    """A function like one layer of the training objective: projections, then two relation terms."""
    batch, length, width, heads, kv_heads, dim = 2, 13, 16, 4, 2, 8
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(batch, length, width, generator=gen).to(device)
    w_q = torch.randn(width, heads * dim, generator=gen).to(device).requires_grad_(True)
    w_k = torch.randn(width, kv_heads * dim, generator=gen).to(device).requires_grad_(True)
    q_t = torch.randn(batch, heads, length, 12, generator=gen).to(device)
    k_t = torch.randn(batch, 1, length, 12, generator=gen).to(device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    mask[1, :4] = 0

    def loss(hidden, w_q, w_k, q_t, k_t, mask):
        q_s = (hidden @ w_q).view(batch, length, heads, dim).transpose(1, 2)
        k_s = (hidden @ w_k).view(batch, length, kv_heads, dim).transpose(1, 2)
        attention = attention_kl(q_s, k_s, q_t, k_t, attention_mask=mask, impl=impl)
        keys = relation_kl(k_s, k_t.expand(-1, kv_heads, -1, -1), attention_mask=mask, reduction="sum", impl=impl)
        return attention + 0.1 * keys

    return loss, (hidden, w_q, w_k, q_t, k_t, mask)


def check_compiled(backend, impl: str = "auto", device: str = "cpu", rtol: float = 1e-5) -> None:
    """`torch.compile(fullgraph=True)` of a layer-like loss: no graph break; value and gradients as eager."""
    loss, inputs = _student_and_teacher(impl, device)
    params = inputs[1:3]
    expected = loss(*inputs)
    expected_grads = torch.autograd.grad(expected, params)
    compiled = torch.compile(loss, fullgraph=True, backend=backend)
    got = compiled(*inputs)
    got_grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, expected, rtol=rtol / 10, atol=0)
    for g, e in zip(got_grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=rtol, atol=rtol / 100)
