"""`linearard bench restore`: a restore (ARD) training step against the loop a user would otherwise run.

Three loops train the same student (LoRA on q/k/v, AdamW, bf16 autocast, random weights of a real
shape) on the same tokens per optimizer step, split into the same micro-batches:

- ``peft``: plain transformers + peft, next-token loss from ``model(input_ids, labels=...)`` — the
  anchor, written as a user would write it, with none of this project's code;
- ``cpt``: this project's next-token objective (chunked LM head);
- ``ard``: this project's relation distillation (teacher forward + student forward, no LM head).

Each loop runs eager and compiled (``--compile``: the anchor as ``torch.compile(model)``, ours as
`linearard.models.teacher_student.compile_layers`), and ours also with each step replayed from a CUDA
graph (``--graphs``, `linearard.training.graphed`). Rows report the optimizer step's median time, the host's
part of it (until the step's last launch returns), tokens/s, peak memory and the first step's time
(compilation included). The micro-batch is what
`linearard restore` would choose for the tokens per step (its memory estimate), unless given.

``--end-to-end MODEL_DIR`` also times a real `linearard restore` run on a model folder (data,
logging, a checkpoint and the held-out evaluation included; random weights of the shape are fine).

    linearard bench restore --shape smollm2 --seq-len 1024 --tokens-per-step 32768 --compile both
    linearard bench restore --shape llama2-7b --seq-len 4096 --tokens-per-step 32768

Rows (with GPU name and versions) go to --output as JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from linearard.config import PAPER_TOKENS, build_config
from linearard.errors import UserError
from linearard.models.adapters import add_adapters, trainable_parameters
from linearard.models.compat import enable_activation_checkpointing
from linearard.models.rope import RopeScaling
from linearard.models.teacher_student import TeacherStudent, compile_layers
from linearard.objectives import build_objective
from linearard.training.graphed import WARMUP, GraphedStep, make_capturable
from linearard.training.plan import ModelShape, plan_stages

SHAPES = {
    "smollm2": dict(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192,
        rope_parameters={"rope_type": "default", "rope_theta": 100000.0}, tie_word_embeddings=True,
    ),
    "llama2-7b": dict(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, head_dim=128, vocab_size=32000, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    ),
}
LOOPS = ("peft", "cpt", "ard")


def _base_model(shape: str) -> torch.nn.Module:
    config = LlamaConfig(**SHAPES[shape])
    with torch.device("cuda"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")


class _PeftLoop:
    """The anchor: what a user writes with transformers and peft alone."""

    def __init__(self, shape: str, rank: int, checkpointing: bool, compiled: bool):
        from peft import LoraConfig, get_peft_model

        model = _base_model(shape)
        if checkpointing:
            enable_activation_checkpointing(model)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "k_proj", "v_proj"])
        self.model = get_peft_model(model, lora)
        self.model.train()
        self.forward = torch.compile(self.model) if compiled else self.model
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        return self.forward(input_ids=ids, labels=ids).loss

    def close(self) -> None:
        """Nothing to undo (the same interface as `_OurLoop`)."""


class _OurLoop:
    """This project's objective on the shared-weight teacher/student pair."""

    def __init__(self, shape: str, objective: str, rank: int, checkpointing: bool, compiled: bool, factor: float):
        model = add_adapters(_base_model(shape), "lora", rank=rank, alpha=2 * rank)
        for p in trainable_parameters(model):
            p.data = p.data.float()  # as `linearard restore` keeps them
        if checkpointing:
            enable_activation_checkpointing(model)
        model.train()
        native = SHAPES[shape]["max_position_embeddings"]
        self.ts = TeacherStudent(model, RopeScaling("linear", factor, native, int(factor * native)))
        if compiled:
            compile_layers(self.ts)
        self.objective = build_objective(objective)
        self.params = trainable_parameters(model)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        # as `linearard restore`'s batches: no padding inside blocks, so the forwards take no mask
        return self.objective.run(self.ts, {"input_ids": ids, "padded_right": True})[0]

    def close(self) -> None:
        self.ts.close()


