"""Passkey retrieval: a 5-digit number hidden at some depth of a long filler text, asked for at the
end and decoded greedily with a KV cache. One cell of the grid per (length, depth).

The default filler is the classic repetitive one ("The grass is green. The sky is blue. ..."): with
prose as filler a 135M model is distracted by the text itself even at lengths it handles well,
which would blur what the task is for, namely whether a model still attends to far positions.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.haystack import NOISE, Haystack, TooShort, fill_to_length
from linearard.evaluation.scoring import bos_prefix, encode, supported_length
from linearard.evaluation.stats import mean_cell, na_cell, task_result

INTRO = ("There is a pass key hidden inside a lot of unrelated text. Find it and remember it: "
         "you will be asked for it at the end.\n\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\n\nWhat is the pass key? The pass key is"


def passkey(
    model,
    tokenizer,
    *,
    lengths: Sequence[int],
    filler: str | None = None,
    depths: Sequence[float] = (0.0, 0.5, 1.0),
    samples: int = 2,
    seed: int = 0,
    max_batch_tokens: int = 8192,
) -> dict:
    """Retrieval accuracy on a grid of prompt lengths x needle depths.

    Args:
        model, tokenizer: the model under test.
        lengths: total prompt lengths in tokens (prompt plus the tokens generated).
        filler: the text the key hides in, repeated as needed (default: the classic repetitive one).
        depths: where the needle sits, as a fraction of the filler (0 = right after the instruction).
        samples: prompts per cell, each with its own key and filler offset.
        seed: makes keys and offsets reproducible; the same for every model.
        max_batch_tokens: prompts are batched up to about this many tokens.

    Returns:
        A task result with ``acc@<L>`` (over depths and samples; n/a beyond the supported length)
        and ``details["grid"][L][depth]`` cells.

    Example:
        >>> passkey(model, tok, lengths=[1024, 2048])["metrics"]["acc@1024"]["value"]
    """
    limit = supported_length(model)
    haystack = Haystack(tokenizer, filler or NOISE * 64)
    head = bos_prefix(tokenizer) + encode(tokenizer, INTRO)
    tail = encode(tokenizer, QUESTION)
    metrics, grid = {}, {}
    for length in lengths:
        if length > limit:
            metrics[f"acc@{length}"] = na_cell(f"> supported length {limit}")
            grid[str(length)] = {str(d): na_cell(f"> supported length {limit}") for d in depths}
            continue
        # Seeded per length, so adding a length to the grid does not change the others.
        rng = random.Random(f"passkey/{seed}/{length}")
        prompts, keys, cells = [], [], []
        try:
            for depth in depths:
                for _ in range(samples):
                    key = str(rng.randint(10000, 99999))
                    needle = encode(tokenizer, NEEDLE.format(key=key))
                    budget = length - len(encode(tokenizer, " " + key)) - 2
                    prompts.append(fill_to_length(haystack, rng, head, [(depth, needle)], tail, budget))
                    keys.append(key)
                    cells.append(depth)
        except TooShort:
            metrics[f"acc@{length}"] = na_cell("too short for the prompt")
            grid[str(length)] = {str(d): na_cell("too short for the prompt") for d in depths}
            continue
        max_new = max(len(encode(tokenizer, " " + k)) for k in keys) + 2
        outputs = greedy_generate(model, prompts, max_new_tokens=max_new,
                                  stop_ids=_stops(tokenizer), batch_size=max(1, max_batch_tokens // length))
        answers = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
        hits = [float(key in answer) for key, answer in zip(keys, answers)]
        metrics[f"acc@{length}"] = mean_cell(hits)
        grid[str(length)] = {
            str(d): mean_cell([h for h, c in zip(hits, cells) if c == d]) for d in depths
        }
    return task_result(metrics, details={"grid": grid, "depths": list(depths), "samples": samples})


def _stops(tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
