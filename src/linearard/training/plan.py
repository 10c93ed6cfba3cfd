"""The resolved plan of a restore run: model shape, RoPE native -> target, data, stages, and an
estimate of peak memory. `--dry-run` prints it; a real run prints it before training.

The memory estimate is arithmetic on the model's shape, not a measurement. Per process it adds:

- frozen weights (sharded over processes under FSDP, plus two gathered layers);
- trainable adapters with their gradients and AdamW moments (fp32: 16 bytes per parameter);
- the student forward's saved activations for one micro-batch: per layer and token about
  ``6·hidden + 3·(q + 2·kv widths) + 4·intermediate`` values without gradient checkpointing (sdpa-style
  attention, no T×T map), or one layer input per layer plus one recomputed layer with it;
- what the objective's terms keep between the forwards, as its `ObjectiveSpec` counts it: the teacher's
  captured Q/K/V of every distilled layer (relation/attention distillation, kept until the backward
  pass), or, where the plan recomputes them (under gradient checkpointing, when keeping them would not
  fit one block, or `--recompute-teacher`), each distilled layer's attention input; the teacher's
  hidden states (hidden-state distillation); one chunk of fp32 logits (next-token and logit objectives
  apply the LM head in chunks).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearard.config import RestoreConfig
from linearard.errors import UserError
from linearard.models.rope import RopeScaling
from linearard.objectives.spec import ObjectiveSpec

DEMO_ROPE = ("linear", 4.0)
# The default optimizer step on a GPU: the paper's 4.25M tokens in 129 steps.
GPU_TOKENS_PER_STEP = 32768


@dataclass
class Stage:
    """One training stage: an objective on blocks of one length for a number of optimizer steps."""

    name: str
    objective: ObjectiveSpec
    seq_len: int
    steps: int
    tokens_per_step: int
    batch_size: int  # blocks per micro-batch on each process
    grad_accum: int  # micro-batches per optimizer step
    # the teacher's Q/K/V recomputed in the student's checkpointed layers (`TeacherStudent`)
    recompute_teacher: bool = False

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


@dataclass
class ModelShape:
    """What the plan needs to know about the model (read from its config and parameters)."""

    architecture: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    parameters: int
    trainable: int
    dtype: torch.dtype
    adapters: tuple[str, ...] = ()  # the names of the trainable parameters

    @classmethod
    def of(cls, model: torch.nn.Module, config: Any) -> ModelShape:
        heads = config.num_attention_heads
        params = list(model.parameters())
        base = next((p for p in params if not p.requires_grad), params[0])
        return cls(
            architecture=(getattr(config, "architectures", None) or [type(model).__name__])[0],
            num_layers=config.num_hidden_layers,
            hidden_size=config.hidden_size,
            intermediate_size=getattr(config, "intermediate_size", 4 * config.hidden_size),
            num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
            head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
            vocab_size=config.vocab_size,
            parameters=sum(p.numel() for p in params if not p.requires_grad),
            trainable=sum(p.numel() for p in params if p.requires_grad),
            dtype=base.dtype,
            adapters=tuple(name for name, p in model.named_parameters() if p.requires_grad),
        )


@dataclass
class MemoryEstimate:
    """Estimated bytes per process, by part; ``peak`` is their sum for the heaviest stage."""

    parts: dict[str, int] = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return sum(self.parts.values())


@dataclass
class Plan:
    """Everything a run will do, resolved against the model and the data."""

    config: RestoreConfig
    model: ModelShape
    scaling: RopeScaling
    data_files: list[Path]
    corpus_tokens: int | None
    stages: list[Stage]
    world_size: int
    device: str
    bf16: bool
    memory: MemoryEstimate
    graphs: bool = field(init=False)  # steps replayed from a CUDA graph

    def __post_init__(self) -> None:
        self.graphs = self.config.replays_graphs(self.device_type)
        if not (self.graphs and self.config.strategy == "ddp"):
            return
        for stage in self.stages:  # DDP's search for unused parameters reads the device: no recording
            if names := self.untrained(stage):
                raise UserError(
                    f"--cuda-graphs with --strategy ddp needs every adapter trained in every stage, and the "
                    f"{stage.name} stage's objective reaches {len(self.model.adapters) - len(names)} of "
                    f"{len(self.model.adapters)} adapter tensors (not {names[0]}, ...): leave --cuda-graphs off"
                )

    @property
    def device_type(self) -> str:
        """``cuda`` or ``cpu`` (`device` names the process's own GPU under torchrun: ``cuda:1``)."""
        return torch.device(self.device).type

    @property
    def total_tokens(self) -> int:
        return sum(s.tokens for s in self.stages)

    def untrained(self, stage: Stage) -> list[str]:
        """The trainable parameters that `stage`'s objective cannot give a gradient."""
        n = self.model.num_layers
        return [name for name in self.model.adapters if not stage.objective.reaches(name, n)]

    def describe(self) -> str:
        """The plan as the human-readable block `--dry-run` prints."""
        c, m, s = self.config, self.model, self.scaling
        lines = [
            "linearard restore plan",
            f"  model      {c.model}: {m.architecture}, {m.num_layers} layers, hidden {m.hidden_size}, "
            f"{m.num_heads} query / {m.num_kv_heads} KV heads of {m.head_dim}, {_count(m.parameters)} parameters "
            f"({str(m.dtype).removeprefix('torch.')})",
            f"  rope       {s.describe()}",
            f"  adapters   {_adapter_text(c)}: {_count(m.trainable)} trainable parameters",
            f"  data       {len(self.data_files)} file(s), "
            + (f"~{_count(self.corpus_tokens)} tokens" if self.corpus_tokens is not None else "size unknown")
            + ("" if c.data else " (built-in public-domain corpus)"),
            f"  processes  {self.world_size} ({c.strategy}) on {self.device}, "
            f"{'bf16 autocast' if self.bf16 else 'fp32'}"
            + (", gradient checkpointing" if c.gradient_checkpointing else "")
            + (", compiled layers" if c.compiles(self.device_type) else "")
            + (", steps replayed from a CUDA graph" if self.graphs else ""),
            f"  optimizer  AdamW lr {c.lr:g}, {c.warmup_steps} warm-up steps, cosine to x{c.min_lr_ratio:g}, "
            f"weight decay {c.weight_decay:g}, clip {c.clip:g}",
            "  stages",
        ]
        for i, st in enumerate(self.stages, 1):
            lines.append(
                f"    {i}. {st.name:<8} {st.objective.name:<10} blocks of {st.seq_len} tokens, {st.steps} steps x "
                f"{st.tokens_per_step} tokens = {_count(st.tokens)} tokens "
                f"({st.batch_size} block(s) per micro-batch x {st.grad_accum} per step"
                + (f" x {self.world_size} processes)" if self.world_size > 1 else ")")
                + (", teacher's Q/K/V recomputed in the student's layers" if st.recompute_teacher else "")
            )
        budget = f"  tokens     {_count(self.total_tokens)} in all (budget {_count(c.max_tokens)})"
        if self.corpus_tokens:
            budget += f", {self.stages[0].tokens / self.corpus_tokens:.2f} passes over the corpus"
        lines.append(budget)
        lines.append(f"  memory     ~{_bytes(self.memory.peak)} peak per process (estimate):")
        lines.extend(f"    {name:<34} {_bytes(size)}" for name, size in self.memory.parts.items())
        lines.append(f"  output     {c.output}")
        return "\n".join(lines)


def resolve_scaling(config: RestoreConfig, model_config: Any) -> RopeScaling:
    """The student's RoPE: as given, or linear x4 (the demo) when no RoPE option is set at all."""
    rope_type, factor, target = config.rope_type, config.rope_factor, config.target_length
    if rope_type is None and factor is None and target is None:
        rope_type, factor = DEMO_ROPE
    elif factor is None and target is None:
        factor = DEMO_ROPE[1]
    return RopeScaling.resolve(model_config, rope_type, factor, target)


def plan_stages(
    config: RestoreConfig,
    scaling: RopeScaling,
    shape: ModelShape | None,
    *,
    world_size: int,
    device: str,
    bf16: bool,
) -> list[Stage]:
    """Split the token budget into the restore stage and the optional next-token stage, and each
    stage's optimizer step into micro-batches.

    Every stage takes the same number of tokens per optimizer step, whatever its block length: a
    step of 32K tokens is 32 blocks of 1K or one block of 32K. Blocks that the memory estimate does
    not fit into one micro-batch are accumulated.

    Without a `shape` (planning before any model is read) a step's blocks are one micro-batch.

    Raises:
        UserError: a block length above the student's length, a budget too small for one step, or
            batch settings that contradict ``tokens_per_step``.
    """
    _check_length("--seq-len", config.seq_len, scaling)
    distils = any(term.name != "cpt" for term in config.objective_spec().active)  # reads the teacher
    if distils and config.seq_len > scaling.original_length:
        raise UserError(
            f"--seq-len {config.seq_len} is above the model's native context of {scaling.original_length} tokens: "
            "distillation trains on short texts, which the native-RoPE teacher must cover "
            "(long blocks belong to the next-token stage: --cpt-tokens, --cpt-seq-len)"
        )
    step_tokens = tokens_per_step(config, world_size, device)
    lengths = [("restore", config.objective_spec(), config.seq_len, config.max_tokens - config.cpt_tokens)]
    if config.cpt_tokens:
        cpt_len = config.cpt_seq_len or scaling.target_length
        _check_length("--cpt-seq-len", cpt_len, scaling)
        lengths.append(("cpt", ObjectiveSpec.single("cpt"), cpt_len, config.cpt_tokens))
    room = None if shape is None else _memory_budget(device) - _fixed_memory(config, shape, world_size)
    return [
        _fitted_stage(config, shape, name, objective, seq_len, budget, step_tokens, world_size, bf16, room)
        for name, objective, seq_len, budget in lengths
    ]


def _fitted_stage(
    config: RestoreConfig,
    shape: ModelShape | None,
    name: str,
    objective: ObjectiveSpec,
    seq_len: int,
    budget: int,
    step_tokens: int,
    world_size: int,
    bf16: bool,
    room: int | None,
) -> Stage:
    """One stage: whether it recomputes the teacher, and its micro-batches as many blocks as the memory
    estimate fits in the `room` the fixed parts leave (None: no shape to estimate from)."""

    def stage_bytes(batch: int, recompute: bool) -> int:
        return sum(_stage_memory(config, shape, objective, seq_len, batch, bf16, recompute).values())

    recompute = _recomputes_teacher(config, shape, objective, stage_bytes, room)

    def fits(batch: int) -> bool:
        return room is None or stage_bytes(batch, recompute) <= room

    batch, accum = _micro_batches(config, step_tokens, seq_len, world_size, fits)
    return _stage(name, objective, seq_len, budget, batch, accum, world_size, recompute)


def _recomputes_teacher(
    config: RestoreConfig, shape: ModelShape | None, objective: ObjectiveSpec, stage_bytes: Any, room: int | None
) -> bool:
    """Whether a stage's student layers recompute the teacher's Q/K/V (`TeacherStudent`): as
    --recompute-teacher says, or by default under gradient checkpointing where keeping them would not fit
    one block in the `room` the fixed parts leave and recomputing needs less (a shallow model keeps
    little more than one layer's worth either way). Recomputing costs host time, so it is not the
    default where they fit. `stage_bytes(batch, recompute)`: one micro-batch's estimate."""
    if shape is None or not objective.reads(shape.num_layers).attention:
        return False
    if config.recompute_teacher is not None:
        return config.recompute_teacher
    if not config.gradient_checkpointing:
        return False
    kept = stage_bytes(1, False)
    return kept > room and stage_bytes(1, True) < kept


def tokens_per_step(config: RestoreConfig, world_size: int, device: str) -> int:
    """The optimizer step's token count asked for: given, implied by the batch settings, or the default."""
    if config.tokens_per_step:
        return config.tokens_per_step
    if device.startswith("cuda") and config.batch_size is None and config.grad_accum is None:
        return GPU_TOKENS_PER_STEP
    return config.seq_len * (config.batch_size or 1) * (config.grad_accum or 1) * world_size


def _micro_batches(
    config: RestoreConfig, step_tokens: int, seq_len: int, world_size: int, fits: Any
) -> tuple[int, int]:
    """(blocks per micro-batch, micro-batches per step) on each process for one stage."""
    blocks = max(1, step_tokens // (seq_len * world_size))
    batch, accum = config.batch_size, config.grad_accum
    if batch and accum:
        if config.tokens_per_step and batch * accum * seq_len * world_size != config.tokens_per_step:
            raise UserError(
                f"--tokens-per-step {config.tokens_per_step} contradicts --batch-size {batch} x --grad-accum "
                f"{accum} x {seq_len}-token blocks x {world_size} process(es); give the token count or the two "
                "batch settings"
            )
        return batch, accum
    if batch:
        return batch, math.ceil(blocks / batch)
    if accum:
        return math.ceil(blocks / accum), accum
    batch = blocks
    while batch > 1 and not fits(batch):
        batch = math.ceil(batch / 2)
    accum = math.ceil(blocks / batch)
    return math.ceil(blocks / accum), accum


def _memory_budget(device: str) -> int:
    """Bytes a micro-batch may fill: 80% of this process's share of the GPU (the estimate leaves out the
    allocator's slack; the share is `torch.cuda.set_per_process_memory_fraction`'s, 1 unless set), or
    half of the host's memory on the CPU."""
    if device.startswith("cuda") and torch.cuda.is_available():
        gpu = torch.device(device)
        gpu = gpu if gpu.index is not None else torch.device("cuda", torch.cuda.current_device())
        share = torch.cuda.get_per_process_memory_fraction(gpu)
        return int(0.8 * share * torch.cuda.get_device_properties(gpu).total_memory)
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 2**30


def _stage(
    name: str,
    objective: ObjectiveSpec,
    seq_len: int,
    budget: int,
    batch: int,
    accum: int,
    world_size: int,
    recompute_teacher: bool,
) -> Stage:
    per_step = seq_len * batch * accum * world_size
    steps = budget // per_step
    if steps < 1:
        raise UserError(
            f"the {name} stage's budget of {budget} tokens is less than one optimizer step of {per_step} tokens "
            f"({batch} x {accum} blocks of {seq_len} x {world_size} process(es)); lower --tokens-per-step"
        )
    return Stage(name, objective, seq_len, steps, per_step, batch, accum, recompute_teacher)


def _check_length(flag: str, length: int, scaling: RopeScaling) -> None:
    if length > scaling.target_length:
        raise UserError(
            f"{flag} {length} is above the student's context length {scaling.target_length}"
        )


def estimate_memory(
    config: RestoreConfig, shape: ModelShape, stages: list[Stage], *, world_size: int, bf16: bool
) -> MemoryEstimate:
    """Peak bytes per process (see the module docstring for what is counted)."""
    parts = _fixed_parts(config, shape, world_size)
    worst: dict[str, int] = {}
    for stage in stages:
        stage_parts = _stage_memory(
            config, shape, stage.objective, stage.seq_len, stage.batch_size, bf16, stage.recompute_teacher
        )
        stage_parts = {(f"{k} ({stage.name})" if k == "activations" else k): v for k, v in stage_parts.items()}
        if sum(stage_parts.values()) > sum(worst.values()):
            worst = stage_parts
    parts.update(worst)
    return MemoryEstimate(parts)


def _fixed_parts(config: RestoreConfig, shape: ModelShape, world_size: int) -> dict[str, int]:
    fsdp = config.strategy == "fsdp"
    shards = world_size if fsdp else 1
    weight_bytes = shape.dtype.itemsize if shape.dtype.is_floating_point else 2
    parts = {"frozen weights": shape.parameters * weight_bytes // shards}
    if fsdp and world_size > 1:
        parts["gathered layers (FSDP)"] = 2 * shape.parameters // max(shape.num_layers, 1) * weight_bytes
    parts["adapters + grads + AdamW"] = shape.trainable * 16 // shards
    return parts


def _fixed_memory(config: RestoreConfig, shape: ModelShape, world_size: int) -> int:
    return sum(_fixed_parts(config, shape, world_size).values())


def _stage_memory(
    config: RestoreConfig,
    shape: ModelShape,
    objective: ObjectiveSpec,
    seq_len: int,
    batch: int,
    bf16: bool,
    recompute_teacher: bool,
) -> dict[str, int]:
    """Bytes of one micro-batch of `batch` blocks of `seq_len` tokens, by part."""
    act = 2 if bf16 else 4
    tokens = batch * seq_len
    q = shape.num_heads * shape.head_dim
    kv = shape.num_kv_heads * shape.head_dim
    per_layer_token = 6 * shape.hidden_size + 3 * (q + 2 * kv) + 4 * shape.intermediate_size
    layers = objective.reads(shape.num_layers).forward_layers(shape.num_layers)
    if config.gradient_checkpointing:
        activations = tokens * act * (layers * shape.hidden_size + per_layer_token)
    else:
        activations = tokens * act * layers * per_layer_token
    return {"activations": activations,
            **objective.memory(shape, tokens, act, recompute_teacher=recompute_teacher)}


def read_model_meta(spec: str) -> tuple[Any, Any, torch.dtype]:
    """``(config, tokenizer, dtype)`` of a model without loading its weights (for `--dry-run`).

    ``dtype`` is the dtype the checkpoint declares (float32 when it declares none).
    """
    from transformers import AutoConfig, AutoTokenizer

    from linearard.models.load import GGUF_ERRORS, gguf_error, resolve_path, split_spec

    base, suffix = split_spec(spec)
    if suffix is not None:
        raise UserError(f"give the native model to restore, without a RoPE suffix (got {spec!r})")
    path = resolve_path(base)
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"{path} is a file but not a .gguf model; give a model folder or a GGUF file")
        try:
            config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
            tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        except GGUF_ERRORS as err:
            raise UserError(gguf_error(path, err)) from None
        return config, tokenizer, torch.float32
    try:
        if not (path / "config.json").exists():
            raise UserError(f"{path} is not a transformers model folder (no config.json)")
        config = AutoConfig.from_pretrained(path)
        tokenizer = AutoTokenizer.from_pretrained(path)
        declared = json.loads((path / "config.json").read_text())
    except (ValueError, KeyError, OSError) as err:
        raise UserError(f"cannot read the model {spec!r}: {err}") from None
    name = declared.get("dtype") or declared.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name), torch.float32)
    return config, tokenizer, dtype if isinstance(dtype, torch.dtype) else torch.float32


