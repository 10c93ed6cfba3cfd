"""Batched log-likelihood scoring of token sequences with a causal LM.

Two primitives serve every task:

- :func:`loglikelihoods` scores continuations given contexts, the way lm-evaluation-harness does,
  but computes a prefix shared by several requests (the question of a multiple-choice item) once: one
  forward over the left-padded prefixes, its KV cache copied to each request's row, one forward over
  the right-padded remainders.
- :func:`token_nlls` returns the per-token negative log-likelihood of whole windows (perplexity),
  optionally of their last tokens only.

Tokens are plain ``list[int]``; :func:`encode_pairs` turns text into them with the harness's rules.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import torch

# Log-softmax over the vocabulary is done on at most this many positions at a time, in float32,
# so a 32K-token window of a 49K-word vocabulary never needs a 6 GB temporary.
_LOGPROB_CHUNK = 2048
# Continuation tokens are scored from logit rows log-softmaxed this many entries at a time: on a CPU
# 8 MB of float32, which stays in its cache (twice as fast as 50 MB), on a GPU enough for a batch's
# requests in a few launches.
_PICK_ELEMENTS_CPU = 1 << 21
_PICK_ELEMENTS = 1 << 24


def supported_length(model) -> int:
    """The longest sequence `model` is configured for (``max_position_embeddings``).

    For a RoPE-scaled config this is the target length the scaling was made for.
    """
    config = model.config
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    return int(config.max_position_embeddings)


def model_device(model) -> torch.device:
    return next(model.parameters()).device


def pad_batch(seqs: Sequence[Sequence[int]], *, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists as ``(ids, mask)``, each ``[len(seqs), longest]`` long on the CPU; padding (id 0,
    mask 0) goes on the right, or on the left with ``left=True``."""
    lengths = torch.tensor([len(s) for s in seqs])
    width = int(lengths.max())
    cols = torch.arange(width)
    real = cols >= width - lengths[:, None] if left else cols < lengths[:, None]
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    # one tensor for the whole batch, not one per row: a mask fills in row-major order
    ids[real] = torch.tensor(list(chain.from_iterable(seqs)), dtype=torch.long)
    return ids, real.long()


def forward(model, input_ids, attention_mask, position_ids=None, *, cache=None, use_cache=False,
            logits_to_keep: int = 0):
    """One forward pass; returns ``(logits, cache)``.

    Hides that transformers renamed ``past_key_values`` to ``cache`` (5.2x) in both directions.
    ``logits_to_keep=0`` keeps the logits of every position.
    """
    kwargs = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": use_cache}
    if position_ids is not None:
        kwargs["position_ids"] = position_ids
    if logits_to_keep:
        kwargs["logits_to_keep"] = logits_to_keep
    if cache is not None:
        kwargs[_cache_argument(model)] = cache
    out = model(**kwargs)
    new_cache = None
    if use_cache:  # only ask for the old name where the new one is missing: asking for it warns
        new_cache = out["cache"] if "cache" in out else out.get("past_key_values")
    return out.logits, new_cache


_CACHE_ARGUMENT: dict[type, str] = {}


def _cache_argument(model: Any) -> str:
    if hasattr(model, "get_base_model"):  # peft passes the cache through **kwargs
        model = model.get_base_model()
    model_type = type(model)
    if model_type not in _CACHE_ARGUMENT:
        params = inspect.signature(model_type.forward).parameters
        _CACHE_ARGUMENT[model_type] = "cache" if "cache" in params else "past_key_values"
    return _CACHE_ARGUMENT[model_type]


