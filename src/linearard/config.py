"""`RestoreConfig`: every setting of a restore run, with the help text the CLI and docs are built from.

A run's settings come from four layers, each overriding the one before:

1. the defaults below (they are the zero-argument demo: SmolLM2-135M, linear PI x4, a CPU-sized budget);
2. a YAML file (``--config FILE`` or the name of a packaged one, e.g. ``--config paper``);
3. generic ``--set key=value`` overrides;
4. explicit flags (``--seq-len 1024``).

The three RoPE settings (type, factor, target length) travel together: a layer that sets any of them
replaces all three of the layers below, so ``--target-length 32768`` alone means "YaRN to 32K" and is
not mixed with the demo's linear x4.

Example:
    >>> cfg = build_config(sets=["lr=2e-4"], flags={"seq_len": 1024})
    >>> cfg.lr, cfg.seq_len, cfg.lora_rank
    (0.0002, 1024, 128)
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.resources
import math
import re
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from linearard.errors import UserError
from linearard.models.adapters import ADAPTER_MODES
from linearard.models.rope import ROPE_TYPES

if TYPE_CHECKING:
    from linearard.objectives.spec import ObjectiveSpec

STRATEGIES = ("none", "ddp", "fsdp")
REDUCE_DTYPES = ("fp32", "bf16")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ROPE_KEYS = ("rope_type", "rope_factor", "target_length")

# LinearARD's training budget: 2.25M tokens of relation distillation, then 2M of next-token training.
PAPER_TOKENS = 4_250_000
PAPER_CPT_TOKENS = 2_000_000

# The order of the groups in `--help` and in saved YAML files.
GROUPS = ("model", "data", "objective", "adapters", "optimization", "stages", "run", "evaluation")


def _meta(help: str, group: str, **extra: Any) -> dict[str, Any]:
    """A field's help text and CLI group (plus optional ``choices``/``metavar``)."""
    return {"help": help, "group": group, **extra}


def _opt(default: Any, help: str, group: str, **extra: Any) -> Any:
    """A config field with an immutable default."""
    return field(default=default, metadata=_meta(help, group, **extra))


