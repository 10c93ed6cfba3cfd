"""Greedy decoding into a static KV cache, batched over left-padded prompts.

A batch's prompts run once into a cache sized for them and their answers; every later step feeds one
token per row with the same shapes and buffers. On CUDA the step is captured once as a CUDA graph and
replayed: a small model decoding at long context otherwise waits on Python to launch some thousand
kernels a step (`benchmarks/bench_generation.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
from transformers import StaticCache

from linearard.evaluation.scoring import forward, model_device, pad_batch
from linearard.training.graphed import GraphedStep


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
        decoder = _Decoder(model, ids.to(device), mask.to(device), max_new_tokens)
        done = [False] * len(idx)
        rows: list[list[int]] = [[] for _ in idx]
        for step in range(max_new_tokens):
            # the step's one transfer from the device: every row's token at once
            for r, t in enumerate(decoder.token[:, 0].tolist()):
                if done[r]:
                    continue
                if t in stops:
                    done[r] = True
                    continue
                rows[r].append(t)
                done[r] = stop_fn is not None and stop_fn(rows[r])
            if all(done) or step == max_new_tokens - 1:
                break
            decoder.step()
        for r, i in enumerate(idx):
            results[i] = rows[r]
    return results


class _Decoder:
    """One batch: the prompts run into a static cache, then ``step()`` feeds the last token (``token``)
    and leaves the next one there. A step reads and writes only this object's buffers, so on CUDA it is
    recorded as a graph after one eager run and replayed from then on."""

    def __init__(self, model, ids: torch.Tensor, mask: torch.Tensor, max_new_tokens: int) -> None:
        batch, length = ids.shape
        size = length + max_new_tokens - 1  # the last token is never fed back
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=size)
        self.mask = torch.zeros(batch, size, dtype=mask.dtype, device=ids.device)
        self.mask[:, :length] = mask
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits, _ = forward(model, ids, mask, positions, cache=self.cache, use_cache=True, logits_to_keep=1)
        self.token = logits[:, -1:].argmax(-1)
        self.position = positions[:, -1:].clone()
        self.slot = torch.full((1,), length - 1, dtype=torch.long, device=ids.device)
        capture = ids.device.type == "cuda" and replayable(model, self.cache)
        # one eager step (lazy allocations, kernel choices), then every step from one recording
        self.step = GraphedStep(self._step, warmup=1) if capture else self._step

    def _step(self, _inputs: Any = ()) -> dict[str, torch.Tensor]:
        """Feed `token` and leave the next one there (a step reads and writes only this object's buffers)."""
        self.position += 1
        self.slot += 1
        self.mask.index_fill_(1, self.slot, 1)
        logits, _ = forward(self.model, self.token, self.mask, self.position, cache=self.cache, use_cache=True)
        self.token.copy_(logits[:, -1:].argmax(-1))
        return {}


def replayable(model, cache: StaticCache) -> bool:
    """Whether a decoding step can be captured once and replayed: nothing in it may decide in Python on
    what the step computes. Two things do: a sliding-window cache layer picks its update by a Python count
    of the tokens seen, and dynamic NTK and LongRoPE check the longest position each step to choose their
    frequencies. Models with either decode eagerly."""
    if any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        return False
    rope_types = {str(getattr(module, "rope_type", "")) for module in model.modules()}
    return not any("dynamic" in t or t == "longrope" for t in rope_types)