def encode(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without any special tokens."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_many(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each of `texts` without special tokens, as :func:`encode` gives them, from one batched
    tokenizer call in which each distinct text is encoded once (a long synthetic prompt is thousands of
    short pieces: one call each took seconds)."""
    unique = list(dict.fromkeys(texts))
    ids = tokenizer(unique, add_special_tokens=False, return_attention_mask=False)["input_ids"] if unique else []
    by_text = dict(zip(unique, ids))
    return [list(by_text[text]) for text in texts]


def bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` if the tokenizer puts a BOS token in front of text by default, else ``[]``.

    Models trained with a BOS token (Llama-2, Gemma) score much worse without it; models whose
    tokenizer adds none (SmolLM2, Qwen) get none, as lm-evaluation-harness does.
    """
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def prefix_token(tokenizer) -> int:
    """The token that stands in for an empty context: BOS if there is one, else EOS."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to start an empty context")
    return int(tok)


def encode_pairs(tokenizer, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """Context and continuation token ids of each ``(context, continuation)``, split the way
    lm-evaluation-harness splits them.

    Trailing spaces of the context move to the continuation; the pair is encoded as one string and
    the continuation is what follows the separately encoded context, so the continuation tokens are
    those a model would see when reading the whole text. An empty context becomes the prefix token;
    a tokenizer that puts BOS in front of text puts it in front of every context.

    The texts go to the tokenizer in one batch call, each distinct text once: the choices of a
    multiple-choice item share their context, so it is encoded once, not once per choice.

    Example:
        >>> question = "Question: 2+2?\\nAnswer:"
        >>> [(ctx, four), (_, five)] = encode_pairs(tok, [(question, " 4"), (question, " 5")])
    """
    if not pairs:
        return []
    split = []
    for context, continuation in pairs:
        stripped = context.rstrip()
        split.append((stripped, context[len(stripped):] + continuation))
    # What to encode: the context and the whole text, or the continuation alone after an empty context.
    texts = [text for context, continuation in split
             for text in ((context, context + continuation) if context else (continuation,))]
    ids = dict(zip(texts, encode_many(tokenizer, texts)))
    head = bos_prefix(tokenizer)
    # asked only where needed: a tokenizer without BOS and EOS cannot start an empty context
    start = prefix_token(tokenizer) if any(not context for context, _ in split) else None
    out = []
    for context, continuation in split:
        if not context:
            out.append(([start], list(ids[continuation])))
            continue
        ctx = ids[context]
        out.append((head + ctx, ids[context + continuation][len(ctx):]))
    return out


@dataclass(frozen=True)
class Request:
    """Score `continuation` given `context` (both non-empty token id lists)."""

    context: Sequence[int]
    continuation: Sequence[int]


@dataclass(frozen=True)
class Score:
    """Sum of the continuation's token log-probabilities, and whether greedy decoding yields it."""

    logprob: float
    is_greedy: bool
    n_tokens: int


@dataclass
class _Item:
    index: int
    seq: list[int]  # context + continuation, left-truncated to the model's length
    ctx_len: int


@dataclass
class _Group:
    """Requests computed from one row of the prefix forward."""

    items: list[_Item]
    shared: int  # tokens of that row: the common prefix, never past the shortest context
    keep: int  # prefix logits needed, from the position before the earliest continuation token on
    suffix_rows: int  # requests with tokens after the shared prefix: one suffix forward row each

    @classmethod
    def of(cls, items: list[_Item]) -> _Group:
        ctx_len = min(it.ctx_len for it in items)
        # A lone request is computed in one pass: everything but its last token.
        shared = len(items[0].seq) - 1 if len(items) == 1 else _common_prefix(items, ctx_len)
        return cls(items, shared, shared - ctx_len + 1, sum(len(it.seq) - 1 > shared for it in items))


@torch.no_grad()
def loglikelihoods(
    model,
    requests: Sequence[Request],
    *,
    batch_size: int = 16,
    groups: Sequence[object] | None = None,
    max_length: int | None = None,
) -> list[Score]:
    """Score every request; requests with the same group key share their common prefix.

    Args:
        model: a causal LM (transformers ``*ForCausalLM``), in eval mode.
        requests: what to score. Contexts longer than `max_length` lose tokens from the left.
        batch_size: the most rows in one forward pass: shared prefixes in the first pass of a batch,
            requests with tokens after their group's shared prefix in the second.
        groups: one hashable key per request (e.g. the item id of a multiple-choice question); the
            longest token prefix common to a group's sequences is computed once. Default: requests
            with identical contexts form a group.
        max_length: the longest input; default the model's supported length.

    Returns:
        One :class:`Score` per request, in order.

    Example:
        >>> scores = loglikelihoods(model, [Request(ctx, a), Request(ctx, b)], groups=[0, 0])
    """
    if groups is None:
        groups = [tuple(r.context) for r in requests]
    if len(groups) != len(requests):
        raise ValueError(f"got {len(groups)} group keys for {len(requests)} requests")
    max_length = max_length or supported_length(model)
    by_group: dict[object, list[_Item]] = {}
    for i, (req, key) in enumerate(zip(requests, groups)):
        if not req.context or not req.continuation:
            raise ValueError(f"request {i}: context and continuation must both be non-empty")
        if len(req.continuation) > max_length:
            raise ValueError(f"request {i}: continuation longer than the model's {max_length} tokens")
        seq = (list(req.context) + list(req.continuation))[-(max_length + 1):]
        by_group.setdefault(key, []).append(_Item(i, seq, len(seq) - len(req.continuation)))

    shareable: list[_Group] = []
    for items in by_group.values():
        group = _Group.of(items)
        if group.shared == 0:  # nothing in common: score them one by one
            shareable.extend(_Group.of([it]) for it in items)
        else:
            shareable.append(group)
    # Longest prefixes first, so a batch holds similar lengths and little padding.
    ordered = sorted(shareable, key=lambda g: -max(len(it.seq) for it in g.items))
    # Each of a batch's two forwards has at most batch_size rows (a group with more suffix rows than
    # that goes alone), so items whose answers are one token, which need no suffix row, fill the
    # prefix forward batch_size at a time. Memory: the logits are [rows, n_keep, V] and [rows, suffix
    # width, V], so a batch holds at most batch_size * (n_keep + suffix width) * V of them: at most
    # twice the batch_size * max(n_keep, suffix width) * V that one forward of batch_size requests
    # could reach when every request counted against the cap. The KV cache has as many rows.
    results: list[Score | None] = [None] * len(requests)
    batch: list[_Group] = []
    suffix_rows = 0
    for group in ordered:
        if batch and (len(batch) == batch_size or suffix_rows + group.suffix_rows > batch_size):
            _score_batch(model, batch, results)
            batch, suffix_rows = [], 0
        batch.append(group)
        suffix_rows += group.suffix_rows
    if batch:
        _score_batch(model, batch, results)
    return results  # type: ignore[return-value]


def _common_prefix(items: list[_Item], limit: int) -> int:
    """How many leading tokens the items' sequences all share, at most `limit`."""
    first = items[0].seq
    common = min(limit, *(len(it.seq) for it in items))
    for it in items[1:]:
        seq = it.seq
        if seq[:common] != first[:common]:  # compared at C speed; searched only where they differ
            common = next(n for n in range(common) if seq[n] != first[n])
    return common


def _score_batch(model, groups: list[_Group], results: list[Score | None]) -> None:
    device = model_device(model)
    n_keep = max(1, *(g.keep for g in groups))  # logits_to_keep=0 would keep every position
    ids, mask = pad_batch([g.items[0].seq[:g.shared] for g in groups], left=True)
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    # Requests with tokens left after the shared prefix continue from a copy of the prefix cache.
    rows = [(g, it) for g, group in enumerate(groups) for it in group.items if len(it.seq) - 1 > group.shared]
    # prefix_logits: [G, n_keep, V]; its last column is position p - 1 of every row
    prefix_logits, cache = forward(model, ids, mask, positions, use_cache=bool(rows), logits_to_keep=n_keep)
    suffix_logits, tail = None, 0
    if rows:
        s_ids, s_mask = pad_batch([it.seq[groups[g].shared:-1] for g, it in rows])
        tail = s_ids.shape[1]
        select = torch.tensor([g for g, _ in rows], device=device)
        cache.reorder_cache(select)
        start = torch.tensor([groups[g].shared for g, _ in rows], device=device)
        s_pos = start[:, None] + torch.arange(tail, device=device)[None, :]
        full_mask = torch.cat([mask.index_select(0, select), s_mask.to(device)], dim=1)
        suffix_logits, _ = forward(model, s_ids.to(device), full_mask, s_pos, cache=cache, use_cache=True)
    suffix_row = {id(it): r for r, (_, it) in enumerate(rows)}

    # Each continuation token, by where the logits predicting it sit, computed on the CPU with a few
    # tensor operations per batch rather than Python per token. Logits at position q predict token
    # q + 1; request k's continuation tokens sit at ctx_len..len-1, its shared prefix p at 0..p-1.
    items = [it for group in groups for it in group.items]
    per_request = torch.tensor([(g, group.shared, it.ctx_len, len(it.seq) - it.ctx_len, suffix_row.get(id(it), 0))
                                for g, group in enumerate(groups) for it in group.items])
    group_of, shared, ctx_len, n_cont, row = per_request.unbind(-1)
    request = torch.repeat_interleave(torch.arange(len(items)), n_cont)
    q = (ctx_len - 1 - (n_cont.cumsum(0) - n_cont))[request] + torch.arange(len(request))
    p = shared[request]
    in_prefix = q < p
    where = torch.where(in_prefix, group_of[request] * n_keep + n_keep - p + q, row[request] * tail + q - p)
    target = torch.tensor(list(chain.from_iterable(it.seq[it.ctx_len:] for it in items)))
    logprob = torch.zeros(len(items), dtype=torch.float32, device=device)
    misses = torch.zeros(len(items), dtype=torch.long, device=device)
    for logits, chosen in ((prefix_logits, in_prefix), (suffix_logits, ~in_prefix)):
        if chosen.any():
            _add_picks(logits, where[chosen], target[chosen], request[chosen], logprob, misses)
    # one transfer per batch, not one per request
    for it, lp, miss in zip(items, logprob.tolist(), misses.tolist()):
        results[it.index] = Score(lp, miss == 0, len(it.seq) - it.ctx_len)


def _add_picks(logits: torch.Tensor, where: torch.Tensor, target: torch.Tensor, request: torch.Tensor,
               logprob: torch.Tensor, misses: torch.Tensor) -> None:
    """Add ``log p(target)`` at each flat position `where` of `logits` to ``logprob[request]``, and
    count in ``misses[request]`` the positions whose argmax is not the target.

    The choices of an item predict their first token from one position: each position's log-softmax
    is computed once, a chunk of positions at a time (the picks sorted by position, so a chunk's
    picks are contiguous). `where`, `target`, `request` are on the CPU.
    """
    device = logits.device
    flat = logits.reshape(-1, logits.shape[-1])
    chunk = max(1, (_PICK_ELEMENTS_CPU if device.type == "cpu" else _PICK_ELEMENTS) // flat.shape[-1])
    positions, slot = torch.unique(where, return_inverse=True)
    order = torch.argsort(slot, stable=True)
    slot = slot[order]
    ends = torch.searchsorted(slot, torch.arange(chunk, len(positions) + chunk, chunk)).tolist()
    positions = positions.to(device)
    slot, target, request = torch.stack([slot, target[order], request[order]]).to(device)
    lo = 0
    for c, hi in zip(range(0, len(positions), chunk), ends):
        logp = torch.log_softmax(flat.index_select(0, positions[c:c + chunk]).float(), dim=-1)
        rows, tgt, req = slot[lo:hi] - c, target[lo:hi], request[lo:hi]
        logprob.index_add_(0, req, logp[rows, tgt])
        misses.index_add_(0, req, (logp.argmax(-1)[rows] != tgt).long())
        lo = hi


@torch.no_grad()
def token_nlls(
    model,
    windows: Sequence[Sequence[int]],
    *,
    last: int | None = None,
    batch_size: int = 4,
) -> list[torch.Tensor]:
    """Per-token negative log-likelihoods of each window (float32, on the CPU).

    Args:
        model: a causal LM.
        windows: token id sequences, each at least 2 tokens and at most the model's length.
        last: score only the last `last` tokens of each window (default: every token after the first).
        batch_size: windows per forward pass (windows are right-padded to the batch's longest).

    Shape:
        result[i]: ``[len(windows[i]) - 1]``, or ``[min(last, len(windows[i]) - 1)]``.
    """
    device = model_device(model)
    order = sorted(range(len(windows)), key=lambda i: -len(windows[i]))
    results: list[torch.Tensor | None] = [None] * len(windows)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        short = [i for i in idx if len(windows[i]) < 2]
        if short:
            raise ValueError(f"window {short[0]} has fewer than 2 tokens")
        ids, mask = pad_batch([windows[i] for i in idx])
        width = ids.shape[1]
        firsts = [1 if last is None else max(1, len(windows[i]) - last) for i in idx]
        # Logits are kept from the earliest position any row needs (position q predicts token q+1).
        offset = min(firsts) - 1
        logits, _ = forward(model, ids.to(device), mask.to(device), logits_to_keep=width - offset)
        for r, i in enumerate(idx):
            n, first = len(windows[i]), firsts[r]
            targets = ids[r, first:n].to(logits.device)
            nll = []
            for c in range(first, n, _LOGPROB_CHUNK):
                hi = min(n, c + _LOGPROB_CHUNK)
                logp = torch.log_softmax(logits[r, c - 1 - offset:hi - 1 - offset].float(), dim=-1)
                nll.append(-logp.gather(-1, targets[c - first:hi - first, None]).squeeze(-1))
            results[i] = torch.cat(nll).cpu()
        del logits
    return results  # type: ignore[return-value]
