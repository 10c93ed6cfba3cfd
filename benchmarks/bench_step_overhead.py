"""Host-side cost of a restore step, on any CPU: what a GPU step pays when it waits on Python.

A small model on a GPU is launch-bound: on the H100, SmolLM2's next-token step takes about the same
time at 4K and 8K tokens. This benchmark keeps SmolLM2's depth and head counts (30 layers, 9 query
and 3 KV heads) but makes every width tiny and the block 32 tokens, so that on a CPU the step time
is almost all framework overhead: Python, dispatch, autograd, peft, the teacher pass, the relation
calls. It compares an ARD step with a plain LoRA next-token step, like `linearard bench restore`.

    python benchmarks/bench_step_overhead.py --output benchmarks/results/step_overhead_cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from linearard.models.adapters import add_adapters, trainable_parameters
from linearard.models.rope import RopeScaling
from linearard.models.teacher_student import TeacherStudent
from linearard.objectives import build_objective

TINY_SMOLLM2 = dict(
    hidden_size=72, intermediate_size=96, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
    head_dim=8, vocab_size=256, max_position_embeddings=8192, tie_word_embeddings=True,
    rope_parameters={"rope_type": "default", "rope_theta": 100000.0},
)


def step_ms(ts: TeacherStudent, objective: str, length: int, steps: int) -> float:
    loss_fn = build_objective(objective)
    optimizer = torch.optim.AdamW(trainable_parameters(ts.model), lr=1e-5)
    times = []
    for i in range(steps + 3):  # three warm-up steps
        ids = torch.randint(0, TINY_SMOLLM2["vocab_size"], (1, length))
        start = time.perf_counter()
        loss, _ = loss_fn(ts, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3, help="alternating cpt/ard measurements")
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_SMOLLM2), attn_implementation="sdpa")
    model = add_adapters(model, "lora", rank=8, alpha=16).train()
    ts = TeacherStudent(model, RopeScaling("linear", 4.0, 8192, 4 * 8192))
    runs = {"cpt": [], "ard": []}
    for _ in range(args.repeats):
        for objective in runs:
            runs[objective].append(step_ms(ts, objective, args.length, args.steps))
    row = {name: round(min(values), 2) for name, values in runs.items()}  # least disturbed repeat
    row["ard_vs_next_token"] = round(row["ard"] / row["cpt"], 3)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {"commit": commit, "cpu": platform.processor() or platform.machine(), "threads": 1,
              "torch": torch.__version__, "length": args.length, "step_ms": row}
    print(json.dumps(result))
    if args.output:
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
