"""Write a random-weight model folder of a benchmark shape, with a tokenizer, for timing real runs.

Speed and memory do not depend on the weights' values, so `linearard restore` can be timed end to end
on a random model of a real shape without the real weights:

    python benchmarks/random_model.py smollm2 TOKENIZER_DIR OUT_DIR
    linearard restore --model OUT_DIR --data TEXT_DIR --seq-len 1024 --max-tokens 4.25M

``--native-length 32768`` gives the shape a 32K native context, for distillation on 32K-token blocks.
"""

from __future__ import annotations

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from linearard.bench.restore_step import SHAPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("tokenizer", help="a folder with a tokenizer of the shape's vocabulary size")
    parser.add_argument("output")
    parser.add_argument("--native-length", type=int,
                        help="the model's native context (default: the shape's); distillation blocks must fit in it")
    args = parser.parse_args()
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    shape = dict(SHAPES[args.shape])
    # a tokenizer with more words than the shape (SmolLM2's 49,152 for the 7B shape's 32,000) widens the
    # embeddings rather than producing ids the model has no row for; the folder's config records it
    shape["vocab_size"] = max(shape["vocab_size"], len(tokenizer))
    if args.native_length:
        shape["max_position_embeddings"] = args.native_length
    config = LlamaConfig(**shape, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    # drawn on the GPU when there is one: a 7B shape's random initialisation takes minutes on the CPU
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    print(f"wrote a random {args.shape}-shaped model (vocabulary {shape['vocab_size']:,}) to {args.output}")


if __name__ == "__main__":
    main()