@dataclass
class RestoreConfig:
    """Settings of one `linearard restore` run (see each field's help)."""

    # -- model and RoPE
    model: str = _opt(
        "smollm2-135m",
        "model to extend: a Hugging Face folder (safetensors), a .gguf file, or the embedded 'smollm2-135m'",
        "model",
        metavar="PATH_OR_NAME",
    )
    rope_type: str | None = _opt(
        None,
        "RoPE scaling of the student; yarn when only a factor or target length is given, "
        "linear when no RoPE option is given at all",
        "model",
        choices=ROPE_TYPES,
    )
    rope_factor: float | None = _opt(
        None, "RoPE scaling factor (default: target length / native length, or 4)", "model", metavar="F"
    )
    target_length: int | None = _opt(
        None, "context length of the student (default: native length x factor)", "model", metavar="N"
    )
    # -- data
    data: list[str] = field(
        default_factory=list,
        metadata=_meta(
            "training text: files or folders of .txt/.md/.jsonl/.parquet, or built-in public-domain sources "
            "corpus:shakespeare (the default), corpus:milton, corpus:python-docs, corpus:kjv",
            "data",
            metavar="PATH",
        ),
    )
    seq_len: int = _opt(256, "tokens per training block of the restore stage (short texts)", "data", metavar="N")
    max_tokens: int = _opt(
        40_000,
        f"training-token budget of the whole run, all stages together (e.g. {PAPER_TOKENS / 1e6:g}M, the paper's)",
        "data",
        metavar="N",
    )
    tokens_per_step: int | None = _opt(
        None,
        "training tokens per optimizer step, all processes together (default: 32Ki on a GPU, "
        "--batch-size x --grad-accum blocks elsewhere, one block when neither is given)",
        "data",
        metavar="N",
    )
    batch_size: int | None = _opt(
        None,
        "blocks per micro-batch on each process (default: as many of a step's blocks as the memory estimate fits)",
        "data",
        metavar="N",
    )
    shuffle_buffer: int = _opt(
        1024, "blocks held for shuffling the stream (0 = corpus order)", "data", metavar="N"
    )
    grad_accum: int | None = _opt(
        None, "micro-batches accumulated per optimizer step (default: a step's blocks / --batch-size)", "data",
        metavar="N",
    )
    # -- objective
    objective: str = _opt(
        "ard",
        "training objective: ard, cpt, logits, hidden, attention, or a '+' combination (e.g. ard+cpt)",
        "objective",
        metavar="SPEC",
    )
    weights: dict[str, float] = field(
        default_factory=dict,
        metadata=_meta(
            "weight of each objective in a combination, e.g. ard=1 cpt=0.1 (default 1 each; relations take "
            "theirs from --relations)",
            "objective",
            metavar="NAME=W",
        ),
    )
    relations: dict[str, float] = field(
        default_factory=dict,
        metadata=_meta(
            "relations distilled by ard and their weights, e.g. q=1 k=1 v=0.5; a relation left out is not "
            "distilled (default q, k and v, weight 1)",
            "objective",
            metavar="R=W",
        ),
    )
    layers: str | None = _opt(
        None,
        "decoder layers that ard, attention and hidden distil: all, every-other, or indices and ranges such as "
        "0-11,-1 (default: every layer; for hidden four layers spread over the depth)",
        "objective",
        metavar="SPEC",
    )
    objective_options: dict[str, dict[str, Any]] = field(
        default_factory=dict,
        metadata=_meta(
            "further objective settings as OBJECTIVE.OPTION=VALUE, "
            "e.g. ard.kv_norm=query_heads or logits.temperature=2 (relations and layers: --relations, --layers)",
            "objective",
            metavar="OBJ.KEY=VALUE",
        ),
    )
    # -- adapters
    adapter: str = _opt(
        "lora", "trainable part: LoRA on q/k/v, dense (full q/k/v), or full (every decoder linear layer)",
        "adapters", choices=ADAPTER_MODES,
    )
    lora_rank: int = _opt(128, "LoRA rank", "adapters", metavar="R")
    lora_alpha: float = _opt(256.0, "LoRA alpha (the update is scaled by alpha / rank)", "adapters", metavar="A")
    lora_dropout: float = _opt(0.0, "LoRA dropout", "adapters", metavar="P")
    # -- optimization
    lr: float = _opt(1e-3, "peak learning rate (AdamW)", "optimization", metavar="LR")
    warmup_steps: int = _opt(10, "linear warm-up steps", "optimization", metavar="N")
    min_lr_ratio: float = _opt(0.1, "cosine decay ends at lr x this ratio", "optimization", metavar="R")
    weight_decay: float = _opt(0.0, "AdamW weight decay", "optimization", metavar="W")
    clip: float = _opt(1.0, "gradient-norm clipping (0 = off)", "optimization", metavar="NORM")
    precision: str = _opt(
        "auto", "auto = bf16 autocast on CUDA, fp32 on CPU", "optimization", choices=PRECISIONS
    )
    gradient_checkpointing: bool = _opt(
        False, "recompute each decoder layer in the backward pass (less memory, about a third slower)", "optimization"
    )
    recompute_teacher: bool | None = _opt(
        None,
        "with gradient checkpointing, keep of the teacher forward only each distilled layer's attention input and "
        "recompute the teacher's Q/K/V in the student's layers (less memory, slower where the host is the limit; "
        "default: when keeping them would not fit one block)",
        "optimization",
    )
    compile: bool | None = _opt(
        None,
        "compile each decoder layer with torch.compile (default: on for CUDA, off on the CPU)",
        "optimization",
    )
    cuda_graphs: bool | None = _opt(
        None,
        "after a few eager steps, replay each optimizer step from one recorded CUDA graph (default: on for one "
        "process on CUDA without gradient checkpointing; with --strategy ddp when asked for)",
        "optimization",
    )
    seed: int = _opt(0, "random seed (model init of adapters, data order)", "optimization", metavar="N")
    # -- stages
    cpt_tokens: int = _opt(
        0,
        "tokens of a second, next-token stage on long blocks after the restore stage (part of --max-tokens)",
        "stages",
        metavar="N",
    )
    cpt_seq_len: int | None = _opt(
        None, "block length of the next-token stage (default: the target length)", "stages", metavar="N"
    )
    # -- run
    output: str = _opt("linearard-restore", "output folder: checkpoints, logs, exported model", "run", metavar="DIR")
    save_every: int = _opt(50, "write a checkpoint every N optimizer steps (0 = only at the end)", "run", metavar="N")
    keep_checkpoints: int = _opt(2, "checkpoints kept (oldest deleted first)", "run", metavar="K")
    resume: bool = _opt(False, "continue from the newest intact checkpoint in --output", "run")
    overwrite: bool = _opt(
        False, "start over in an --output that holds an earlier run (only a folder linearard restore wrote)", "run"
    )
    dry_run: bool = _opt(False, "print the resolved plan and a peak-memory estimate, train nothing", "run")
    strategy: str = _opt(
        "none", "multi-process training under torchrun: ddp or fsdp (FSDP2)", "run", choices=STRATEGIES
    )
    reduce_dtype: str = _opt(
        "fp32",
        "precision of the gradient reduction between processes under ddp/fsdp: fp32, or bf16 (half the bytes "
        "on a slow link; each process's gradients are rounded to bf16 before they are averaged)",
        "run",
        choices=REDUCE_DTYPES,
    )
    device: str = _opt("auto", "where to train (auto = CUDA when available)", "run", choices=DEVICES)
    export: bool = _opt(True, "write the merged model and the adapters to OUTPUT/model at the end", "run")
    log_every: int = _opt(1, "write metrics every N optimizer steps", "run", metavar="N")
    # -- evaluation
    eval: bool = _opt(
        True, "perplexity of teacher, scaled student and restored student on held-out text at the end", "evaluation"
    )
    eval_tokens: int = _opt(4096, "held-out tokens for that perplexity", "evaluation", metavar="N")
    eval_seq_len: int | None = _opt(None, "window of that perplexity (default: --seq-len)", "evaluation", metavar="N")

    def validate(self) -> RestoreConfig:
        """Check values that need no model; raises `UserError` naming the flag. Returns self."""
        for name in ("seq_len", "max_tokens", "lora_rank", "keep_checkpoints", "log_every", "eval_tokens"):
            if getattr(self, name) < 1:
                raise UserError(f"{_flag(name)} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "save_every", "cpt_tokens", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise UserError(f"{_flag(name)} must not be negative, got {getattr(self, name)}")
        for name in ("cpt_seq_len", "eval_seq_len", "target_length", "tokens_per_step", "batch_size", "grad_accum"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{_flag(name)} must be at least 1, got {value}")
        for name in ("lr", "lora_alpha"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{_flag(name)} must be a positive number, got {value}")
        for name in ("weight_decay", "clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise UserError(f"{_flag(name)} must be a number >= 0, got {value}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise UserError(f"--min-lr-ratio must be between 0 and 1, got {self.min_lr_ratio}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.cpt_tokens >= self.max_tokens:
            raise UserError(
                f"--cpt-tokens ({self.cpt_tokens}) must be below --max-tokens ({self.max_tokens}), "
                "which is the budget of both stages together"
            )
        for name in ("rope_type", "adapter", "strategy", "reduce_dtype", "precision", "device"):
            choices = _FIELDS[name].metadata["choices"]
            value = getattr(self, name)
            if value is not None and value not in choices:
                raise UserError(f"{_flag(name)}: unknown value {value!r}; choose one of {', '.join(choices)}")
        if self.reduce_dtype != "fp32" and self.strategy == "none":
            raise UserError("--reduce-dtype sets how processes average their gradients: it needs --strategy ddp or "
                            "fsdp under torchrun")
        if self.recompute_teacher and not self.gradient_checkpointing:
            raise UserError("--recompute-teacher needs --gradient-checkpointing: without it the student's layers "
                            "keep the recomputed Q/K/V for backward, and nothing is saved")
        if self.cuda_graphs and self.gradient_checkpointing:
            raise UserError("--cuda-graphs and --gradient-checkpointing do not go together: choose one")
        if self.cuda_graphs and self.strategy == "fsdp":
            raise UserError("--cuda-graphs does not record FSDP's steps: leave it off with --strategy fsdp, or use "
                            "--strategy ddp")
        if self.resume and self.overwrite:
            raise UserError("--resume continues the run in --output and --overwrite starts it over: give one")
        self.objective_spec()
        return self

    def trains_in_bf16(self, device: str) -> bool:
        """Whether a run on `device` ('cuda' or 'cpu') computes in bf16 autocast (--precision)."""
        return self.precision == "bf16" or (self.precision == "auto" and device == "cuda")

    def compiles(self, device: str) -> bool:
        """Whether a run on `device` compiles its decoder layers (--compile; by default on CUDA)."""
        return device == "cuda" if self.compile is None else self.compile

    def replays_graphs(self, device: str) -> bool:
        """Whether a run on `device` replays its steps from a CUDA graph (--cuda-graphs; by default on CUDA
        for one process, no --strategy, without gradient checkpointing; under DDP only when asked for).

        Raises:
            UserError: --cuda-graphs asked for on a device that is not CUDA.
        """
        if self.cuda_graphs is None:
            return device == "cuda" and self.strategy == "none" and not self.gradient_checkpointing
        if self.cuda_graphs and device != "cuda":
            raise UserError("--cuda-graphs needs a CUDA device")
        return self.cuda_graphs

    def objective_spec(self) -> ObjectiveSpec:
        """The restore stage's objective as a validated spec: what the loop, the plan, the
        data-parallel wrapping and the study ask (`linearard.objectives.spec`).

        Raises:
            UserError: an unknown objective, weight, relation, layer choice or option.
        """
        from linearard.objectives.spec import ObjectiveSpec

        return ObjectiveSpec.parse(
            self.objective,
            weights=self.weights,
            relations=self.relations or None,
            layers=self.layers,
            options=self.objective_options,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as YAML, one commented group after another (readable, and loadable with --config)."""
        lines = ["# linearard restore configuration"]
        values = self.to_dict()
        for group in GROUPS:
            lines.append(f"\n# -- {group}")
            for f in dataclasses.fields(self):
                if f.metadata["group"] == group:
                    dumped = yaml.safe_dump({f.name: values[f.name]}, default_flow_style=True, width=10**6)
                    lines.append(f"# {f.metadata['help']}")
                    lines.append(dumped.strip().removeprefix("{").removesuffix("}"))
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


_FIELDS = {f.name: f for f in dataclasses.fields(RestoreConfig)}
_TYPES = typing.get_type_hints(RestoreConfig)


def field_type(name: str) -> type:
    """The value type of a field, without ``| None`` (``list``/``dict`` for the container fields)."""
    hint = _TYPES[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def field_names() -> list[str]:
    return list(_FIELDS)


def fields_in_group(group: str) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(RestoreConfig) if f.metadata["group"] == group]


def build_config(
    yaml_source: str | Path | None = None,
    sets: Iterable[str] = (),
    flags: Mapping[str, Any] | None = None,
) -> RestoreConfig:
    """Merge defaults < YAML file < ``--set key=value`` < explicit flags into a validated config.

    Args:
        yaml_source: a YAML file, or the name of a packaged config (``default``, ``paper``).
        sets: ``key=value`` strings; values are parsed as YAML scalars, keys are field names.
        flags: field name -> value for the flags given on the command line (already typed).
    """
    layers: list[dict[str, Any]] = []
    if yaml_source is not None:
        layers.append(_coerce_all(load_yaml(yaml_source), origin=str(yaml_source)))
    parsed_sets: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep:
            raise UserError(f"--set expects KEY=VALUE, got {item!r}")
        parsed_sets[_known_key(key.strip(), origin="--set")] = _yaml_value(raw, f"--set {item}")
    layers.append(_coerce_all(parsed_sets, origin="--set"))
    layers.append(_coerce_all(dict(flags or {}), origin="the command line"))

    values = RestoreConfig().to_dict()
    for layer in layers:
        if any(k in layer for k in ROPE_KEYS):
            values.update(dict.fromkeys(ROPE_KEYS))
        values.update(layer)
    return RestoreConfig(**values).validate()


def load_yaml(source: str | Path) -> dict[str, Any]:
    """Read a YAML config: a path, or the name of one shipped in ``linearard/configs``."""
    path = Path(source)
    if not path.exists() and path.suffix == "" and "/" not in str(source):
        packaged = importlib.resources.files("linearard") / "configs" / f"{source}.yaml"
        if packaged.is_file():
            return _parse_yaml(packaged.read_text(), str(source))
        names = sorted(p.name.removesuffix(".yaml") for p in packaged_configs())
        raise UserError(f"config {source!r} is neither a file nor a packaged config ({', '.join(names)})")
    try:
        text = path.read_text()
    except OSError as err:
        raise UserError(f"cannot read config {str(path)!r}: {err.strerror or err}") from None
    return _parse_yaml(text, str(path))


def packaged_configs() -> list[Any]:
    folder = importlib.resources.files("linearard") / "configs"
    return sorted((p for p in folder.iterdir() if p.name.endswith(".yaml")), key=lambda p: p.name)


def _parse_yaml(text: str, origin: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"{origin} is not valid YAML: {str(err).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{origin} must be a mapping of setting: value")
    return {_known_key(str(k), origin): v for k, v in data.items()}


def _known_key(key: str, origin: str) -> str:
    name = key.replace("-", "_")
    if name not in _FIELDS:
        close = difflib.get_close_matches(name, _FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise UserError(f"unknown setting {key!r} in {origin}{hint}")
    return name


def _coerce_all(values: dict[str, Any], origin: str) -> dict[str, Any]:
    return {name: coerce(name, value, origin) for name, value in values.items()}


def coerce(name: str, value: Any, origin: str = "the config") -> Any:
    """Convert `value` (from YAML, ``--set`` or argparse) to the type of field `name`."""
    kind = field_type(name)
    optional = _FIELDS[name].default is None
    if value is None:
        if optional:
            return None
        raise UserError(f"{name} in {origin} needs a value")
    try:
        if kind is bool:
            return _to_bool(value)
        if kind is int:
            return parse_count(value)
        if kind is float:
            if isinstance(value, bool):
                raise ValueError
            return parse_float(value)
        if name == "layers" and isinstance(value, (list, tuple)):
            return ",".join(str(int(v)) for v in value)
        if kind is list:
            items = [value] if isinstance(value, str) else list(value)
            return [str(v) for v in items]
        if kind is dict:
            return parse_options(value) if name == "objective_options" else parse_weights(value)
        return str(value)
    except (TypeError, ValueError) as err:
        detail = f": {err}" if str(err) else ""
        raise UserError(f"{name} in {origin}: cannot read {value!r} as {kind.__name__}{detail}") from None


_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "ki": 2**10, "mi": 2**20, "gi": 2**30}


def parse_count(value: Any) -> int:
    """An integer, with an optional unit: ``4.25M`` = 4,250,000, ``32Ki`` = 32,768, ``40_000``."""
    if isinstance(value, bool):
        raise ValueError("expected a number")
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError("expected a whole number")
        return int(value)
    match = re.fullmatch(r"\s*(-?[0-9][0-9_]*(?:\.[0-9]+)?)\s*([kKmMgG]i?)?\s*", str(value))
    if not match:
        raise ValueError("expected a whole number such as 40000, 40k, 4.25M or 32Ki")
    number = float(match.group(1).replace("_", "")) * _SUFFIX[(match.group(2) or "").lower()]
    if not number.is_integer():
        raise ValueError("expected a whole number")
    return int(number)


def parse_counts(text: str, minimum: int = 1) -> list[int]:
    """Comma-separated counts, each as `parse_count` reads it: ``"256,1K,32Ki"`` -> ``[256, 1000, 32768]``.

    The argparse type of every flag that lists lengths.

    Raises:
        argparse.ArgumentTypeError: a part that is no whole number, or one below `minimum`.
    """
    import argparse

    try:
        values = [parse_count(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 4096,8K, got {text!r}") from None
    if not values or min(values) < minimum:
        raise argparse.ArgumentTypeError(f"expected numbers of at least {minimum}, got {text!r}")
    return values


def parse_lengths(text: str) -> list[int]:
    """Sequence lengths for evaluation flags: `parse_counts` of at least 2 tokens."""
    return parse_counts(text, minimum=2)


def parse_float(value: Any) -> float:
    return float(str(value).replace("_", "")) if isinstance(value, str) else float(value)


def parse_weights(value: Any) -> dict[str, float]:
    """``{"q": 1, "v": 0.5}``, ``"q=1,v=0.5"`` or ``["q=1", "v=0.5"]`` -> ``{"q": 1.0, "v": 0.5}``."""
    if isinstance(value, Mapping):
        return {str(k): parse_float(v) for k, v in value.items()}
    items = value if isinstance(value, str) else " ".join(map(str, value))
    out: dict[str, float] = {}
    items = items.replace(",", " ").split()
    for item in items:
        key, sep, raw = str(item).partition("=")
        if not sep or not key:
            raise ValueError(f"expected NAME=WEIGHT, got {item!r}")
        out[key.strip()] = parse_float(raw)
    return out


def parse_options(value: Any) -> dict[str, dict[str, Any]]:
    """``{"ard": {"kv_norm": "query_heads"}}`` or ``["ard.kv_norm=query_heads", ...]`` -> the mapping.

    Values given as text are read as YAML scalars (``2`` -> 2, ``true`` -> True).
    """
    if isinstance(value, Mapping):
        out = {}
        for objective, options in value.items():
            if not isinstance(options, Mapping):
                raise ValueError(f"expected a mapping of options under {objective!r}")
            out[str(objective)] = {str(k): v for k, v in options.items()}
        return out
    items = value.split() if isinstance(value, str) else list(value)
    nested: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = str(item).partition("=")
        objective, dot, option = key.strip().partition(".")
        if not sep or not dot or not objective or not option:
            raise ValueError(f"expected OBJECTIVE.OPTION=VALUE, got {item!r}")
        nested.setdefault(objective, {})[option] = _yaml_value(raw, item)
    return nested


def _yaml_value(text: str, where: str) -> Any:
    """A YAML scalar or flow value (``2e-4``, ``[a, b]``); None for an empty string."""
    if not text.strip():
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise UserError(f"{where}: {text!r} is not a valid value ({problem})") from None


def _to_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")
