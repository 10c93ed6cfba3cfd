"""Building blocks of synthetic long-context prompts: filler text, needles placed at depths,
prompts of an exact token length, and string-match scoring."""

from __future__ import annotations

import random
from collections.abc import Sequence

from linearard.evaluation.scoring import encode

# The classic passkey filler (also RULER's "noise" haystack): repetitive, so that finding the needle
# tests positions and attention, not reading comprehension of the filler.
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


class TooShort(ValueError):
    """The requested length cannot hold the prompt's fixed parts (reported as n/a, not raised)."""


class Haystack:
    """Token ids of a filler text, from which spans of any length are cut at random offsets.

    Args:
        tokenizer: the model's tokenizer.
        text: the filler (public-domain prose); repeated end to start when a span needs more.
    """

    def __init__(self, tokenizer, text: str):
        self.ids = encode(tokenizer, text)
        if len(self.ids) < 16:
            raise ValueError("the haystack text needs at least 16 tokens")

    def span(self, rng: random.Random, n: int) -> list[int]:
        """`n` consecutive filler tokens starting at a random offset (wrapping around)."""
        if n <= 0:
            return []
        start = rng.randrange(len(self.ids))
        out: list[int] = []
        while len(out) < n:
            out.extend(self.ids[start:start + n - len(out)])
            start = 0
        return out


def place(
    filler: Sequence[int],
    needles: Sequence[tuple[float, Sequence[int]]],
) -> list[int]:
    """`filler` with each needle's tokens inserted at a fraction of its length (0 = start, 1 = end).

    Needles at the same depth keep their given order.
    """
    out: list[int] = []
    done = 0
    for depth, ids in sorted(needles, key=lambda d: d[0]):
        if not 0.0 <= depth <= 1.0:
            raise ValueError(f"depth must lie in [0, 1], got {depth}")
        cut = round(depth * len(filler))
        out.extend(filler[done:cut])
        out.extend(ids)
        done = cut
    out.extend(filler[done:])
    return out


def fill_to_length(
    haystack: Haystack,
    rng: random.Random,
    head: Sequence[int],
    needles: Sequence[tuple[float, Sequence[int]]],
    tail: Sequence[int],
    length: int,
) -> list[int]:
    """``head + filler-with-needles + tail`` of exactly `length` tokens."""
    budget = length - len(head) - len(tail) - sum(len(ids) for _, ids in needles)
    if budget < 0:
        raise TooShort(f"{length} tokens cannot hold the prompt's fixed parts")
    return [*head, *place(haystack.span(rng, budget), needles), *tail]


def match_fraction(output: str, references: Sequence[str]) -> float:
    """The fraction of `references` found in `output`, ignoring case (RULER's string match)."""
    low = output.lower()
    return sum(ref.lower() in low for ref in references) / len(references)


def words(rng: random.Random, n: int) -> list[str]:
    """`n` distinct made-up pronounceable words ("tovaki", "mersu"...) that no text contains, so a
    model can only find them in the prompt."""
    consonants, vowels = "bdfgklmnprstvz", "aeiou"
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        word = "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(2, 3)))
        if rng.random() < 0.5:
            word += rng.choice(consonants)
        if word not in seen:
            seen.add(word)
            out.append(word)
    return out
