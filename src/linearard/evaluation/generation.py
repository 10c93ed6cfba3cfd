"""Greedy decoding with a KV cache, batched over left-padded prompts."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from linearard.evaluation.scoring import forward, model_device, pad_batch


@torch.no_grad()
def greedy_generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    stop_ids: Collection[int] = (),
    stop_fn: Callable[[list[int]], bool] | None = None,
    batch_size: int = 8,
) -> list[list[int]]:
    """Greedy continuations of token-id prompts.

    Prompts of a batch are left-padded so that their last tokens line up; positions come from the
    attention mask, so a padded prompt decodes exactly as it would alone. The prompt is run once and
    every new token reuses the KV cache.

    Args:
        model: a causal LM in eval mode.
        prompts: non-empty token id lists.
        max_new_tokens: the most tokens generated per prompt.
        stop_ids: token ids that end a continuation (not included in the output).
        stop_fn: called with a row's tokens so far after each step; True ends that row (the tokens are
            kept; the caller trims text stop sequences).
        batch_size: prompts per batch.

    Returns:
        One list of generated token ids per prompt, in order.

    Example:
        >>> out = greedy_generate(model, [tokenizer("Hello").input_ids], max_new_tokens=8)
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    device = model_device(model)
    stops = {int(s) for s in stop_ids}
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        ids, mask = pad_batch([prompts[i] for i in idx], left=True)
        ids, mask = ids.to(device), mask.to(device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, cache = forward(model, ids, mask, positions, use_cache=True, logits_to_keep=1)
        done = [False] * len(idx)
        rows: list[list[int]] = [[] for _ in idx]
        next_pos = positions[:, -1:] + 1
        for step in range(max_new_tokens):
            token = logits[:, -1].argmax(-1)
            # the step's one transfer from the device: every row's token at once
            for r, t in enumerate(token.tolist()):
                if done[r]:
                    continue
                if t in stops:
                    done[r] = True
                    continue
                rows[r].append(t)
                done[r] = stop_fn is not None and stop_fn(rows[r])
            if all(done) or step == max_new_tokens - 1:
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits, cache = forward(model, token[:, None], mask, next_pos, cache=cache, use_cache=True)
            next_pos = next_pos + 1
        for r, i in enumerate(idx):
            results[i] = rows[r]
    return results
