"""Weighted sums of objectives, and building one from a spec such as ``"ard+cpt"``."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from linearard.errors import UserError
from linearard.objectives.attention import RELATIONS, AttentionDistillation, RelationDistillation
from linearard.objectives.base import Batch, Metrics, Objective, metrics_to_floats, run_steps
from linearard.objectives.hidden import HiddenDistillation
from linearard.objectives.language import LogitDistillation, NextToken

if TYPE_CHECKING:
    from linearard.models.teacher_student import TeacherStudent

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (RelationDistillation, NextToken, LogitDistillation, HiddenDistillation, AttentionDistillation)
}
DEFAULT_OBJECTIVE = "ard"


class WeightedSum:
    """Σ weight·loss over its parts, sharing one teacher and one student forward between them.

    Parts with weight 0 are not computed at all. Metrics: ``loss`` (the weighted total) and every
    part's metrics prefixed with its name (``ard/loss``, ``ard/qq``, ``cpt/ppl``, …).

    Example:
        >>> parts = [(1.0, RelationDistillation()), (0.1, LogitDistillation())]
        >>> objective = WeightedSum(parts)
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
    spec: str = DEFAULT_OBJECTIVE,
    weights: Mapping[str, float] | None = None,
    **options: Any,
) -> WeightedSum:
    """Build the training objective named by `spec`.

    Args:
        spec: objective names joined by ``+``, from ``OBJECTIVES``: ``ard`` (default), ``cpt``,
            ``logits``, ``hidden``, ``attention``; e.g. ``"ard+cpt"``.
        weights: weight per objective name (default 1 each; 0 switches a part off) and, for ``ard``,
            per relation ``q``, ``k``, ``v`` (default 1 each).
        **options: constructor arguments, either per objective (``ard={"scale": "attention"}``), or
            shared (``layers="0-11"``): given to every objective of the spec that takes them, and
            ignored by the others (``layers`` means nothing to ``cpt``). Per-objective options win.

    Example:
        >>> objective = build_objective("ard+logits", weights={"logits": 0.5, "v": 0}, layers="every-other")
        >>> objective.name
        'ard+logits'
    """
    names = [part.strip() for part in spec.split("+")]
    unknown = [n for n in names if n not in OBJECTIVES]
    if unknown:
        raise UserError(f"unknown objective {unknown[0]!r} in {spec!r}; choose from {', '.join(OBJECTIVES)}")
    weights = dict(weights or {})
    for name, weight in weights.items():
        if name not in names and not (name in RELATIONS and "ard" in names):
            raise UserError(f"a weight is given for {name!r}, which is not a term of the objective {spec!r}")
        if not (math.isfinite(weight) and weight >= 0):
            raise UserError(f"the weight of {name!r} must be a finite number >= 0, got {weight}")
    per_name = {n: dict(options.pop(n)) for n in names if n in options}
    stray = [n for n in options if n in OBJECTIVES]
    if stray:
        raise UserError(f"options are given for {stray[0]!r}, which is not part of the objective {spec!r}")
    for key, value in options.items():
        known = [n for n in OBJECTIVES if key in inspect.signature(OBJECTIVES[n]).parameters]
        if not known:
            raise UserError(f"no objective has an option {key!r}")
        for n in names:
            if n in known:
                per_name.setdefault(n, {}).setdefault(key, value)
    relation_weights = {r: weights[r] for r in RELATIONS if r in weights}
    if relation_weights:
        per_name.setdefault("ard", {})["relations"] = {**dict.fromkeys(RELATIONS, 1.0), **relation_weights}
    parts = []
    for name in names:
        try:
            objective = OBJECTIVES[name](**per_name.get(name, {}))
        except TypeError as error:
            raise UserError(f"bad option for objective {name!r}: {error}") from None
        parts.append((weights.get(name, 1.0), objective))
    return WeightedSum(parts)
