"""`linearard bench restore`: peak memory and time of one restore (ARD) training step against a plain
LoRA next-token step.

The question this answers: what does distilling from a teacher that shares the student's weights cost
over ordinary fine-tuning of the same student? Weights are random (speed and memory do not depend on
their values), shapes are real: the embedded default (SmolLM2-135M) or a Llama-2-7B-shaped model.

    linearard bench restore --shape smollm2 --lengths 4096,8192
    linearard bench restore --shape llama2-7b --lengths 4096 --longest 8192,16384,32768

Each case runs in a fresh CUDA state; rows (with GPU name and versions) go to --output as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from linearard.errors import UserError
from linearard.models.adapters import add_adapters, trainable_parameters
from linearard.models.compat import enable_activation_checkpointing
from linearard.models.rope import RopeScaling
from linearard.models.teacher_student import TeacherStudent
from linearard.objectives import build_objective

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


def build(shape: str, rank: int, checkpointing: bool) -> TeacherStudent:
    config = LlamaConfig(**SHAPES[shape])
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = add_adapters(model, "lora", rank=rank, alpha=2 * rank)
    if checkpointing:
        enable_activation_checkpointing(model)
    model.train()
    native = config.max_position_embeddings
    return TeacherStudent(model, RopeScaling("linear", 4.0, native, 4 * native))


def time_steps(ts: TeacherStudent, objective_name: str, length: int, steps: int) -> dict:
    objective = build_objective(objective_name)
    params = trainable_parameters(ts.model)
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    vocab = ts.config.vocab_size
    times = []
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    for i in range(steps + 2):  # two warm-up steps
        ids = torch.randint(0, vocab, (1, length), device="cuda")
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        loss, _ = objective(ts, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end.record()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(start.elapsed_time(end))
    ms = statistics.median(times)
    return {
        "step_ms": round(ms, 2),
        "tokens_per_s": round(length / ms * 1000, 1),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 3),
        "peak_extra_gib": round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
        "loss": float(loss.detach()),
    }


def run_case(shape: str, objective: str, length: int, rank: int, checkpointing: bool, steps: int) -> dict:
    row = {"shape": shape, "objective": objective, "tokens": length, "lora_rank": rank,
           "checkpointing": checkpointing}
    try:
        ts = build(shape, rank, checkpointing)
        row.update(time_steps(ts, objective, length, steps))
    except torch.cuda.OutOfMemoryError:
        row["oom"] = True
    finally:
        ts = None
        torch.cuda.empty_cache()
    return row


def environment() -> dict:
    import transformers

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
           "transformers": transformers.__version__, "python": platform.python_version(),
           "date": time.strftime("%Y-%m-%d")}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    parser.add_argument("--lengths", default="4096,8192", help="block lengths to compare ARD vs next-token at")
    parser.add_argument("--longest", default="", help="with checkpointing, ARD lengths to try until one fails")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--checkpointing", action="store_true", help="also compare with gradient checkpointing")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        raise UserError("this benchmark needs a CUDA GPU")
    rows = []
    for ckpt in [False, True] if args.checkpointing else [False]:
        for length in [int(x) for x in args.lengths.split(",") if x]:
            for objective in ("cpt", "ard"):
                rows.append(run_case(args.shape, objective, length, args.rank, ckpt, args.steps))
                print(json.dumps(rows[-1]), flush=True)
            plain, ard = rows[-2], rows[-1]
            if "oom" not in plain and "oom" not in ard:
                ard["memory_vs_next_token"] = round(ard["peak_gib"] / plain["peak_gib"], 3)
                ard["time_vs_next_token"] = round(ard["step_ms"] / plain["step_ms"], 3)
                print(f"{args.shape} T={length} ckpt={ckpt}: ARD/next-token memory "
                      f"{ard['memory_vs_next_token']}x, time {ard['time_vs_next_token']}x", flush=True)
    for length in [int(x) for x in args.longest.split(",") if x]:
        rows.append(run_case(args.shape, "ard", length, args.rank, True, max(2, args.steps // 2)))
        print(json.dumps(rows[-1]), flush=True)
        if rows[-1].get("oom"):
            break
    args.output.mkdir(parents=True, exist_ok=True)
    out = args.output / f"restore_step_{args.shape}_{torch.cuda.get_device_name().replace(' ', '_')}.json"
    out.write_text(json.dumps({"environment": environment(), "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")
    return 0
