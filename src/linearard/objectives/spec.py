"""`ObjectiveSpec`: the training objective as typed, validated data, and what it reads and trains.

A spec is a list of terms, each an objective name with its weight and its options (for ``ard`` the
relations and their weights, the layers, the logit scale, …). It is built once from the user's
settings (`ObjectiveSpec.parse`, or `RestoreConfig.objective_spec`), checked there, and then asked:

- `build` makes the objective that computes the loss;
- `reads` says which layers' Q/K/V, which hidden states and whether the logits the loss reads;
- `reaches` says which trainable parameters can get a gradient from it (data-parallel wrapping and
  the optimizer need to know; a parameter it cannot reach is left out);
- `memory` gives the bytes the plan counts for what the terms keep between the two forwards;
- `to_dict` / `from_dict` round-trip it through JSON or YAML.

Example:
    >>> spec = ObjectiveSpec.parse("ard+cpt", weights={"cpt": 0.1}, relations={"q": 1, "k": 1}, layers="0-1")
    >>> spec.name, [t.weight for t in spec.terms]
    ('ard+cpt', [1.0, 0.1])
    >>> spec.term("ard").options["relations"], spec.term("ard").options["layers"]
    ({'q': 1.0, 'k': 1.0}, (0, 1))
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from linearard.errors import UserError
from linearard.objectives.attention import RELATIONS, AttentionDistillation, RelationDistillation
from linearard.objectives.base import Objective, forward_layers, parse_indices
from linearard.objectives.hidden import HiddenDistillation
from linearard.objectives.language import LogitDistillation, NextToken

if TYPE_CHECKING:
    from linearard.objectives.combine import WeightedSum

OBJECTIVES: dict[str, type[Objective]] = {
    cls.name: cls
    for cls in (RelationDistillation, NextToken, LogitDistillation, HiddenDistillation, AttentionDistillation)
}
DEFAULT_OBJECTIVE = "ard"
# Options with a setting of their own (``--relations``, ``--layers``): the one way to give them.
_OWN_SETTING = {"relations": "--relations", "layers": "--layers"}
_PROJECTION = re.compile(r"(?:^|\.)(q|k|v|qkv)_proj(?:\.|$)")
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_TENSOR_OF = {"q": "query", "k": "key", "v": "value"}


@dataclass(frozen=True)
class Reads:
    """What a loss reads of the teacher and student forwards.

    ``attention`` maps a decoder layer to the attention inputs its hook keeps (``query``, ``key``,
    ``value``); ``hidden`` holds ``hidden_states`` indices (``i`` is the output of layer ``i - 1``,
    ``num_layers`` the final normalised state); ``logits`` says whether the LM head is applied.
    """

    teacher: bool = False
    attention: Mapping[int, frozenset[str]] = field(default_factory=dict)
    hidden: frozenset[int] = frozenset()
    logits: bool = False

    def __or__(self, other: Reads) -> Reads:
        attention = dict(self.attention)
        for layer, tensors in other.attention.items():
            attention[layer] = attention.get(layer, frozenset()) | tensors
        return Reads(self.teacher or other.teacher, attention, self.hidden | other.hidden, self.logits or other.logits)

    def depth(self, num_layers: int) -> int:
        """How many leading decoder layers have an output the loss depends on: every layer below the
        deepest hidden state read, below the LM head, or below a layer whose attention inputs are read."""
        deepest = [num_layers] if self.logits else []
        deepest += list(self.hidden)
        deepest += list(self.attention)  # layer i's inputs come from layers 0 .. i-1
        return min(max(deepest, default=0), num_layers)

    def forward_layers(self, num_layers: int) -> int:
        """How many leading decoder layers each forward runs (`linearard.objectives.base.forward_layers`)."""
        return forward_layers(num_layers, self.attention, self.hidden | ({num_layers} if self.logits else set()))

    def reaches(self, parameter: str, num_layers: int) -> bool:
        """Whether the trainable parameter named `parameter` can get a gradient from this loss.

        A layer below `depth` is reached whole; a layer at or past it only through the projections
        whose output its attention hook keeps (q_proj for ``query``, …; a fused qkv_proj for any).
        Parameters outside the decoder layers are taken as reached.
        """
        layer = _LAYER.search(parameter)
        if layer is None:
            return True
        index = int(layer[1])
        if index < self.depth(num_layers):
            return True
        kept = self.attention.get(index, frozenset())
        projection = _PROJECTION.search(parameter)
        if projection is None or not kept:
            return False
        if projection[1] == "qkv":
            return True
        return _TENSOR_OF[projection[1]] in kept


@dataclass(frozen=True)
class Term:
    """One objective of a spec: its name, weight and constructor options (every option, defaults filled in)."""

    name: str
    weight: float
    options: Mapping[str, Any]

    def build(self) -> Objective:
        return OBJECTIVES[self.name](**self.options)


@dataclass(frozen=True)
class ObjectiveSpec:
    """A weighted sum of objectives, validated (see the module docstring). Terms of weight 0 are kept
    (they name what was switched off) but compute, read and reach nothing."""

    terms: tuple[Term, ...]

    @property
    def name(self) -> str:
        return "+".join(t.name for t in self.terms)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.terms)

    @property
    def active(self) -> tuple[Term, ...]:
        return tuple(t for t in self.terms if t.weight > 0)

    def term(self, name: str) -> Term | None:
        return next((t for t in self.terms if t.name == name), None)

    @classmethod
    def parse(
        cls,
        objective: str = DEFAULT_OBJECTIVE,
        *,
        weights: Mapping[str, float] | None = None,
        relations: Mapping[str, float] | Sequence[str] | None = None,
        layers: str | int | Sequence[int] | None = None,
        options: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> ObjectiveSpec:
        """The spec of ``--objective`` with ``--weights``, ``--relations``, ``--layers`` and
        ``--objective-options``.

        Args:
            objective: objective names joined by ``+`` (``ard``, ``cpt``, ``logits``, ``hidden``, ``attention``).
            weights: weight per objective name (default 1; 0 switches a term off).
            relations: the relations ``ard`` distils and their weights; relations left out are off
                (default Q/Q, K/K and V/V, weight 1 each).
            layers: decoder layers of ``ard``, ``attention`` and ``hidden``: ``all``, ``every-other``,
                indices and ranges (``0-11,-1``) or a list of indices (default: every layer; for
                ``hidden`` four layers spread over the depth).
            options: further options per objective, e.g. ``{"ard": {"kv_norm": "query_heads"}}``.

        Raises:
            UserError: an unknown objective, weight, relation, layer choice or option, naming the
                setting to use instead where an old spelling was given.
        """
        names = [part.strip() for part in str(objective).split("+")]
        unknown = [n for n in names if n not in OBJECTIVES]
        if unknown:
            raise UserError(
                f"unknown objective {unknown[0]!r} in {objective!r}; choose from {', '.join(OBJECTIVES)}"
            )
        if len(set(names)) != len(names):
            raise UserError(f"an objective appears twice in {objective!r}")
        weights = dict(weights or {})
        for key, weight in weights.items():
            if key in RELATIONS:
                shown = " ".join(f"{r}={weights.get(r, 1):g}" for r in RELATIONS)
                raise UserError(f"relation weights are given with --relations, e.g. --relations {shown}")
            if key not in names:
                raise UserError(f"a weight is given for {key!r}, which is not a term of the objective {objective!r}")
            _check_weight(key, weight)
        options = dict(options or {})
        stray = [k for k in options if k not in names]
        if stray:
            raise UserError(f"options are given for {stray[0]!r}, which is not part of the objective {objective!r}")
        for key, value in options.items():
            if not isinstance(value, Mapping):
                raise UserError(f"the options of {key!r} must be a mapping of option: value, got {value!r}")
            options[key] = dict(value)
        layer_choice = None if layers is None else normalise_layers(layers)
        if layer_choice is not None and not {"ard", "attention", "hidden"} & set(names):
            raise UserError(f"--layers chooses layers of ard, attention or hidden; {objective!r} has none of them")
        if relations and "ard" not in names:
            raise UserError(f"--relations weighs the relations of ard, which is not part of {objective!r}")
        terms = []
        for name in names:
            given = options.get(name, {})
            for key in given:
                if key in _OWN_SETTING:
                    raise UserError(
                        f"give {key} with {_OWN_SETTING[key]}, not as {name}.{key} (e.g. {_example(key)})"
                    )
            if name == "ard" and relations:
                given["relations"] = _relations(relations)
            if layer_choice is not None and name in ("ard", "attention", "hidden"):
                given["layers"] = layer_choice
            terms.append(Term(name, float(weights.get(name, 1.0)), _resolve_options(name, given)))
        if not any(t.weight > 0 for t in terms):
            raise UserError(f"every objective in {objective!r} has weight 0")
        return cls(tuple(terms))

    @classmethod
    def single(cls, name: str) -> ObjectiveSpec:
        """One objective with its default options."""
        return cls.parse(name)

    def to_dict(self) -> dict[str, Any]:
        """``{"terms": [{"name": ..., "weight": ..., "options": {...}}, ...]}``; plain data (JSON/YAML)."""
        return {"terms": [{"name": t.name, "weight": t.weight, "options": _plain(t.options)} for t in self.terms]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ObjectiveSpec:
        terms = []
        for item in data["terms"]:
            name = item["name"]
            if name not in OBJECTIVES:
                raise UserError(f"unknown objective {name!r} in a saved objective")
            options = dict(item.get("options", {}))
            terms.append(Term(name, _check_weight(name, item["weight"]), _resolve_options(name, options)))
        return cls(tuple(terms))

    def build(self) -> WeightedSum:
        """The objective that computes this spec's loss."""
        from linearard.objectives.combine import WeightedSum

        return WeightedSum([(t.weight, t.build()) for t in self.terms])

    def reads(self, num_layers: int) -> Reads:
        """What the active terms read, together, on a model of `num_layers` decoder layers."""
        out = Reads()
        for t in self.active:
            out = out | t.build().reads(num_layers)
        return out

    def reaches(self, parameter: str, num_layers: int) -> bool:
        """Whether the trainable parameter named `parameter` can get a gradient (see `Reads.reaches`)."""
        return self.reads(num_layers).reaches(parameter, num_layers)

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        """Bytes one micro-batch of `tokens` tokens keeps for the active terms, by part (a part named
        alike by several terms counts once, at its largest). `shape` is a `linearard.training.plan.ModelShape`."""
        parts: dict[str, int] = {}
        for t in self.active:
            for key, size in t.build().memory(shape, tokens, act_bytes, recompute_teacher=recompute_teacher).items():
                parts[key] = max(parts.get(key, 0), size)
        return parts


