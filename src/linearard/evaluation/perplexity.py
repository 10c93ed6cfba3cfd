"""Perplexity on held-out text at several window lengths, and long-context perplexity.

- :func:`perplexity`: the text is cut into non-overlapping windows of L tokens; every token but the
  first of a window is predicted from the tokens before it in that window. Longer windows give more
  context, so a model that uses its context well gets a lower perplexity at larger L.
- :func:`long_perplexity`: the same last N tokens of a long text, predicted with ever more preceding
  text (total length L = context + N): shows whether a model gains from context it was extended to.

Lengths beyond what the model supports come back as ``n/a (> supported length ...)`` cells.
Standard errors treat tokens as independent samples, which understates them somewhat.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from linearard.evaluation.scoring import bos_prefix, encode, prefix_token, supported_length, token_nlls
from linearard.evaluation.stats import mean_cell, na_cell, perplexity_cell, task_result


def perplexity(
    model,
    tokenizer,
    texts: Mapping[str, str],
    *,
    lengths: Sequence[int] = (256, 1024),
    max_tokens: int | None = 4096,
    batch_size: int = 4,
) -> dict:
    """Perplexity of each text at each window length, plus all texts pooled (``all@L``).

    Args:
        model, tokenizer: the model under test.
        texts: name -> text (held-out text the model was not trained or restored on).
        lengths: window lengths in tokens.
        max_tokens: tokens of each text to use per length (at least one window; None: all).
        batch_size: windows per forward pass.

    Returns:
        A task result with metrics ``<text>@<L>`` and ``all@<L>``.

    Example:
        >>> perplexity(model, tok, {"hamlet": text}, lengths=[256])["metrics"]["hamlet@256"]["value"]
    """
    limit = supported_length(model)
    tokens = {name: bos_prefix(tokenizer) + encode(tokenizer, text) for name, text in texts.items()}
    metrics = {}
    for length in lengths:
        if length > limit:
            for name in [*texts, "all"]:
                metrics[f"{name}@{length}"] = na_cell(f"> supported length {limit}")
            continue
        pooled = []
        for name, ids in tokens.items():
            n_windows = len(ids) // length
            if max_tokens is not None:
                n_windows = min(n_windows, max(1, max_tokens // length))
            if n_windows == 0:
                metrics[f"{name}@{length}"] = na_cell(f"text shorter than {length} tokens")
                continue
            windows = [ids[i * length:(i + 1) * length] for i in range(n_windows)]
            nll = torch.cat(token_nlls(model, windows, batch_size=batch_size))
            pooled.append(nll)
            metrics[f"{name}@{length}"] = perplexity_cell(mean_cell(nll.tolist()))
        metrics[f"all@{length}"] = (
            perplexity_cell(mean_cell(torch.cat(pooled).tolist())) if pooled
            else na_cell(f"every text is shorter than {length} tokens")
        )
    return task_result(metrics, lower_is_better=list(metrics), details={"max_tokens": max_tokens})


def long_perplexity(
    model,
    tokenizer,
    texts: Mapping[str, str],
    *,
    lengths: Sequence[int],
    target: int = 128,
    samples: int = 1,
    batch_size: int = 1,
) -> dict:
    """Perplexity of the last `target` tokens given growing preceding context.

    For each text, `samples` target spans end at the end of the text and step backwards by `target`
    tokens. The span is scored alone (after the BOS/EOS token; metric ``ppl@<target>``) and inside
    windows of each total length ``L`` in `lengths` (metric ``ppl@<L>``, context ``L - target``).

    Args:
        model, tokenizer: the model under test.
        texts: name -> long text.
        lengths: total window lengths (context + target), each larger than `target`.
        target: tokens scored.
        samples: target spans per text.
        batch_size: windows per forward pass.

    Returns:
        A task result with ``ppl@<L>`` metrics (target alone first) and, in its details, the context
        length behind each metric.
    """
    if any(length <= target for length in lengths):
        raise ValueError(f"every length must exceed the target of {target} tokens, got {list(lengths)}")
    limit = supported_length(model)
    ends = []
    for text in texts.values():
        ids = encode(tokenizer, text)
        ends.extend((ids, len(ids) - j * target) for j in range(samples) if len(ids) - j * target > target)
    start = prefix_token(tokenizer)
    metrics = {}
    contexts = {}
    for length in [target, *sorted(set(lengths))]:
        key = f"ppl@{length}"
        contexts[key] = length - target
        if length > limit:
            metrics[key] = na_cell(f"> supported length {limit}")
            continue
        if length == target:
            windows = [[start, *ids[end - target:end]] for ids, end in ends]
        else:
            windows = [ids[end - length:end] for ids, end in ends if end >= length]
        if not windows:
            metrics[key] = na_cell(f"texts shorter than {length} tokens")
            continue
        nll = torch.cat(token_nlls(model, windows, last=target, batch_size=batch_size))
        metrics[key] = perplexity_cell(mean_cell(nll.tolist()))
    return task_result(metrics, lower_is_better=list(metrics),
                       details={"target": target, "context": contexts, "samples": samples})
