"""How closely a model's next-token distribution follows the original model's on held-out text.

``kl``: KL(original ‖ model) of the next-token distributions, averaged over positions (nats).
``top1``: the fraction of positions where both models rank the same token first.
The most direct measure of "restored": perplexity can improve while the model drifts away from the
original (continued pre-training does exactly that), agreement cannot.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from linearard.evaluation.scoring import bos_prefix, encode, forward, model_device, pad_batch, supported_length
from linearard.evaluation.stats import mean_cell, na_cell, task_result

_CHUNK = 1024  # positions per float32 log-softmax


def agreement(
    model,
    tokenizer,
    reference,
    reference_tokenizer,
    texts: Mapping[str, str],
    *,
    length: int = 512,
    max_tokens: int | None = 2048,
    batch_size: int = 4,
) -> dict:
    """Next-token KL(reference ‖ model) and top-1 agreement, over windows of held-out text.

    Args:
        model, tokenizer: the model under test.
        reference, reference_tokenizer: the original model.
        texts: name -> held-out text.
        length: window length in tokens (shortened to what both models support).
        max_tokens: tokens of each text to use (at least one window; None: all).
        batch_size: windows per forward pass.

    Returns:
        A task result with ``kl`` (lower is better) and ``top1``; the model against itself gives
        exactly 0 and 1.

    Example:
        >>> agreement(student, tok, teacher, tok, {"hamlet": text})["metrics"]["kl"]["value"]
    """
    if reference_tokenizer.get_vocab() != tokenizer.get_vocab():
        reason = "tokenizer differs from the reference's"
        return task_result({"kl": na_cell(reason), "top1": na_cell(reason)}, primary="top1",
                           lower_is_better=["kl"])
    length = min(length, supported_length(model), supported_length(reference))
    windows = agreement_windows(tokenizer, texts, length=length, max_tokens=max_tokens)
    tally = AgreementTally()
    for start in range(0, len(windows), batch_size):
        batch = windows[start:start + batch_size]
        ref_logits = _logits(reference, batch)
        tally.add(ref_logits, ref_logits if model is reference else _logits(model, batch), batch)
    return tally.result(details={"window": length, "windows": len(windows)})


def agreement_windows(tokenizer, texts: Mapping[str, str], *, length: int, max_tokens: int | None) -> list[list[int]]:
    """Each text as consecutive `length`-token windows (BOS first), at most `max_tokens` of it (at least one)."""
    windows = []
    for text in texts.values():
        ids = bos_prefix(tokenizer) + encode(tokenizer, text)
        n = max(1, len(ids) // length)
        if max_tokens is not None:
            n = min(n, max(1, max_tokens // length))
        windows.extend(ids[i * length:(i + 1) * length] for i in range(n))
    return windows


class AgreementTally:
    """Per-position next-token KL(reference ‖ model) and top-1 agreement, added up batch by batch.

    For callers that produce the two models' logits themselves (e.g. one model under two settings,
    as the restore loop's teacher and student are).

    Example:
        >>> tally = AgreementTally()
        >>> tally.add(reference_logits, model_logits, windows)  # doctest: +SKIP
        >>> tally.result()["metrics"]["kl"]["value"]  # doctest: +SKIP
    """

    def __init__(self) -> None:
        self.kls: list[torch.Tensor] = []
        self.agree: list[torch.Tensor] = []

    def add(self, ref_logits: torch.Tensor, logits: torch.Tensor, windows: list[list[int]]) -> None:
        """Add a batch: `ref_logits` and `logits` are ``[len(windows), T, V]`` over the padded `windows`."""
        for r, window in enumerate(windows):
            n = len(window)
            for c in range(0, n, _CHUNK):
                hi = min(n, c + _CHUNK)
                ref_lp = torch.log_softmax(ref_logits[r, c:hi].float(), dim=-1)
                lp = torch.log_softmax(logits[r, c:hi].float().to(ref_lp.device), dim=-1)
                vocab = min(ref_lp.shape[-1], lp.shape[-1])  # heads padded past the tokenizer's size
                ref_lp, lp = ref_lp[:, :vocab], lp[:, :vocab]
                self.kls.append((ref_lp.exp() * (ref_lp - lp)).sum(-1).cpu())
                self.agree.append((ref_lp.argmax(-1) == lp.argmax(-1)).float().cpu())

    def result(self, details: dict | None = None) -> dict:
        """The task result: ``kl`` (lower is better) and ``top1`` cells over every position added."""
        return task_result(
            {"kl": mean_cell(torch.cat(self.kls).tolist()), "top1": mean_cell(torch.cat(self.agree).tolist())},
            primary="top1",
            lower_is_better=["kl"],
            details=details,
        )


@torch.no_grad()
def _logits(model, windows: list[list[int]]) -> torch.Tensor:
    ids, mask = pad_batch(windows)
    device = model_device(model)
    logits, _ = forward(model, ids.to(device), mask.to(device))
    return logits
