"""LongReD-style hidden-state distillation: pull the student's hidden states toward the native
teacher's with a cosine loss, at a few depths of the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from linearard.objectives.base import (
    Batch,
    HiddenStates,
    Metrics,
    Objective,
    Step,
    attention_mask,
    select_layers,
)

if TYPE_CHECKING:
    from linearard.models.teacher_student import TeacherStudent
    from linearard.objectives.spec import Reads


def spread_layers(num_layers: int, count: int = 4) -> list[int]:
    """`count` decoder layers evenly spread over the depth, always including the last.

    Example:
        >>> spread_layers(30)
        [7, 14, 21, 29]
    """
    return sorted({max(1, round(num_layers * k / count)) - 1 for k in range(1, count + 1)})


class HiddenDistillation(Objective):
    """Mean over chosen layers of the mean over real tokens of 1 − cos(h_student, h_teacher), where h
    is a decoder layer's output; for the last layer, the final normalised state (as transformers
    reports it, and as LongReD distils it).

    Args:
        layers: decoder layers, 0-based as for the other objectives (see
            `linearard.objectives.base.select_layers`). Default `spread_layers`: LongReD distils a
            handful of depths including the last.

    Metrics: ``loss`` and ``layer<i>`` for each chosen layer.

    Example:
        >>> loss, metrics = HiddenDistillation(layers=[3, -1])(ts, batch)  # doctest: +SKIP
    """

    name = "hidden"

    def __init__(self, layers: str | Sequence[int] | None = None):
        self.layers = layers

    def chosen(self, num_layers: int) -> list[int]:
        return spread_layers(num_layers) if self.layers is None else select_layers(self.layers, num_layers)

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        return _HiddenStep(self.chosen(ts.num_layers), attention_mask(batch).bool())

    def reads(self, num_layers: int) -> Reads:
        from linearard.objectives.spec import Reads

        return Reads(teacher=True, hidden=frozenset(i + 1 for i in self.chosen(num_layers)))

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        layers = len(self.chosen(shape.num_layers))
        return {"teacher hidden states (hidden)": tokens * act_bytes * layers * shape.hidden_size}


class _HiddenStep(Step):
    def __init__(self, layers: list[int], mask: torch.Tensor):
        self.layers = layers
        self.mask = mask
        # hidden_states[i + 1] is the output of decoder layer i
        self.teacher_hidden = self.student_hidden = frozenset(i + 1 for i in layers)

    def finish(self, teacher: HiddenStates, student: HiddenStates) -> tuple[torch.Tensor, Metrics]:
        per_layer = torch.stack([self._distance(student[i + 1], teacher[i + 1]) for i in self.layers])
        loss = per_layer.mean()
        metrics: Metrics = {"loss": loss.detach()}
        metrics.update({f"layer{i}": v for i, v in zip(self.layers, per_layer.detach())})
        return loss, metrics

    def _distance(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        # over the real positions, weighted rather than selected: no shape depends on the data, so the
        # step never waits for the device
        distance = 1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)
        return (distance * self.mask).sum() / self.mask.sum().clamp(min=1)
