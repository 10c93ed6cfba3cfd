"""RULER-style synthetic long-context tasks, generated locally from a seed.

Each task builds prompts of an exact token length, decodes greedily and scores the fraction of the
expected strings found in the answer (RULER's string match):

- ``niah_single``: one "special magic number" for a key hidden in filler text; asked for it.
- ``niah_multikey``: four numbers under four keys; asked for one (the others distract).
- ``niah_multivalue``: four numbers under one key; asked for all of them.
- ``niah_multiquery``: four numbers under four keys; asked for all four.
- ``vt`` (variable tracking): ``VAR A = 12345``, ``VAR B = VAR A``, ... scattered in repetitive noise
  text (as in RULER); asked for every variable that ends up holding the value.
- ``cwe`` (common words extraction): a numbered list of words, ten of them repeated many times;
  asked for the ten most common.
- ``fwe`` (frequent words extraction): made-up words with Zipf-distributed counts; asked for the
  three most frequent.

Keys and list words are made-up words, values random numbers, so nothing can be answered from
memory.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.haystack import NOISE, Haystack, TooShort, fill_to_length, match_fraction, words
from linearard.evaluation.scoring import bos_prefix, encode, encode_many, supported_length
from linearard.evaluation.stats import join_names, mean_cell, na_cell, task_result
from linearard.evaluation.tasks import RULER_TASKS

_NIAH_INTRO = ("Some special magic numbers are hidden inside the following text. Memorize them: "
               "you will be asked about them afterwards.\n\n")
_NEEDLE = " One of the special magic numbers for {key} is: {value}. "


@dataclass
class Prompt:
    ids: list[int]
    references: list[str]


@dataclass(frozen=True)
class _Builder:
    build: Callable[[random.Random, object, Haystack, int], Prompt]
    max_new_tokens: int


def ruler(
    model,
    tokenizer,
    task: str,
    haystack: str | Haystack,
    *,
    lengths: Sequence[int],
    samples: int = 2,
    seed: int = 0,
    max_batch_tokens: int = 8192,
) -> dict:
    """Score one RULER-style task at each length.

    Args:
        model, tokenizer: the model under test.
        task: one of ``RULER_TASKS``.
        haystack: filler text (prose) for the needle tasks, or a :class:`Haystack` of it built with this
            tokenizer (encoding a long text takes seconds: build it once for several tasks).
        lengths: total lengths in tokens (prompt plus the answer budget).
        samples: prompts per length.
        seed: makes the prompts reproducible; the same for every model.
        max_batch_tokens: prompts are batched up to about this many tokens.

    Returns:
        A task result with ``score@<L>`` (mean fraction of expected strings found; n/a beyond the
        supported length) and a few example answers in the details.

    Example:
        >>> ruler(model, tok, "niah_single", text, lengths=[2048])["metrics"]["score@2048"]
    """
    if task not in _BUILDERS:
        raise ValueError(f"unknown RULER task {task!r}; choose one of {', '.join(RULER_TASKS)}")
    builder = _BUILDERS[task]
    limit = supported_length(model)
    if not isinstance(haystack, Haystack):
        haystack = Haystack(tokenizer, haystack)
    metrics, examples = {}, {}
    for length in lengths:
        if length > limit:
            metrics[f"score@{length}"] = na_cell(f"> supported length {limit}")
            continue
        rng = random.Random(f"{task}/{seed}/{length}")
        try:
            prompts = [builder.build(rng, tokenizer, haystack, length - builder.max_new_tokens)
                       for _ in range(samples)]
        except TooShort:
            metrics[f"score@{length}"] = na_cell("too short for the prompt")
            continue
        stops = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        outputs = greedy_generate(model, [p.ids for p in prompts], max_new_tokens=builder.max_new_tokens,
                                  stop_ids=stops, batch_size=max(1, max_batch_tokens // length))
        answers = [tokenizer.decode(out, skip_special_tokens=True) for out in outputs]
        metrics[f"score@{length}"] = mean_cell(
            match_fraction(a, p.references) for a, p in zip(answers, prompts)
        )
        examples[str(length)] = {"expected": prompts[0].references, "answer": answers[0]}
    return task_result(metrics, details={"samples": samples, "example": examples})


def _value(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _key(rng: random.Random) -> str:
    return "-".join(words(rng, 2))


def _niah(n_keys: int, n_values: int, n_asked: int) -> Callable:
    def build(rng: random.Random, tokenizer, haystack: Haystack, length: int) -> Prompt:
        keys = [_key(rng) for _ in range(n_keys)]
        values = {k: [_value(rng) for _ in range(n_values)] for k in keys}
        needles = [(rng.random(), encode(tokenizer, _NEEDLE.format(key=k, value=v)))
                   for k in keys for v in values[k]]
        asked = keys[:n_asked]
        names = join_names(asked)
        if n_values > 1:
            question = (f"\n\nWhat are all the special magic numbers for {names} mentioned in the text "
                        f"above? The special magic numbers for {names} are")
        elif n_asked > 1:
            question = (f"\n\nWhat are the special magic numbers for {names} mentioned in the text above? "
                        f"The special magic numbers for {names} are")
        else:
            question = (f"\n\nWhat is the special magic number for {names} mentioned in the text above? "
                        f"The special magic number for {names} is")
        head = bos_prefix(tokenizer) + encode(tokenizer, _NIAH_INTRO)
        ids = fill_to_length(haystack, rng, head, needles, encode(tokenizer, question), length)
        return Prompt(ids, [v for k in asked for v in values[k]])

    return build


def _variable_tracking(rng: random.Random, tokenizer, haystack: Haystack, length: int) -> Prompt:
    noise = Haystack(tokenizer, NOISE * 64)  # RULER hides the chain in noise, not in prose
    names = []
    while len(names) < 5:
        name = "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ") for _ in range(5))
        if name not in names:
            names.append(name)
    value = str(rng.randint(10000, 99999))
    statements = [f" VAR {names[0]} = {value}. "] + [
        f" VAR {b} = VAR {a}. " for a, b in itertools.pairwise(names)
    ]
    # The chain must be read in order, so the assignments go in at increasing depths.
    depths = sorted(rng.random() for _ in statements)
    needles = [(d, encode(tokenizer, s)) for d, s in zip(depths, statements)]
    head = bos_prefix(tokenizer) + encode(
        tokenizer, "Memorize and track the chain of variable assignments hidden in the following text.\n\n"
    )
    question = (f"\n\nQuestion: Find all variables that are assigned the value {value} in the text above. "
                f"Answer: According to the chain of variable assignments in the text above, {len(names)} "
                f"variables are assigned the value {value}, they are:")
    ids = fill_to_length(noise, rng, head, needles, encode(tokenizer, question), length)
    return Prompt(ids, names)


def _common_words(rng: random.Random, tokenizer, haystack: Haystack, length: int) -> Prompt:
    head = bos_prefix(tokenizer) + encode(
        tokenizer, "Below is a numbered list of words. Some of them appear many times.\n\n"
    )
    tail = encode(tokenizer, "\n\nQuestion: What are the 10 most common words in the list above? "
                             "Answer: The 10 words that appear most often in the list are:")
    budget = length - len(head) - len(tail)
    sample_seed = rng.random()

    def entries(n: int) -> tuple[list[int], list[str]]:
        # Ten words fill about a fifth of the list; every other word appears once.
        local = random.Random(sample_seed)
        repeats = max(2, n // 50)
        vocab = words(local, 10 + max(0, n - 10 * repeats))
        common = vocab[:10]
        pool = common * repeats + vocab[10:]
        local.shuffle(pool)
        pieces = encode_many(tokenizer, [f" {i}. {w}" for i, w in enumerate(pool, 1)])
        return [t for piece in pieces for t in piece], common

    return Prompt(*_fit(entries, budget, head, tail))


def _frequent_words(rng: random.Random, tokenizer, haystack: Haystack, length: int) -> Prompt:
    head = bos_prefix(tokenizer) + encode(
        tokenizer, "Read the following coded text and keep track of how often each coded word appears.\n\n"
    )
    tail = encode(tokenizer, "\n\nQuestion: What are the three most frequently appearing coded words in the "
                             "text above? Answer: According to the coded text above, the three most "
                             "frequently appearing words are:")
    budget = length - len(head) - len(tail)
    sample_seed = rng.random()

    def entries(n: int) -> tuple[list[int], list[str]]:
        # Zipf counts (rank k appears ~ n / (k^2 * 1.64) times); the rest of the text is singletons.
        local = random.Random(sample_seed)
        counts = []
        while True:
            c = int(n / (1.645 * (len(counts) + 1) ** 2))
            if c < 2 or sum(counts) + c > n:
                break
            counts.append(c)
        singles = max(0, n - sum(counts))
        vocab = words(local, len(counts) + singles)
        pool = [w for w, c in zip(vocab, counts) for _ in range(c)] + vocab[len(counts):]
        local.shuffle(pool)
        pieces = encode_many(tokenizer, [f" {w}" for w in pool])
        return [t for piece in pieces for t in piece], vocab[:3]

    return Prompt(*_fit(entries, budget, head, tail))


def _fit(entries: Callable[[int], tuple[list[int], list[str]]], budget: int, head, tail):
    """A list of `entries(n)` that fills most of `budget` tokens, framed by head and tail.

    Entries take a varying number of tokens, so n is estimated from a probe and shrunk until it fits.
    """
    probe, _ = entries(40)
    n = max(20, int(40 * budget / max(1, len(probe))))
    for _ in range(64):
        ids, answer = entries(n)
        if len(ids) <= budget:
            return [*head, *ids, *tail], answer
        if n <= 20:
            break
        n = max(20, int(n * budget / len(ids) * 0.99))
    raise TooShort(f"{budget} tokens are too few for a word list")


_BUILDERS = {
    "niah_single": _Builder(_niah(1, 1, 1), 16),
    "niah_multikey": _Builder(_niah(4, 1, 1), 16),
    "niah_multivalue": _Builder(_niah(1, 4, 1), 48),
    "niah_multiquery": _Builder(_niah(4, 1, 4), 48),
    "vt": _Builder(_variable_tracking, 40),
    "cwe": _Builder(_common_words, 64),
    "fwe": _Builder(_frequent_words, 24),
}
