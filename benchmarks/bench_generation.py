"""Greedy decoding at long context, where the RULER-style tasks spend their time: prefill against decode.

The evaluation's long-context tasks generate up to 64 tokens after prompts of up to 32K tokens, through
`linearard.evaluation.generation.greedy_generate` (left-padded batches, KV cache). This times it for 1,
33 and 129 new tokens on `--batch` copies of a `--context`-token prompt cut from the text in `--data`, so
that the prefill (one token) and the time per decoded token separate; `--profile` adds the operator
table of the 33-token run (host and device time: whether decoding waits on the GPU or on Python).

    python benchmarks/random_model.py smollm2 TOKENIZER OUT --native-length 32768
    python benchmarks/bench_generation.py --model OUT --data TEXT_DIR --profile R/gen_profile.txt --output R/gen.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.suite import package_versions


def timed(model, prompts, new: int) -> float:
    synchronize = torch.cuda.synchronize if model.device.type == "cuda" else lambda: None
    synchronize()
    start = time.perf_counter()
    greedy_generate(model, prompts, max_new_tokens=new, batch_size=len(prompts))
    synchronize()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, type=Path, help="a folder of .txt files")
    parser.add_argument("--context", type=int, default=32000)
    parser.add_argument("--batch", type=int, default=5, help="prompts per batch (the study's 32K batches hold 5)")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--profile", type=Path)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16).to(args.device).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    text = "\n\n".join(p.read_text() for p in sorted(args.data.glob("*.txt")))
    ids = tokenizer(text[: args.context * 12]).input_ids[: args.context]
    if len(ids) < args.context:
        raise SystemExit(f"{args.data} holds only {len(ids)} tokens; --context asks for {args.context}")
    prompts = [ids] * args.batch
    timed(model, prompts, 2)  # warm-up
    seconds = {new: timed(model, prompts, new) for new in (1, 33, 129)}
    result = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", **package_versions(),
        "model": {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                         "num_key_value_heads", "max_position_embeddings")},
        "context": args.context, "batch": args.batch,
        "seconds": {f"{new}_new_tokens": round(s, 3) for new, s in seconds.items()},
        "prefill_s": round(seconds[1], 3),
        "decode_ms_per_token": round((seconds[129] - seconds[33]) / 96 * 1000, 1),
    }
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            timed(model, prompts, 33)
        table = prof.key_averages()
        args.profile.parent.mkdir(parents=True, exist_ok=True)
        args.profile.write_text("\n\n".join(f"33 new tokens, sorted by {key}\n" + table.table(sort_by=key, row_limit=30)
                                            for key in ("self_cuda_time_total", "self_cpu_time_total")) + "\n")
    print(json.dumps(result))
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
