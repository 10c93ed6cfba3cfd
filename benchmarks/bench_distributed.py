"""Tokens/s and peak memory per GPU of `linearard restore` on one GPU and under torchrun (ddp, fsdp).

Every process runs the real restore loop (objective, optimizer, data, checkpointing off); afterwards
each writes its own numbers, and ``--merge`` collects them into one JSON row per run (a multi-process
row with its ``scaling_efficiency``: its tokens/s over N times those of the one-process run below).

    python benchmarks/bench_distributed.py --model M --data D --strategy none --out R/single
    torchrun --nproc_per_node 2 benchmarks/bench_distributed.py --model M --data D --strategy ddp --out R/ddp
    python benchmarks/bench_distributed.py --merge R/single R/ddp --results benchmarks/results/x.json

``--merge`` also checks the runs' result: the final adapters of each multi-process run, and of each
one-process run given its own ``--batch-size``, against those of the one-process run with the same global
batch (block length, tokens per step, steps) and precision that split its batch itself, tensor by tensor,
beside what rounding that tensor to bf16 alone would change. In fp32 (``--precision fp32``) that checks the
distributed machinery itself. In bf16, summing a batch in other groups (two processes, or other
micro-batches) rounds the gradients differently, and AdamW's first steps, which move every weight by about
the learning rate whatever the size of its gradient, carry that rounding into the adapters: a one-process
run with ``--batch-size`` set to half the batch shows how far the same global batch lands from itself.
``--device cpu`` runs the same on CPU processes (gloo), as the tests do.

``--profile`` adds each rank's operator table (host and device time of 8 steps after the first 18) to its
folder; the profiler slows the run, so a profiled run is not one of the timed ones. A run of several
processes first times an all-reduce alone between them (1, 16 and 64 MB of fp32, as DDP's gradient
buckets), so that a slow link shows apart from the training.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from linearard.config import PRECISIONS, build_config
from linearard.training.checkpoint import latest_checkpoint, read_adapters
from linearard.training.distributed import setup, teardown
from linearard.training.loop import restore
from linearard.training.metrics import read_metrics


def run_one(args: argparse.Namespace) -> None:
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    out = Path(args.out)
    config = build_config(
        flags=dict(
            model=args.model, data=[args.data], seq_len=args.seq_len, rope_type="linear", rope_factor=args.rope_factor,
            tokens_per_step=args.tokens_per_step, max_tokens=args.tokens_per_step * args.steps,
            strategy=args.strategy, reduce_dtype=args.reduce_dtype, output=str(out / "run"),
            gradient_checkpointing=args.gradient_checkpointing, save_every=0, export=False, eval=False,
            warmup_steps=1, log_every=1, device=args.device, precision=args.precision, batch_size=args.batch_size,
            shuffle_buffer=0,  # the corpus dealt in order: N processes see the global batch of one
            cuda_graphs={"on": True, "off": False}.get(args.cuda_graphs),
        )
    )
    cuda = args.device == "cuda"
    if cuda:  # this process's own GPU before any CUDA call, or every rank would open a context on GPU 0
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.reset_peak_memory_stats()
    data_rate = _data_rate(args, rank, world)
    # the process group restore joins, started here so that the link can be timed alone first
    group = setup(args.strategy, args.device) if world > 1 else None
    link = _allreduce_ms(group.device) if group is not None else None
    start = time.perf_counter()
    if args.profile:
        result = _profiled(config, out / f"profile_rank{rank}.txt")
    else:
        result = restore(config, log=lambda _: None)
    seconds = time.perf_counter() - start
    if group is not None:
        teardown(group)
    shape = json.loads((Path(args.model) / "config.json").read_text())
    record = {"rank": rank, "world_size": world, "strategy": args.strategy, "reduce_dtype": args.reduce_dtype,
              "seq_len": args.seq_len, "batch_size": args.batch_size,
              # how the plan split this process's share of a step: blocks per micro-batch, micro-batches
              "micro_batches": [result.plan.stages[0].batch_size, result.plan.stages[0].grad_accum],
              "cuda_graphs": result.plan.graphs,
              "precision": "bf16" if config.trains_in_bf16(args.device) else "fp32",
              "model": {k: shape.get(k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                   "vocab_size", "max_position_embeddings")},
              "rope_factor": args.rope_factor,
              # as trained: a step holds at least one block per process, whatever --tokens-per-step asked
              "tokens_per_step": result.tokens // max(result.steps, 1),
              "steps": result.steps, "tokens": result.tokens, "seconds": round(seconds, 2),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3) if cuda else None,
              "data_tokens_per_s": round(data_rate, 1),
              "allreduce_ms": link,
              "gpu": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__,
              "gradient_checkpointing": args.gradient_checkpointing}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{rank}.json").write_text(json.dumps(record))


def _data_rate(args: argparse.Namespace, rank: int, world: int) -> float:
    """Training tokens per second this process's block stream delivers alone (reading, tokenizing, cutting,
    sharding: every rank tokenizes the whole corpus), over the blocks the run will train on. A stream
    slower than the training caps the run whatever the GPUs do."""
    from transformers import AutoTokenizer

    from linearard.data.blocks import TokenBlocks
    from linearard.data.default_corpus import training_files

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    blocks = iter(TokenBlocks(training_files([args.data]), tokenizer, args.seq_len, shuffle_buffer=0,
                              rank=rank, world_size=world))
    own = args.tokens_per_step * args.steps // world // args.seq_len
    start = time.perf_counter()
    for _ in range(own):
        next(blocks)
    return own * args.seq_len / (time.perf_counter() - start)


def _allreduce_ms(device: torch.device, sizes_mb=(1, 16, 64), repeats: int = 20) -> dict[str, float]:
    """Median milliseconds of one all-reduce (sum) of `sizes_mb` megabytes of fp32 between this run's
    processes on their devices, the link alone (no training beside it)."""
    import torch.distributed as dist

    times = {}
    for mb in sizes_mb:
        x = torch.ones(mb * 2**20 // 4, device=device)
        dist.all_reduce(x)  # warm-up: NCCL sets up the channels for this size
        samples = []
        for _ in range(repeats):
            dist.barrier()
            _synchronize(device)
            start = time.perf_counter()
            dist.all_reduce(x)
            _synchronize(device)
            samples.append((time.perf_counter() - start) * 1000)
        times[f"{mb}MB"] = round(statistics.median(samples), 3)
    return times


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _profiled(config, path: Path, skip: int = 16, active: int = 8):
    """`restore` under the PyTorch profiler, recording `active` optimizer steps after the first `skip` + 2
    (compilation and warm-up left out, as in the timed window); the table of host and device time per
    operator goes to `path` (where a step's time goes: kernels, collectives, the host waiting)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook
    from torch.profiler import ProfilerActivity, profile, schedule

    steps = schedule(wait=skip, warmup=2, active=active, repeat=1)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], schedule=steps) as prof:
        hook = register_optimizer_step_post_hook(lambda *_: prof.step())
        try:
            result = restore(config, log=lambda _: None)
        finally:
            hook.remove()
    averages = prof.key_averages()
    path.parent.mkdir(parents=True, exist_ok=True)
    head = f"{active} optimizer steps after the first {skip + 2}\n\n"
    path.write_text(head + "\n\n".join(f"sorted by {key}\n" + averages.table(sort_by=key, row_limit=40)
                                       for key in ("self_cuda_time_total", "self_cpu_time_total")) + "\n")
    return result