def resolve_device(config: RestoreConfig) -> str:
    """``cuda`` or ``cpu``: where a run of `config` trains (``auto`` is CUDA when there is one)."""
    cuda = config.device == "cuda" or (config.device == "auto" and torch.cuda.is_available())
    return "cuda" if cuda else "cpu"


def dry_run_plan(config: RestoreConfig) -> Plan:
    """The plan of `config` without loading any weights: the model is built on the meta device."""
    from transformers import AutoModelForCausalLM

    from linearard.data import estimate_corpus_tokens, training_files
    from linearard.data.documents import check_text_encoding
    from linearard.export import check_exportable
    from linearard.models.adapters import add_adapters

    model_config, tokenizer, dtype = read_model_meta(config.model)
    if not getattr(model_config, "rope_parameters", None):
        raise UserError(f"{type(model_config).__name__} models have no RoPE to scale; unsupported architecture")
    scaling = resolve_scaling(config, model_config)
    check_exportable(model_config, scaling)
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if config.strategy != "none" else 1
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, dtype=dtype)
        model = add_adapters(
            model, config.adapter, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout
        )
    device = resolve_device(config)
    bf16 = config.trains_in_bf16(device)
    shape = ModelShape.of(model, model_config)
    shape.dtype = torch.bfloat16 if bf16 else torch.float32  # what a run loads the weights as
    stages = plan_stages(config, scaling, shape, world_size=world_size, device=device, bf16=bf16)
    files = training_files(config.data)
    if config.data:
        check_text_encoding(files)
    return Plan(
        config=config,
        model=shape,
        scaling=scaling,
        data_files=files,
        corpus_tokens=estimate_corpus_tokens(files, tokenizer),
        stages=stages,
        world_size=world_size,
        device=device,
        bf16=bf16,
        memory=estimate_memory(config, shape, stages, world_size=world_size, bf16=bf16),
    )


def _adapter_text(c: RestoreConfig) -> str:
    if c.adapter == "lora":
        return f"LoRA r{c.lora_rank} alpha {c.lora_alpha:g} on q/k/v"
    return {"dense": "dense q/k/v deltas", "full": "dense deltas on every decoder linear layer"}[c.adapter]


def _count(n: int | float | None) -> str:
    if n is None:
        return "?"
    for unit, size in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g}{unit}"
    return str(int(n))


def _bytes(n: int) -> str:
    if n <= 0:
        return "0 B"
    unit = min(int(math.log(n, 1024)), 4)
    return f"{n / 1024**unit:.3g} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"
