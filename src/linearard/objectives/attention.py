"""Objectives on what attention receives: the Q/Q, K/K, V/V relations (``ard``) and the attention map
itself (``attention``), each a per-row KL(teacher ‖ student) computed by `linearard.ops` without ever
building a T×T matrix.

Each student layer's loss is computed inside that layer's attention call, so the student's Q/K/V of
one layer are released as soon as the next layer runs (their only remaining user is the kernel's
backward). Under non-reentrant gradient checkpointing a layer's forward, and with it the hook, runs
again during backward; the per-layer results live in a dict keyed by layer index, overwritten on
recomputation and summed only after the forward has returned, so nothing is counted twice.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from linearard.errors import UserError
from linearard.objectives.base import (
    Batch,
    HiddenStates,
    Metrics,
    Objective,
    Step,
    attention_mask,
    layer_groups,
    select_layers,
)
from linearard.ops import attention_kl, relation_kl, relation_operand

if TYPE_CHECKING:
    from linearard.models.teacher_student import AttentionInputs, TeacherStudent
    from linearard.objectives.spec import Reads

RELATIONS = ("q", "k", "v")
_TENSOR = {"q": "query", "k": "key", "v": "value"}
SCALES = ("head_dim", "attention")
KV_NORMS = ("kv_heads", "query_heads")
LAYER_REDUCTIONS = ("mean", "sum")

# What a step keeps of the teacher's attention inputs of one layer, and how it scores the student's
# inputs of that layer against it: (student inputs, kept) -> one KL per component.
Keep = Callable[["AttentionInputs"], Any]
LayerKL = Callable[["AttentionInputs", Any], torch.Tensor]


class RelationDistillation(Objective):
    """LinearARD's loss: per layer, Σ_r w_r·KL(P_t^r ‖ P_s^r) over the relations r ∈ {Q/Q, K/K, V/V},
    where P^r is the causal row-wise softmax of X·Xᵀ·scale for X = Q, K or V of that layer; then the
    mean (or sum) over the chosen layers.

    Normalisation: each relation's KL is summed over batch, heads and valid (non-pad) query rows and
    divided by (valid rows × that relation's head count): Hq for Q/Q and Hkv for K/K and V/V, so every
    relation is a mean per row and head. The released LinearARD code divides K/K and V/V by Hq as well,
    which under grouped-query attention weighs them Hkv/Hq as much as Q/Q (¼ on Llama-3-8B);
    ``kv_norm="query_heads"`` reproduces that.

    Args:
        relations: which relations and their weights, e.g. ``{"q": 1, "k": 1, "v": 1}`` (default) or a
            sequence such as ``("q", "k")`` (weight 1 each); a relation of weight 0 is not computed.
        layers: ``"all"`` (default), ``"every-other"`` or explicit layer indices (0-based, negative from
            the end); see `linearard.objectives.base.select_layers`.
        scale: relation logit scale: ``"head_dim"`` (head_dim^-½, the paper's), ``"attention"`` (the
            attention's own softmax scale, e.g. Gemma's query_pre_attn_scalar^-½) or a number.
        kv_norm: ``"kv_heads"`` (default) or ``"query_heads"`` (the released code's K/K, V/V weighting).
        layer_reduction: ``"mean"`` (default, as in the paper's code) or ``"sum"`` over the chosen layers.

    Metrics: ``loss``; ``qq``/``kk``/``vv``, each relation's unweighted KL averaged over the chosen
    layers; ``layers_<lo>-<hi>``, the weighted per-layer loss averaged over the chosen layers in each
    third of the model.

    Example:
        >>> loss, metrics = RelationDistillation(relations={"q": 1, "k": 1})(ts, batch)  # doctest: +SKIP
        >>> loss.backward()  # doctest: +SKIP
    """

    name = "ard"

    def __init__(
        self,
        relations: Mapping[str, float] | Sequence[str] = ("q", "k", "v"),
        layers: str | Sequence[int] = "all",
        scale: str | float = "head_dim",
        kv_norm: str = "kv_heads",
        layer_reduction: str = "mean",
    ):
        if not isinstance(relations, Mapping):
            relations = dict.fromkeys(relations, 1.0)
        unknown = [r for r in relations if r not in RELATIONS]
        if unknown:
            raise UserError(f"unknown relation {unknown[0]!r}; choose from {', '.join(RELATIONS)}")
        bad = [w for w in relations.values() if not (math.isfinite(w) and w >= 0)]
        if bad:
            raise UserError(f"relation weights must be finite numbers >= 0, got {bad[0]}")
        self.relations = {r: float(relations[r]) for r in RELATIONS if relations.get(r, 0) > 0}
        if not self.relations:
            raise UserError("at least one of the relations q, k, v needs a weight above 0")
        self.layers = layers
        self.scale = _check_scale(scale)
        self.kv_norm = _check_choice("kv_norm", kv_norm, KV_NORMS)
        self.layer_reduction = _check_choice("layer_reduction", layer_reduction, LAYER_REDUCTIONS)

    def reads(self, num_layers: int) -> Reads:
        from linearard.objectives.spec import Reads

        tensors = frozenset(_TENSOR[r] for r in self.relations)
        return Reads(teacher=True, attention=dict.fromkeys(select_layers(self.layers, num_layers), tensors))

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        widths = {"q": shape.num_heads, "k": shape.num_kv_heads, "v": shape.num_kv_heads}
        width = sum(widths[r] for r in self.relations) * shape.head_dim
        layers = len(select_layers(self.layers, shape.num_layers))
        if recompute_teacher:
            return _recomputed_teacher(shape, tokens, act_bytes, layers, width)
        return {"teacher Q/K/V (ard, distilled layers)": tokens * act_bytes * layers * width}

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        mask = attention_mask(batch)
        names = tuple(self.relations)
        tensors = tuple(_TENSOR[r] for r in names)
        rows = mask.bool().sum().clamp(min=1)  # valid (non-pad) rows; stays on the device

        def keep(teacher: AttentionInputs) -> tuple[list, float]:
            xs = [getattr(teacher, t).detach() for t in tensors]
            return [relation_operand([xs[r] for r in members]) for members in _head_groups(xs)], teacher.scaling

        def layer_kl(student: AttentionInputs, kept: tuple[list, float]) -> torch.Tensor:
            operands_t, teacher_scaling = kept
            xs = [getattr(student, t) for t in tensors]
            heads = [x.shape[1] for x in xs]
            # per relation, the heads its KL is averaged over (see the class docstring)
            norm = heads if self.kv_norm == "kv_heads" else [student.query.shape[1]] * len(xs)
            sums: dict[int, torch.Tensor] = {}
            for members, operand_t in zip(_head_groups(xs), operands_t):
                # A self-relation relates each head only to itself: the relations of a group are one
                # relation over their joined heads, one kernel launch wide enough to fill the GPU
                # when the key/value heads are few.
                parts_s = [xs[r] for r in members]
                first_t = operand_t if isinstance(operand_t, torch.Tensor) else operand_t[0]
                per_head = relation_kl(
                    parts_s,
                    operand_t,
                    attention_mask=mask,
                    scale_s=_scale(self.scale, parts_s[0], student.scaling),
                    scale_t=_scale(self.scale, first_t, teacher_scaling),
                    reduction="none",
                ).sum(dim=(0, 2))
                for r, part in zip(members, per_head.split([heads[r] for r in members])):
                    sums[r] = part.sum()
            # Python numbers only: a tensor built from a list would be a host-to-device copy per layer
            return torch.stack([sums[r] / norm[r] for r in range(len(xs))]) / rows

        return _PerLayerStep(
            layers=select_layers(self.layers, ts.num_layers),
            num_layers=ts.num_layers,
            keep=keep,
            layer_kl=layer_kl,
            names=tuple(r + r for r in names),
            weights=tuple(self.relations.values()),
            layer_reduction=self.layer_reduction,
        )


class AttentionDistillation(Objective):
    """KL(teacher ‖ student) between the rows of the actual causal attention maps softmax(Q·Kᵀ·scale)
    (grouped-query heads read their shared key head), per chosen layer, averaged over layers.

    The map is the pre-softcap, full-causal one: Gemma's logit softcapping and sliding windows are not
    applied, so on those layers it is the attention the layer would have without them.

    Args:
        layers: as in `RelationDistillation`.
        scale: ``"attention"`` (default, the attention's own softmax scale), ``"head_dim"`` or a number.
        layer_reduction: ``"mean"`` (default) or ``"sum"`` over the chosen layers.

    Metrics: ``loss``; ``qk`` (the KL averaged over chosen layers); ``layers_<lo>-<hi>`` per third.

    Example:
        >>> loss, metrics = AttentionDistillation(layers="every-other")(ts, batch)  # doctest: +SKIP
    """

    name = "attention"

    def __init__(
        self,
        layers: str | Sequence[int] = "all",
        scale: str | float = "attention",
        layer_reduction: str = "mean",
    ):
        self.layers = layers
        self.scale = _check_scale(scale)
        self.layer_reduction = _check_choice("layer_reduction", layer_reduction, LAYER_REDUCTIONS)

    def reads(self, num_layers: int) -> Reads:
        from linearard.objectives.spec import Reads

        tensors = frozenset({"query", "key"})
        return Reads(teacher=True, attention=dict.fromkeys(select_layers(self.layers, num_layers), tensors))

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        width = (shape.num_heads + shape.num_kv_heads) * shape.head_dim
        layers = len(select_layers(self.layers, shape.num_layers))
        if recompute_teacher:
            return _recomputed_teacher(shape, tokens, act_bytes, layers, width)
        return {"teacher Q/K (attention, distilled layers)": tokens * act_bytes * layers * width}

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        mask = attention_mask(batch)

        def keep(teacher: AttentionInputs) -> tuple[torch.Tensor, torch.Tensor, float]:
            return teacher.query.detach(), teacher.key.detach(), teacher.scaling

        def layer_kl(student: AttentionInputs, kept: tuple[torch.Tensor, torch.Tensor, float]):
            q_t, k_t, teacher_scaling = kept
            q_s = student.query
            kl = attention_kl(
                q_s,
                student.key,
                q_t,
                k_t,
                attention_mask=mask,
                scale_s=_scale(self.scale, q_s, student.scaling),
                scale_t=_scale(self.scale, q_t, teacher_scaling),
                reduction="mean",
            )
            return kl.reshape(1)

        return _PerLayerStep(
            layers=select_layers(self.layers, ts.num_layers),
            num_layers=ts.num_layers,
            keep=keep,
            layer_kl=layer_kl,
            names=("qk",),
            weights=(1.0,),
            layer_reduction=self.layer_reduction,
        )


class _PerLayerStep(Step):
    """Keeps the teacher's tensors of the chosen layers, then scores each student layer as it runs."""

    captures_attention = True

    def __init__(
        self,
        layers: list[int],
        num_layers: int,
        keep: Keep,
        layer_kl: LayerKL,
        names: tuple[str, ...],
        weights: tuple[float, ...],
        layer_reduction: str,
    ):
        self.layers = layers
        self.attention_layers = frozenset(layers)
        self.num_layers = num_layers
        self.keep = keep
        self.layer_kl = layer_kl
        self.names = names
        self.weights = weights
        self.layer_reduction = layer_reduction
        self.teacher: dict[int, Any] = {}
        self.per_layer: dict[int, torch.Tensor] = {}

    def on_teacher_attention(self, layer: int, inputs: AttentionInputs) -> None:
        if layer in self.attention_layers:
            self.teacher[layer] = self.keep(inputs)

    def on_student_attention(self, layer: int, inputs: AttentionInputs) -> None:
        if layer in self.attention_layers:
            self._score(layer, inputs, self.teacher[layer])

    def on_attention_pair(self, layer: int, teacher: AttentionInputs, student: AttentionInputs) -> None:
        if layer in self.attention_layers:
            self._score(layer, student, self.keep(teacher))

    def _score(self, layer: int, student: AttentionInputs, kept: Any) -> None:
        kl = self.layer_kl(student, kept)
        # Gradient checkpointing recomputes the layer in backward and calls this again; that second
        # value only regenerates the tensors the first one saved. Keeping it instead would keep every
        # recomputed graph alive until backward ends, and adding it would count the layer twice.
        self.per_layer.setdefault(layer, kl)

    def finish(self, teacher: HiddenStates, student: HiddenStates) -> tuple[torch.Tensor, Metrics]:
        missing = [i for i in self.layers if i not in self.per_layer]
        if missing:
            raise RuntimeError(f"no attention call was captured for layers {missing}")
        kl = torch.stack([self.per_layer[i] for i in self.layers])  # [layers, components]
        per_layer = sum(kl[:, j] * w for j, w in enumerate(self.weights))
        loss = per_layer.mean() if self.layer_reduction == "mean" else per_layer.sum()
        metrics: Metrics = {"loss": loss.detach()}
        detached = kl.detach()
        for j, name in enumerate(self.names):
            metrics[name] = detached[:, j].mean()
        start = 0
        for group, members in layer_groups(self.layers, self.num_layers).items():
            # the groups split the sorted layers into consecutive runs
            metrics[group] = per_layer.detach()[start:start + len(members)].mean()
            start += len(members)
        return loss, metrics


def _recomputed_teacher(shape: Any, tokens: int, act_bytes: int, layers: int, width: int) -> dict[str, int]:
    """What the teacher keeps when its attention inputs are recomputed in the student's layers: each
    distilled layer's attention input, and one layer's Q/K/V at a time (twice: a joined copy where the
    relation-KL implementation joins heads by copying, as off the GPU)."""
    return {
        "teacher attention inputs (distilled layers)": tokens * act_bytes * layers * shape.hidden_size,
        "teacher Q/K/V of one layer": 2 * tokens * act_bytes * width,
    }


def _head_groups(xs: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of `xs` that can share one kernel call: same head dim and dtype, in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, x in enumerate(xs):
        groups.setdefault((x.shape[-1], x.dtype), []).append(i)
    return list(groups.values())


def _check_scale(scale: str | float) -> str | float:
    if isinstance(scale, str):
        return _check_choice("scale", scale, SCALES)
    if not float(scale) > 0:
        raise UserError(f"scale must be positive, got {scale}")
    return float(scale)


def _check_choice(what: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise UserError(f"{what} must be one of {', '.join(choices)}; got {value!r}")
    return value


def _scale(choice: str | float, x: torch.Tensor, attention_scaling: float) -> float:
    if choice == "head_dim":
        return x.shape[-1] ** -0.5
    if choice == "attention":
        return attention_scaling
    return float(choice)