def normalise_layers(layers: Any) -> str | tuple[int, ...]:
    """A layer choice as the spec keeps it: ``"all"``, ``"every-other"`` or a tuple of indices.

    Example:
        >>> normalise_layers("0-2,-1"), normalise_layers(3), normalise_layers("every-other")
        ((0, 1, 2, -1), (3,), 'every-other')
    """
    if isinstance(layers, bool):
        raise UserError(f"layers must be 'all', 'every-other' or layer indices, got {layers!r}")
    if isinstance(layers, int):
        return (layers,)
    if isinstance(layers, str):
        text = layers.strip()
        return text if text in ("all", "every-other") else tuple(parse_indices(text, what="layers"))
    try:
        indices = tuple(int(i) for i in layers)
    except (TypeError, ValueError):
        raise UserError(f"layers must be 'all', 'every-other' or layer indices, got {layers!r}") from None
    if not indices:
        raise UserError("no layers chosen")
    return indices


def _resolve_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Every constructor option of objective `name`: `given` over the defaults, checked by building it."""
    cls = OBJECTIVES[name]
    params = inspect.signature(cls).parameters
    unknown = [k for k in given if k not in params]
    if unknown:
        raise UserError(
            f"objective {name!r} has no option {unknown[0]!r}; its options: {', '.join(params) or 'none'}"
        )
    options = {k: p.default for k, p in params.items()}
    options.update(given)
    if name == "ard":
        options["relations"] = _relations(options["relations"])
    if options.get("layers") is not None:
        options["layers"] = normalise_layers(options["layers"])
    try:
        cls(**options)  # the constructor checks the values
    except (TypeError, ValueError) as error:
        raise UserError(f"bad option for objective {name!r}: {error}") from None
    return options


def _relations(relations: Mapping[str, float] | Sequence[str]) -> dict[str, float]:
    if isinstance(relations, str):
        relations = [r.strip() for r in relations.replace(",", " ").split()]
    if not isinstance(relations, Mapping):
        relations = dict.fromkeys(relations, 1.0)
    unknown = [r for r in relations if r not in RELATIONS]
    if unknown:
        raise UserError(f"unknown relation {unknown[0]!r}; choose from {', '.join(RELATIONS)}")
    return {r: _check_weight(r, relations[r]) for r in RELATIONS if r in relations}


def _check_weight(name: str, weight: Any) -> float:
    try:
        value = float(weight)
    except (TypeError, ValueError):
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise UserError(f"the weight of {name!r} must be a finite number >= 0, got {weight!r}")
    return value


def _example(key: str) -> str:
    return "--relations q=1 k=1 v=0" if key == "relations" else "--layers 0-11"


def _plain(options: Mapping[str, Any]) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()}
