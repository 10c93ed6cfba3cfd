"""RoPE scaling: which kind, by how much, and how it is written into a transformers config.

transformers 5 keeps RoPE settings in ``config.rope_parameters`` (``rope_theta`` inside it); 4.x used
``rope_scaling`` plus a top-level ``rope_theta``. We compute in the 5.x form and can write both, so an
exported model loads correctly in either major version.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

from linearard.errors import UserError

ROPE_TYPES = ("linear", "dynamic", "yarn", "longrope", "llama3", "abf")
# Types whose frequencies transformers recomputes from the current length at run time.
LENGTH_DEPENDENT = ("dynamic", "longrope")
# Types that stretch positions by the factor: they reach native length x factor and no further.
_POSITION_SCALING = ("linear", "yarn", "longrope")
# Gemma-3 style configs keep one RoPE setting per layer type; only global layers get scaled.
SCALED_LAYER_TYPE = "full_attention"
# How transformers 4.x named the RoPE base of the other layer types (Gemma 3's local layers).
LEGACY_PER_LAYER_FIELDS = {"sliding_attention": "rope_local_base_freq"}


@dataclass(frozen=True)
class RopeScaling:
    """How the student's RoPE is stretched.

    Args:
        rope_type: one of ``ROPE_TYPES``; ``abf`` raises ``rope_theta`` instead of scaling positions.
        factor: target_length / original_length.
        original_length: the context length the model was pre-trained for.
        target_length: the context length the student should handle.
    """

    rope_type: str
    factor: float
    original_length: int
    target_length: int

    @classmethod
    def resolve(
        cls,
        config: Any,
        rope_type: str | None = None,
        factor: float | None = None,
        target_length: int | None = None,
    ) -> RopeScaling:
        """Fill in what was not given: the factor from the target length or the reverse.

        With only a target length the type defaults to YaRN, which degrades least before training.
        """
        native = native_length(config)
        rope_type = (rope_type or "yarn").lower()
        if rope_type not in ROPE_TYPES:
            raise UserError(f"unknown RoPE type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
        if factor is None and target_length is None:
            raise UserError("give --rope-factor or --target-length (or both)")
        if factor is not None and not (math.isfinite(factor) and factor > 1.0):
            raise UserError(f"--rope-factor must be a number above 1, got {factor}")
        if target_length is None:
            target_length = round(native * factor)
        if target_length <= native:
            raise UserError(
                f"target length {target_length} is not above the model's native length {native}"
            )
        if factor is None:
            factor = target_length / native
        elif rope_type in _POSITION_SCALING and target_length > round(native * factor):
            raise UserError(
                f"--target-length {target_length} is beyond what {rope_type} x{factor:g} reaches from the model's "
                f"native {native} tokens ({round(native * factor)}); give --rope-factor "
                f"{target_length / native:g}, or only one of the two"
            )
        return cls(rope_type, float(factor), native, int(target_length))

    def describe(self) -> str:
        return f"{self.rope_type} x{self.factor:g} ({self.original_length} -> {self.target_length} tokens)"


def native_length(config: Any) -> int:
    """The context length the weights were pre-trained for (before any scaling in this config)."""
    params = config.rope_parameters or {}
    for p in _param_dicts(params):
        if p.get("original_max_position_embeddings"):
            return int(p["original_max_position_embeddings"])
        if p.get("rope_type") == "linear":  # PI configs carry only the factor
            return round(config.max_position_embeddings / p["factor"])
    return int(config.max_position_embeddings)


def scaled_config(config: Any, scaling: RopeScaling) -> Any:
    """A copy of `config` whose RoPE settings implement `scaling`.

    ``max_position_embeddings`` becomes the target length, except for dynamic NTK: transformers derives
    that type's stretch from the ratio of the current length to ``max_position_embeddings``, so there it
    must stay the native length.
    """
    if native_length(config) != scaling.original_length:
        raise UserError("this model's config is already RoPE-scaled; start from the native model")
    new = copy.deepcopy(config)
    params = copy.deepcopy(config.rope_parameters)
    if _is_per_layer_type(params):
        if SCALED_LAYER_TYPE not in params:
            raise UserError(f"per-layer RoPE config without a {SCALED_LAYER_TYPE!r} entry: {list(params)}")
        params[SCALED_LAYER_TYPE] = _scaled_params(params[SCALED_LAYER_TYPE], config, scaling)
    else:
        params = _scaled_params(params, config, scaling)
    new.rope_parameters = params
    if getattr(new, "original_max_position_embeddings", None):  # Phi-3 reads it from the top level
        new.original_max_position_embeddings = scaling.original_length
    if scaling.rope_type != "dynamic":
        new.max_position_embeddings = scaling.target_length
    return new


def legacy_rope_fields(config: Any) -> dict[str, Any]:
    """The transformers-4.x spelling of the config's RoPE settings (``rope_theta`` + ``rope_scaling``).

    Per-layer-type configs (Gemma 3) are spelled as 4.x Gemma 3 read them: the global layers' entry
    as ``rope_theta`` + ``rope_scaling``, the sliding-window layers' base as ``rope_local_base_freq``.
    """
    params = config.rope_parameters or {}
    out: dict[str, Any] = {}
    if _is_per_layer_type(params):
        for layer_type, field_name in LEGACY_PER_LAYER_FIELDS.items():
            if layer_type in params:
                out[field_name] = params[layer_type]["rope_theta"]
        params = params.get(SCALED_LAYER_TYPE, next(iter(params.values())))
    out["rope_theta"] = params["rope_theta"]
    scaling = {k: v for k, v in params.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling.get("rope_type", "default") != "default":
        out["rope_scaling"] = dict(scaling, type=scaling["rope_type"])
    return out


def rope_parameters_from_dict(config_dict: dict[str, Any]) -> dict[str, Any]:
    """Read either dialect from a config.json dictionary into the 5.x ``rope_parameters`` form."""
    if config_dict.get("rope_parameters"):
        return copy.deepcopy(config_dict["rope_parameters"])
    params = dict(config_dict.get("rope_scaling") or {})
    if "type" in params:
        params.setdefault("rope_type", params.pop("type"))
    params.setdefault("rope_type", "default")
    params["rope_theta"] = config_dict.get("rope_theta", 10000.0)
    return params


def _scaled_params(params: dict[str, Any], config: Any, scaling: RopeScaling) -> dict[str, Any]:
    theta = params["rope_theta"]
    keep = {k: params[k] for k in ("rope_theta", "partial_rotary_factor") if k in params}
    f, orig = scaling.factor, scaling.original_length
    kind = scaling.rope_type
    if kind == "linear":
        return {**keep, "rope_type": "linear", "factor": f}
    if kind == "dynamic":
        return {**keep, "rope_type": "dynamic", "factor": f}
    if kind == "yarn":
        return {**keep, "rope_type": "yarn", "factor": f, "original_max_position_embeddings": orig}
    if kind == "llama3":
        return {
            **keep,
            "rope_type": "llama3",
            "factor": f,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": orig,
        }
    if kind == "longrope":
        long_factor = _ramp_factors(config, params, f, orig)
        return {
            **keep,
            "rope_type": "longrope",
            "long_factor": long_factor,
            "short_factor": [1.0] * len(long_factor),
            "original_max_position_embeddings": orig,
        }
    if kind == "abf":
        # NTK-aware base change: the lowest frequency slows by exactly `factor`.
        dim = rotary_dim(config, params)
        return {**keep, "rope_type": "default", "rope_theta": theta * f ** (dim / (dim - 2))}
    raise UserError(f"unknown RoPE type {kind!r}")


def _ramp_factors(config: Any, params: dict[str, Any], factor: float, orig: int) -> list[float]:
    """Per-frequency LongRoPE factors without a search: keep dimensions that turn many times within
    the native window (factor 1), interpolate those that turn less than once (factor `factor`), and
    ramp linearly between, as YaRN does."""
    dim = rotary_dim(config, params)
    theta = params["rope_theta"]
    out = []
    for i in range(dim // 2):
        wavelength = 2 * math.pi * theta ** (2 * i / dim)
        turns = orig / wavelength
        t = min(max((32.0 - turns) / (32.0 - 1.0), 0.0), 1.0)  # 0 above 32 turns, 1 below one turn
        out.append(1.0 + t * (factor - 1.0))
    return out


def rotary_dim(config: Any, params: dict[str, Any]) -> int:
    """How many of a head's dimensions RoPE rotates (all but a ``partial_rotary_factor`` leaves out)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return int(head_dim * params.get("partial_rotary_factor", 1.0))


def _is_per_layer_type(params: dict[str, Any]) -> bool:
    return bool(params) and all(isinstance(v, dict) for v in params.values())


def _param_dicts(params: dict[str, Any]) -> list[dict[str, Any]]:
    return list(params.values()) if _is_per_layer_type(params) else [params]