def merge(folders: list[str], results: Path) -> None:
    rows, adapters = [], []
    for folder in folders:
        ranks = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("rank*.json"))]
        # the first read of the metrics (16 steps, or all of a shorter run) includes the warm-up
        steps = [r for r in read_metrics(Path(folder) / "run") if "tokens_per_s" in r]
        first = steps[0]
        steps = steps[16:] or steps[-1:]
        tokens_per_s = statistics.median(r["tokens_per_s"] for r in steps)
        world = ranks[0]["world_size"]
        rows.append({**{k: ranks[0].get(k) for k in ("model", "strategy", "reduce_dtype", "world_size", "seq_len",
                                                    "rope_factor", "tokens_per_step", "precision", "batch_size",
                                                    "micro_batches", "cuda_graphs", "gpu", "torch",
                                                    "gradient_checkpointing")},
                     "tokens_per_s": round(tokens_per_s, 1),
                     "tokens_per_s_per_gpu": round(tokens_per_s / world, 1),
                     "peak_gib_per_gpu": [r["peak_gib"] for r in ranks],
                     "data_tokens_per_s_per_rank": [r.get("data_tokens_per_s") for r in ranks],
                     "allreduce_ms_per_rank": [r.get("allreduce_ms") for r in ranks],
                     "timed_steps": len(steps), "steps": ranks[0]["steps"],
                     # before any weight has moved: runs of one global batch differ here by their arithmetic alone
                     "first_step": {k: first.get(k) for k in ("loss", "grad_norm")}})
        adapters.append(read_adapters(latest_checkpoint(Path(folder) / "run")))
    for row, final in zip(rows, adapters):
        reference = reference_run(row, rows)
        if reference is not None:
            row["adapters_vs_one_process"] = compare_adapters(final, adapters[reference])
            if row["world_size"] > 1:  # tokens/s on N processes / (N x one process's)
                row["scaling_efficiency"] = round(row["tokens_per_s_per_gpu"] / rows[reference]["tokens_per_s"], 3)
        print(json.dumps(row))
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "rows": rows}, indent=1) + "\n")


