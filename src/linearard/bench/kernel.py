"""`linearard bench kernel`: the relation-KL operator's speed and memory.

It times the relation-KL operator (forward, backward, both) and its peak extra GPU memory
on self-relations x xᵀ, beside PyTorch's SDPA flash attention forward+backward on the same shape and
the materialised implementation where it fits, and writes one row per measurement to a CSV or JSON
file together with the card's name and the library versions.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from linearard.config import parse_counts
from linearard.errors import UserError

FIELDS = [
    "date", "gpu", "torch", "triton", "dtype", "batch", "heads", "head_dim", "length", "causal",
    "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms", "peak_extra_mib", "vs_sdpa_fwd_bwd", "note",
]  # fmt: skip


def add_arguments(kernel: argparse.ArgumentParser) -> None:
    kernel.add_argument(
        "--lengths",
        type=parse_counts,
        default="1024,4096,8192,16384,32768",
        help="comma-separated sequence lengths T (default: %(default)s)",
    )
    kernel.add_argument(
        "--shapes", default="32x128,9x64", help="comma-separated HEADSxHEAD_DIM shapes (default: %(default)s)"
    )
    kernel.add_argument("--batch", type=int, default=1, help="batch size B (default: %(default)s)")
    kernel.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="input dtype (default: %(default)s)",
    )
    kernel.add_argument("--no-causal", dest="causal", action="store_false", help="full (non-causal) relations")
    kernel.add_argument(
        "--impls",
        default="triton,sdpa,naive",
        help="comma-separated: triton, torch (blocked), naive, sdpa (flash attention forward+backward); "
        "default: %(default)s",
    )
    kernel.add_argument(
        "--naive-max-gib",
        type=float,
        default=40.0,
        help="skip the materialised implementation when its estimate exceeds this (default: %(default)s)",
    )
    kernel.add_argument(
        "--output",
        type=Path,
        default=None,
        help="results file (.csv or .json), or a folder to write relation_kl_<gpu>_<time>.csv into",
    )


def run(args: argparse.Namespace) -> int:
    rows = benchmark_kernel(
        lengths=args.lengths,
        shapes=_shapes(args.shapes),
        impls=_impls(args.impls),
        batch=args.batch,
        dtype_name=args.dtype,
        causal=args.causal,
        naive_max_gib=args.naive_max_gib,
    )
    if args.output is not None:
        print(f"wrote {write_rows(rows, args.output)}")
    return 0


def _shapes(text: str) -> list[tuple[int, int]]:
    shapes = []
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)x(\d+)\s*", item)
        if not match:
            raise UserError(f"--shapes entries look like 32x128 (heads x head_dim), got {item!r}")
        shapes.append((int(match[1]), int(match[2])))
    return shapes


def _impls(text: str) -> list[str]:
    impls = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(impls) - {"triton", "torch", "naive", "sdpa"})
    if unknown or not impls:
        raise UserError(f"--impls takes triton, torch, naive, sdpa; got {text!r}")
    return impls


def benchmark_kernel(
    lengths: list[int],
    shapes: list[tuple[int, int]],
    impls: list[str],
    batch: int = 1,
    dtype_name: str = "bfloat16",
    causal: bool = True,
    naive_max_gib: float = 40.0,
) -> list[dict]:
    """Run the sweep and print a table as it goes. Returns one dict per (shape, length, impl)."""
    import torch

    if not torch.cuda.is_available():
        raise UserError("the kernel benchmark needs a CUDA GPU")
    try:
        import triton
        from triton.testing import do_bench
    except ImportError:
        raise UserError("the kernel benchmark needs the triton package") from None

    from linearard.ops import relation_kl

    dtype = getattr(torch, dtype_name)
    device = torch.device("cuda")
    meta = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        gpu=torch.cuda.get_device_name(device),
        torch=torch.__version__,
        triton=triton.__version__,
        dtype=dtype_name,
        batch=batch,
        causal=causal,
    )
    rows: list[dict] = []
    print(f"{meta['gpu']}, torch {meta['torch']}, triton {meta['triton']}, {dtype_name}, B={batch}, causal={causal}")
    print(f"{'H':>3} {'D':>4} {'T':>6} {'impl':>7} {'fwd ms':>9} {'bwd ms':>9} {'f+b ms':>9} {'MiB':>9} {'/sdpa':>6}")

    def timed(fn: Callable[[], object], grads: list) -> float:
        return do_bench(fn, warmup=25, rep=100, grad_to_none=grads, return_mode="median")

    def peak_extra(fn: Callable[[], object]) -> float:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20

    for heads, dim in shapes:
        for length in lengths:
            shape = (batch, heads, length, dim)
            gen = torch.Generator(device).manual_seed(length)
            x_s = torch.randn(shape, device=device, dtype=dtype, generator=gen).requires_grad_(True)
            x_t = torch.randn(shape, device=device, dtype=dtype, generator=gen)
            sdpa_fwd_bwd = None
            for impl in sorted(impls, key=lambda i: i != "sdpa"):  # SDPA first: the others compare to it
                row = dict(meta, heads=heads, head_dim=dim, length=length, impl=impl, note="")
                try:
                    if impl == "sdpa":
                        row.update(_measure_sdpa(x_s, causal, timed, peak_extra))
                        sdpa_fwd_bwd = row["fwd_bwd_ms"]
                    else:
                        estimate = 12 * batch * heads * length**2 * 4 / 2**30
                        if impl == "naive" and estimate > naive_max_gib:
                            row["note"] = f"skipped: needs about {estimate:.0f} GiB"
                        else:
                            row.update(_measure_kl(relation_kl, x_s, x_t, impl, causal, timed, peak_extra))
                except torch.OutOfMemoryError:
                    row["note"] = "out of memory"
                torch.cuda.empty_cache()
                if sdpa_fwd_bwd and row.get("fwd_bwd_ms") and impl != "sdpa":
                    row["vs_sdpa_fwd_bwd"] = round(row["fwd_bwd_ms"] / sdpa_fwd_bwd, 3)
                rows.append(row)
                _print_row(row)
            del x_s, x_t
    return rows


def _measure_kl(relation_kl, x_s, x_t, impl, causal, timed, peak_extra) -> dict:
    def forward():
        return relation_kl(x_s, x_t, causal=causal, impl=impl)

    def forward_backward():
        forward().backward()

    out = dict(
        fwd_ms=timed(forward, [x_s]),
        bwd_ms=_time_backward(forward(), timed, [x_s]),
        fwd_bwd_ms=timed(forward_backward, [x_s]),
    )
    x_s.grad = None
    out["peak_extra_mib"] = peak_extra(forward_backward)
    x_s.grad = None
    return {k: round(v, 4) for k, v in out.items()}


def _measure_sdpa(x, causal, timed, peak_extra) -> dict:
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn_like(x).requires_grad_(True) for _ in range(3))
    grad_out = torch.randn_like(x)
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):

        def forward():
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

        def forward_backward():
            forward().backward(grad_out)

        result = dict(
            fwd_ms=timed(forward, [q, k, v]),
            bwd_ms=_time_backward(forward(), timed, [q, k, v], grad_out),
            fwd_bwd_ms=timed(forward_backward, [q, k, v]),
        )
        for t in (q, k, v):
            t.grad = None
        result["peak_extra_mib"] = peak_extra(forward_backward)
    return {key: round(value, 4) for key, value in result.items()}


def _time_backward(output, timed, grads, grad_output=None) -> float:
    """Backward alone: the graph of one forward, replayed (its memory is freed on return)."""
    return timed(lambda: output.backward(grad_output, retain_graph=True), grads)


def _print_row(row: dict) -> None:
    def cell(key: str, width: int, fmt: str = ".3f") -> str:
        value = row.get(key)
        return f"{value:>{width}{fmt}}" if isinstance(value, float) else f"{'-':>{width}}"

    line = (
        f"{row['heads']:>3} {row['head_dim']:>4} {row['length']:>6} {row['impl']:>7} "
        f"{cell('fwd_ms', 9)} {cell('bwd_ms', 9)} {cell('fwd_bwd_ms', 9)} {cell('peak_extra_mib', 9, '.0f')} "
        f"{cell('vs_sdpa_fwd_bwd', 6, '.2f')}"
    )
    print(line + (f"  {row['note']}" if row["note"] else ""), flush=True)


def write_rows(rows: list[dict], output: Path) -> Path:
    """Write rows to a .csv or .json file; a folder gets relation_kl_<gpu>_<time>.csv inside it."""
    if output.is_dir():
        gpu = re.sub(r"[^a-z0-9]+", "-", rows[0]["gpu"].lower()).strip("-") if rows else "gpu"
        stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
        output = output / f"relation_kl_{gpu}_{stamp}.csv"
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".json":
        output.write_text(json.dumps(rows, indent=1) + os.linesep)
    else:
        with output.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in FIELDS})
    return output
