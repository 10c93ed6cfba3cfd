"""Zero-shot multiple-choice benchmarks, scored as lm-evaluation-harness scores them.

- ``acc``: the choice with the highest summed log-probability of its continuation is right.
- ``acc_norm``: the same after dividing each log-probability by the character length of the choice.
- LAMBADA: ``acc`` is 1 when greedy decoding reproduces the last word exactly (every token is the
  argmax); ``ppl`` is exp of the mean negative log-likelihood of the last word.

All choices of an item are scored in one group, so the question is computed once per item.
"""

from __future__ import annotations

from collections.abc import Sequence

from linearard.evaluation.benchmark_data import BENCHMARKS, Item, load_items, subset
from linearard.evaluation.scoring import Request, encode_pairs, loglikelihoods
from linearard.evaluation.stats import mean_cell, perplexity_cell, task_result


def multiple_choice(
    model,
    tokenizer,
    benchmark: str,
    *,
    limit: int | None = None,
    seed: int = 0,
    batch_size: int = 16,
    items: Sequence[Item] | None = None,
) -> dict:
    """Score `benchmark` (a name of ``BENCHMARKS``) zero-shot.

    Args:
        model, tokenizer: the model under test.
        benchmark: ``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande``, ``mmlu``
            or ``lambada``.
        limit: score a fixed random subset of this many items (None: all).
        seed: chooses the subset.
        batch_size: sequences per forward pass.
        items: score these instead of the packaged data (tests, custom sets).

    Returns:
        A task result (see :func:`linearard.evaluation.stats.task_result`) with ``acc`` (and
        ``acc_norm`` or ``ppl``), each with its standard error over items.

    Example:
        >>> multiple_choice(model, tokenizer, "arc_easy", limit=100)["metrics"]["acc"]
    """
    spec = BENCHMARKS[benchmark]
    pool = list(items) if items is not None else load_items(benchmark)
    chosen = [pool[i] for i in subset(len(pool), limit, seed)]
    pairs = [pair for item in chosen for pair in zip(item.contexts, item.continuations)]
    groups = [k for k, item in enumerate(chosen) for _ in item.continuations]
    requests = [Request(ctx, cont) for ctx, cont in encode_pairs(tokenizer, pairs)]
    scores = loglikelihoods(model, requests, groups=groups, batch_size=batch_size)

    per_item: dict[str, list[float]] = {m: [] for m in spec.metrics}
    pos = 0
    for item in chosen:
        item_scores = scores[pos:pos + len(item.continuations)]
        pos += len(item.continuations)
        lls = [s.logprob for s in item_scores]
        if benchmark == "lambada":
            per_item["acc"].append(float(item_scores[0].is_greedy))
            per_item["ppl"].append(-lls[0])
            continue
        per_item["acc"].append(float(_argmax(lls) == item.gold))
        if "acc_norm" in per_item:
            normed = [ll / max(1, len(choice)) for ll, choice in zip(lls, item.choices)]
            per_item["acc_norm"].append(float(_argmax(normed) == item.gold))

    metrics = {m: mean_cell(v) for m, v in per_item.items()}
    if "ppl" in metrics:
        metrics["ppl"] = perplexity_cell(metrics["ppl"])
    return task_result(
        metrics,
        primary=spec.primary,
        lower_is_better=["ppl"],
        details={"items": len(chosen), "of": len(pool), "split": spec.split, "seed": seed},
    )


def _argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties, as numpy's argmax."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best