def reference_run(row: dict, rows: list[dict]) -> int | None:
    """Index in `rows` of the run `row` is checked against: one process, the same global batch and
    precision, its batch split as the plan chose (no --batch-size). None for such a run itself, and
    where `rows` holds none."""
    if row["world_size"] == 1 and row["batch_size"] is None:
        return None
    same_run = ("model", "rope_factor", "seq_len", "tokens_per_step", "steps", "precision")
    return next((i for i, r in enumerate(rows) if r["world_size"] == 1 and r["batch_size"] is None
                 and all(r[k] == row[k] for k in same_run)), None)


def compare_adapters(run: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict:
    """How far a run's adapters are from the reference's, tensor by tensor: the relative difference
    ||run - ref|| / ||ref|| of the tensor where it is largest against the relative change that rounding
    that tensor to bf16 alone makes (the bf16 rounding the runs are allowed to differ by)."""
    if run.keys() != reference.keys():
        raise ValueError(f"the runs train different tensors: {sorted(run.keys() ^ reference.keys())[:4]}")
    rows = []
    for name, ref in reference.items():
        ref = ref.double()
        scale = max(ref.norm().item(), 1e-30)
        rows.append((name, (run[name].double() - ref).norm().item() / scale,
                     (ref.to(torch.bfloat16).double() - ref).norm().item() / scale))
    name, difference, rounding = max(rows, key=lambda r: r[1] / max(r[2], 1e-30))
    return {"tensors": len(reference), "worst_tensor": name, "relative_difference": difference,
            "bf16_rounding": rounding, "within_bf16_rounding": difference <= rounding}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--strategy", choices=("none", "ddp", "fsdp"), default="none")
    parser.add_argument("--seq-len", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="all processes together")
    parser.add_argument("--batch-size", type=int, help="blocks per micro-batch on each process (default: the plan's)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="auto: bf16 autocast on CUDA, fp32 on CPU")
    parser.add_argument("--rope-factor", type=float, default=4.0, help="linear RoPE scaling of the student")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--cuda-graphs", choices=("on", "off"),
                        help="replay each step from a CUDA graph (default: as restore decides: on for one process)")
    parser.add_argument("--reduce-dtype", choices=("fp32", "bf16"), default="fp32",
                        help="precision of the gradient all-reduce between processes (ddp/fsdp)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                        help="cpu: the same run on CPU processes (gloo), as the tests do")
    parser.add_argument("--out", help="folder for this run's per-rank numbers")
    parser.add_argument("--profile", action="store_true",
                        help="also write each rank's operator profile to --out (slows the run: time it apart)")
    parser.add_argument("--merge", nargs="+", metavar="FOLDER", help="merge finished runs into --results")
    parser.add_argument("--results", type=Path)
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.results)
    else:
        run_one(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
