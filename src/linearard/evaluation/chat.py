"""Does an instruction-tuned model still answer like the original? Greedy chat answers, compared.

Each prompt is one user turn rendered with the model's own chat template; the answer is decoded
greedily. ``exact_match`` is the fraction of answers identical (after trimming whitespace) to the
reference model's; ``token_f1`` is the SQuAD-style word-overlap F1 (lower-cased, punctuation and
articles dropped), which gives partial credit to answers that drift by a few words.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Sequence
from importlib import resources

from linearard.evaluation.generation import greedy_generate
from linearard.evaluation.scoring import encode
from linearard.evaluation.stats import mean_cell, na_cell, task_result


def chat_prompts() -> list[str]:
    """The packaged prompts (``evaluation/data/chat_prompts.json``)."""
    data = resources.files("linearard.evaluation").joinpath("data/chat_prompts.json").read_text("utf-8")
    return list(json.loads(data)["prompts"])


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def chat_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
) -> list[str]:
    """Greedy answers to single-turn chat prompts through the tokenizer's chat template.

    Example:
        >>> chat_answers(model, tokenizer, ["What is the capital of France?"], max_new_tokens=16)
    """
    if not has_chat_template(tokenizer):
        raise ValueError("the tokenizer has no chat template")
    ids = []
    for prompt in prompts:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The rendered template already holds every special token it needs.
        ids.append(encode(tokenizer, text))
    outputs = greedy_generate(model, ids, max_new_tokens=max_new_tokens, stop_ids=_stop_ids(model, tokenizer),
                              batch_size=batch_size)
    return [tokenizer.decode(out, skip_special_tokens=True).strip() for out in outputs]


def chat(
    model,
    tokenizer,
    reference_answers: Sequence[str] | None,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    answers: Sequence[str] | None = None,
) -> dict:
    """Exact-match rate and token F1 of the model's answers against the reference's.

    Args:
        model, tokenizer: the model under test.
        reference_answers: the reference model's :func:`chat_answers` for the same prompts (None when
            the reference has no chat template).
        prompts: the chat prompts.
        max_new_tokens, batch_size: as for :func:`chat_answers`.
        answers: the model's answers if already generated (the reference's own run).

    Returns:
        A task result with ``exact_match`` (primary) and ``token_f1``; the answers are in the details.
    """
    if reference_answers is None or not has_chat_template(tokenizer):
        reason = "no chat template"
        return task_result({"exact_match": na_cell(reason), "token_f1": na_cell(reason)},
                           primary="exact_match")
    if len(reference_answers) != len(prompts):
        raise ValueError(f"{len(reference_answers)} reference answers for {len(prompts)} prompts")
    if answers is None:
        answers = chat_answers(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                               batch_size=batch_size)
    exact = [float(a == r) for a, r in zip(answers, reference_answers)]
    f1 = [token_f1(a, r) for a, r in zip(answers, reference_answers)]
    return task_result(
        {"exact_match": mean_cell(exact), "token_f1": mean_cell(f1)},
        primary="exact_match",
        details={"answers": [{"prompt": p, "answer": a} for p, a in zip(prompts, answers)]},
    )


def token_f1(prediction: str, reference: str) -> float:
    """Word-overlap F1 of two answers after SQuAD normalisation; 1.0 when both are empty.

    Example:
        >>> token_f1("The capital is Paris.", "Paris is the capital")
        1.0
    """
    pred, ref = _words(prediction), _words(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


_PUNCT = str.maketrans("", "", string.punctuation)


def _words(text: str) -> list[str]:
    text = text.lower().translate(_PUNCT)
    return re.sub(r"\b(a|an|the)\b", " ", text).split()


def _stop_ids(model, tokenizer) -> set[int]:
    ids = set()
    generation_config = getattr(model, "generation_config", None)
    for source in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(s) for s in source)
    return ids
