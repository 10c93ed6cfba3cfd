"""Objectives on next-token distributions: plain next-token cross-entropy (``cpt``) and teacher →
student logit distillation (``logits``).

Both apply the LM head to the final hidden states a chunk of positions at a time, each chunk under
non-reentrant checkpointing: the [positions, vocab] logits of only one chunk exist at any moment, in
the forward and again in the backward, instead of the whole [T, V] fp32 matrix (6 GiB for 32K tokens
and a 49K vocabulary).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from linearard.errors import UserError
from linearard.objectives.base import Batch, HiddenStates, Metrics, Objective, Step, attention_mask

if TYPE_CHECKING:
    from linearard.models.teacher_student import TeacherStudent
    from linearard.objectives.spec import Reads

DEFAULT_CHUNK = 1024  # positions per LM-head chunk
_IGNORE = -100  # the target of positions the next-token loss does not count


class _LanguageObjective(Objective):
    """What the two objectives on the LM head's output share: its final hidden state, one chunk of logits."""

    chunk_size: int
    needs_teacher: bool

    def reads(self, num_layers: int) -> Reads:
        from linearard.objectives.spec import Reads

        return Reads(teacher=self.needs_teacher, hidden=frozenset({num_layers}), logits=True)

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        # a chunk's fp32 logits, their log-softmax and its gradient
        return {"logits chunk (fp32)": 3 * min(self.chunk_size, tokens) * shape.vocab_size * 4}


class NextToken(_LanguageObjective):
    """Next-token cross-entropy of the student alone (continual pre-training); no teacher forward.

    A position counts when both it and the token it predicts are real (pad positions are ignored);
    the loss is the mean over those positions.

    Args:
        chunk_size: positions per LM-head chunk (memory vs. kernel-launch trade-off).

    Metrics: ``loss``, ``ppl`` (exp of the loss).

    Example:
        >>> loss, metrics = NextToken()(ts, {"input_ids": ids, "attention_mask": mask})  # doctest: +SKIP
    """

    name = "cpt"
    needs_teacher = False

    def __init__(self, chunk_size: int = DEFAULT_CHUNK):
        self.chunk_size = _check_chunk(chunk_size)

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        return _NextTokenStep(ts, batch, self.chunk_size)


class LogitDistillation(_LanguageObjective):
    """KL(teacher ‖ student) between the next-token distributions at every real position, averaged.

    With temperature τ both distributions are softmax(logits / τ) and the KL is multiplied by τ², which
    keeps the gradient's size independent of τ (Hinton et al., 2015).

    Args:
        temperature: τ > 0 (default 1, as in the released LinearARD code).
        chunk_size: positions per LM-head chunk.

    Metrics: ``loss``.

    Example:
        >>> loss, metrics = LogitDistillation(temperature=2.0)(ts, batch)  # doctest: +SKIP
    """

    name = "logits"
    needs_teacher = True

    def __init__(self, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK):
        if not (math.isfinite(temperature) and temperature > 0):
            raise UserError(f"temperature must be a positive number, got {temperature}")
        self.temperature = float(temperature)
        self.chunk_size = _check_chunk(chunk_size)

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        return _LogitStep(ts, batch, self.temperature, self.chunk_size)


class _NextTokenStep(Step):
    needs_teacher = False

    def __init__(self, ts: TeacherStudent, batch: Batch, chunk_size: int):
        self.ts = ts
        self.batch = batch
        self.chunk_size = chunk_size
        self.final = ts.num_layers
        self.student_hidden = frozenset({self.final})

    def finish(self, teacher: HiddenStates, student: HiddenStates) -> tuple[torch.Tensor, Metrics]:
        hidden = student[self.final]
        ids, mask = self.batch["input_ids"], attention_mask(self.batch).bool()
        counted = mask[:, :-1] & mask[:, 1:]
        # every position, pads ignored by their target: no shape depends on the data (no device wait)
        rows = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        targets = ids[:, 1:].masked_fill(~counted, _IGNORE).reshape(-1)
        head = _lm_head(self.ts)

        def chunk_ce(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(head(h).float(), y, reduction="sum", ignore_index=_IGNORE)

        loss = _chunked_sum(chunk_ce, rows, targets, chunk_size=self.chunk_size) / counted.sum().clamp(min=1)
        return loss, {"loss": loss.detach(), "ppl": loss.detach().exp()}


class _LogitStep(Step):
    def __init__(self, ts: TeacherStudent, batch: Batch, temperature: float, chunk_size: int):
        self.ts = ts
        self.batch = batch
        self.temperature = temperature
        self.chunk_size = chunk_size
        self.final = ts.num_layers
        self.teacher_hidden = self.student_hidden = frozenset({self.final})

    def finish(self, teacher: HiddenStates, student: HiddenStates) -> tuple[torch.Tensor, Metrics]:
        mask = attention_mask(self.batch)
        width = student[self.final].shape[-1]
        # every position, pads weighted 0: no shape depends on the data (no device wait)
        rows_s, rows_t = student[self.final].reshape(-1, width), teacher[self.final].reshape(-1, width)
        weights = mask.reshape(-1).float()
        head = _lm_head(self.ts)
        teacher_head = _teacher_head(self.ts, head)
        tau = self.temperature

        def chunk_kl(h_s: torch.Tensor, h_t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                logp_t = F.log_softmax(teacher_head(h_t).float() / tau, dim=-1)
            logp_s = F.log_softmax(head(h_s).float() / tau, dim=-1)
            per_row = F.kl_div(logp_s, logp_t, log_target=True, reduction="none").sum(dim=-1)
            return (per_row * w).sum() * tau**2

        loss = _chunked_sum(chunk_kl, rows_s, rows_t, weights, chunk_size=self.chunk_size) / weights.sum().clamp(min=1)
        return loss, {"loss": loss.detach()}


def _lm_head(ts: TeacherStudent) -> Callable[[torch.Tensor], torch.Tensor]:
    """hidden [N, H] -> logits [N, V] exactly as the model's causal-LM forward computes them."""
    head = ts.model.get_output_embeddings()
    softcap = getattr(ts.config, "final_logit_softcapping", None)
    if not softcap:
        return head

    def capped(hidden: torch.Tensor) -> torch.Tensor:
        return torch.tanh(head(hidden) / softcap) * softcap

    return capped


def _teacher_head(ts: TeacherStudent, head: Callable) -> Callable[[torch.Tensor], torch.Tensor]:
    # The LM head is frozen in every adapter mode but an explicit one on lm_head; only then does the
    # teacher's head differ from the student's.
    if not any(p.requires_grad for p in ts.model.get_output_embeddings().parameters()):
        return head

    def original(hidden: torch.Tensor) -> torch.Tensor:
        with ts.adapters.off():
            return head(hidden)

    return original


def _chunked_sum(
    fn: Callable[..., torch.Tensor], *rows: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """Σ over chunks of ``fn(*(r[chunk] for r in rows))``, each chunk recomputed in backward."""
    total = rows[0].new_zeros((), dtype=torch.float32)
    for start in range(0, rows[0].shape[0], chunk_size):
        part = [r[start : start + chunk_size] for r in rows]
        if torch.is_grad_enabled() and rows[0].requires_grad:
            total = total + checkpoint(fn, *part, use_reentrant=False, preserve_rng_state=False)  # no randomness in it
        else:
            total = total + fn(*part)
    return total


def _check_chunk(chunk_size: int) -> int:
    if int(chunk_size) < 1:
        raise UserError(f"chunk_size must be at least 1, got {chunk_size}")
    return int(chunk_size)