def micro_batches(shape: str, loop: str, seq_len: int, tokens_per_step: int, rank: int, checkpointing: bool,
                  factor: float) -> tuple[int, int]:
    """(blocks per micro-batch, micro-batches per step) as `linearard restore` would choose them."""
    config = build_config(flags=dict(
        seq_len=seq_len, tokens_per_step=tokens_per_step, max_tokens=max(tokens_per_step, 40_000),
        objective="cpt" if loop == "peft" else loop, lora_rank=rank, gradient_checkpointing=checkpointing,
        rope_type="linear", rope_factor=factor,
    ))
    with torch.device("meta"):
        model = add_adapters(
            AutoModelForCausalLM.from_config(LlamaConfig(**SHAPES[shape]), dtype=torch.bfloat16), "lora", rank=rank
        )
    native = SHAPES[shape]["max_position_embeddings"]
    shape_ = ModelShape.of(model, model.config)
    (stage,) = plan_stages(config, RopeScaling("linear", factor, native, int(factor * native)), shape_, world_size=1,
                           device="cuda", bf16=True)
    return stage.batch_size, stage.grad_accum


def time_loop(args: argparse.Namespace, loop: str, compiled: bool, graphs: bool, batch: int, accum: int) -> dict:
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    runner = (_PeftLoop(args.shape, args.rank, args.checkpointing, compiled) if loop == "peft"
              else _OurLoop(args.shape, loop, args.rank, args.checkpointing, compiled, args.rope_factor))
    optimizer = torch.optim.AdamW(runner.params, lr=1e-5)
    if graphs:
        make_capturable(optimizer)

    def train_step(micro_batches: list[dict]) -> dict[str, torch.Tensor]:
        optimizer.zero_grad(set_to_none=True)
        for micro in micro_batches:
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = runner.loss(micro["input_ids"])
            (loss / accum).backward()
        torch.nn.utils.clip_grad_norm_(runner.params, 1.0)
        optimizer.step()
        return {"loss": loss.detach()}

    step = GraphedStep(train_step) if graphs else train_step
    vocab = SHAPES[args.shape]["vocab_size"]
    times, host = [], []
    warmup = WARMUP + 1  # the first compiles; with graphs, the last of them records
    for _ in range(args.steps + warmup):
        ids = [{"input_ids": torch.randint(0, vocab, (batch, args.seq_len), device="cuda")} for _micro in range(accum)]
        torch.cuda.synchronize()
        start = time.perf_counter()
        metrics = step(ids)
        host.append(time.perf_counter() - start)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    if args.profile:
        _profile_step(args, step, ids, f"{loop}_{'compiled' if compiled else 'eager'}{'_graphs' if graphs else ''}")
    if graphs:
        step.close()
    runner.close()
    tokens = batch * accum * args.seq_len
    ms = statistics.median(times[warmup:]) * 1000
    return {
        "step_ms": round(ms, 2),
        "host_ms": round(statistics.median(host[warmup:]) * 1000, 2),
        "tokens_per_s": round(tokens / ms * 1000),
        "first_step_s": round(times[0], 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "loss": round(float(metrics["loss"]), 5),
    }


def _profile_step(args: argparse.Namespace, step, ids: list[dict], name: str) -> None:
    """Where one optimizer step's time goes, on the host and on the device: operators by device time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step(ids)
        torch.cuda.synchronize()
    args.profile.mkdir(parents=True, exist_ok=True)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40, max_name_column_width=70)
    (args.profile / f"profile_{args.shape}_{args.seq_len}_{name}.txt").write_text(table)


def run_case(args: argparse.Namespace, loop: str, compiled: bool, graphs: bool, batch: int, accum: int) -> dict:
    row = {"shape": args.shape, "loop": loop, "compiled": compiled, "graphs": graphs, "seq_len": args.seq_len,
           "blocks_per_micro_batch": batch, "micro_batches": accum, "tokens_per_step": batch * accum * args.seq_len,
           "lora_rank": args.rank, "checkpointing": args.checkpointing}
    try:
        row.update(time_loop(args, loop, compiled, graphs, batch, accum))
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    torch._dynamo.reset()
    torch.cuda.empty_cache()
    return row


def end_to_end(args: argparse.Namespace) -> dict:
    """A real `linearard restore` run: data, logging, one checkpoint, held-out evaluation, no export."""
    from linearard.training.loop import restore

    flags = dict(model=args.end_to_end, seq_len=args.seq_len, tokens_per_step=args.tokens_per_step,
                 max_tokens=args.e2e_tokens, output=str(args.e2e_output), save_every=0, export=False,
                 rope_type="linear", rope_factor=args.rope_factor, gradient_checkpointing=args.checkpointing)
    if args.data:
        flags["data"] = [args.data]
    rows = {}
    for compiled, graphs in itertools.product(_choices(args.compile), _choices(args.graphs)):
        flags.update(compile=compiled, cuda_graphs=graphs)
        name = ("compiled" if compiled else "eager") + ("+graphs" if graphs else "")
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        result = restore(build_config(flags={**flags, "output": f"{args.e2e_output}-{name}"}), log=lambda _: None)
        seconds = time.perf_counter() - start
        rows[name] = {
            "tokens": result.tokens, "steps": result.steps, "train_s": round(result.train_seconds, 2),
            "train_tokens_per_s": round(result.tokens / result.train_seconds),
            "total_s": round(seconds, 2), "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
            "perplexity": result.perplexity,
        }
        print(json.dumps({"end_to_end": rows}), flush=True)
        torch._dynamo.reset()
    return rows


def environment() -> dict:
    """The card, the date and what the numbers depend on (`linearard.evaluation.suite.package_versions`)."""
    from linearard.evaluation.suite import package_versions

    return {"gpu": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"), **package_versions()}


def _choices(flag: str) -> list[bool]:
    return {"off": [False], "on": [True], "both": [False, True]}[flag]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per block")
    parser.add_argument("--tokens-per-step", type=int, default=32768, help="tokens per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=0,
                        help="blocks per micro-batch (default: as linearard restore chooses for ARD)")
    parser.add_argument("--loops", default=",".join(LOOPS), help=f"which loops: {', '.join(LOOPS)}")
    parser.add_argument("--compile", choices=("off", "on", "both"), default="both")
    parser.add_argument("--graphs", choices=("off", "on", "both"), default="both",
                        help="this project's loops with steps replayed from a CUDA graph (the anchor never)")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--rope-factor", type=float, default=4.0, help="linear PI factor of the student")
    parser.add_argument("--steps", type=int, default=6,
                        help="timed optimizer steps after the warm-up steps (compiling, and with graphs, recording)")
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in every loop")
    parser.add_argument("--end-to-end", metavar="MODEL_DIR", help="also time `linearard restore` on this model")
    parser.add_argument("--data", help="training text for --end-to-end (default: the built-in corpus)")
    parser.add_argument("--e2e-tokens", type=int, default=PAPER_TOKENS, help="budget of the --end-to-end run")
    parser.add_argument("--e2e-output", type=Path, default=Path("bench-restore-run"))
    parser.add_argument("--profile", type=Path, help="write each loop's kernel profile of one step to this folder")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    if args.micro_batch:
        blocks = max(1, args.tokens_per_step // args.seq_len)
        batch, accum = args.micro_batch, -(-blocks // args.micro_batch)
    else:
        batch, accum = micro_batches(args.shape, "ard", args.seq_len, args.tokens_per_step, args.rank,
                                     args.checkpointing, args.rope_factor)
    rows = []
    for compiled in _choices(args.compile):
        for loop in [x.strip() for x in args.loops.split(",") if x.strip()]:
            # the anchor runs as a user would run it; graphs are this project's (not with checkpointing)
            graph_choices = [False] if loop == "peft" or args.checkpointing else _choices(args.graphs)
            for graphs in graph_choices:
                rows.append(run_case(args, loop, compiled, graphs, batch, accum))
                print(json.dumps(rows[-1]), flush=True)
    for row in rows:
        anchor = next((r for r in rows if r["loop"] == "peft" and r["compiled"] == row["compiled"]), None)
        if anchor and row is not anchor and "oom" not in row and "oom" not in anchor:
            row["time_vs_peft"] = round(row["step_ms"] / anchor["step_ms"], 3)
            row["memory_vs_peft"] = round(row["peak_gib"] / anchor["peak_gib"], 3)
    report = {"environment": environment(), "rows": rows}
    if args.end_to_end:
        report["end_to_end"] = end_to_end(args)
    print(_table(rows), flush=True)
    args.output.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = args.output / f"restore_step_{args.shape}_{args.seq_len}_{gpu}.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


def _table(rows: list[dict]) -> str:
    lines = ["loop  compiled  graphs  blocks x micro  step ms  host ms  tokens/s  peak GiB  first step s  "
             "vs peft (time, memory)"]
    for r in rows:
        if r.get("oom"):
            lines.append(f"{r['loop']:<5} {r['compiled']!s:<9} {r['graphs']!s:<7} out of memory")
            continue
        ratio = f"{r.get('time_vs_peft', '')} {r.get('memory_vs_peft', '')}"
        lines.append(f"{r['loop']:<5} {r['compiled']!s:<9} {r['graphs']!s:<7} {r['blocks_per_micro_batch']:>6} x "
                     f"{r['micro_batches']:<5} {r['step_ms']:>8} {r['host_ms']:>8} {r['tokens_per_s']:>9} "
                     f"{r['peak_gib']:>9} {r['first_step_s']:>12}  {ratio}")
    return "\n".join(lines)
