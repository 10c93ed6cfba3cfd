"""Weighted sums of objectives; `build_objective` makes one from ``"ard+cpt"`` and its settings."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from linearard.errors import UserError
from linearard.objectives.base import Batch, Metrics, Objective, metrics_to_floats, run_steps
from linearard.objectives.spec import DEFAULT_OBJECTIVE, ObjectiveSpec

if TYPE_CHECKING:
    from linearard.models.teacher_student import TeacherStudent


class WeightedSum:
    """Σ weight·loss over its parts, sharing one teacher and one student forward between them.

    Parts with weight 0 are not computed at all. Metrics: ``loss`` (the weighted total) and every
    part's metrics prefixed with its name (``ard/loss``, ``ard/qq``, ``cpt/ppl``, …).

    Example:
        >>> objective = WeightedSum([(1.0, RelationDistillation()), (0.1, LogitDistillation())])  # doctest: +SKIP
        >>> loss, metrics = objective(ts, batch)  # doctest: +SKIP
    """

    def __init__(self, parts: Sequence[tuple[float, Objective]]):
        names = [objective.name for _, objective in parts]
        if len(set(names)) != len(names):
            raise UserError(f"an objective appears twice in {'+'.join(names)}")
        self.parts = [(float(w), objective) for w, objective in parts]
        self.active = [(w, objective) for w, objective in self.parts if w != 0]
        if not self.active:
            raise UserError(f"every objective in {'+'.join(names)} has weight 0")
        self.name = "+".join(names)

    def __call__(self, ts: TeacherStudent, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.run(ts, batch)
        return loss, metrics_to_floats(metrics)

    def run(self, ts: TeacherStudent, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """As calling it, with the metrics left as tensors on the device (no synchronisation)."""
        steps = [objective.start(ts, batch) for _, objective in self.active]
        results = run_steps(ts, batch, steps)
        total = sum(w * loss for (w, _), (loss, _) in zip(self.active, results))
        metrics = {"loss": total.detach()}
        for (_, objective), (_, part) in zip(self.active, results):
            metrics.update({f"{objective.name}/{key}": value for key, value in part.items()})
        return total, metrics


def build_objective(
    objective: str | ObjectiveSpec = DEFAULT_OBJECTIVE,
    weights: Mapping[str, float] | None = None,
    *,
    relations: Mapping[str, float] | Sequence[str] | None = None,
    layers: str | int | Sequence[int] | None = None,
    **options: Mapping[str, Any],
) -> WeightedSum:
    """The training objective: ``ObjectiveSpec.parse(...).build()`` (see `ObjectiveSpec.parse`).

    Args:
        objective: objective names joined by ``+`` (``ard``, ``cpt``, ``logits``, ``hidden``,
            ``attention``), or a spec.
        weights: weight per objective name (default 1 each; 0 switches a term off).
        relations: the relations ``ard`` distils, with weights (default q, k and v, weight 1).
        layers: the decoder layers of ``ard``, ``attention`` and ``hidden``.
        **options: further options per objective, e.g. ``ard={"scale": "attention"}``.

    Example:
        >>> objective = build_objective("ard+logits", {"logits": 0.5}, relations={"q": 1, "k": 1}, layers="every-other")
        >>> objective.name
        'ard+logits'
    """
    if isinstance(objective, ObjectiveSpec):
        return objective.build()
    spec = ObjectiveSpec.parse(objective, weights=weights, relations=relations, layers=layers, options=options)
    return spec.build()
