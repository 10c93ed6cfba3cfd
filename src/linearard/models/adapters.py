"""Trainable deltas on a frozen model, which can be switched off to recover the original weights.

Switching the deltas off is what makes the teacher free: the frozen base weights *are* the teacher,
so no second copy of the model is ever loaded.

Modes:
    ``lora``  — peft LoRA on the target projections (default q/k/v).
    ``dense`` — a full-rank trainable delta on each target projection (full q/k/v training).
    ``full``  — dense deltas on every linear layer of the decoder blocks.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from linearard.errors import UserError

ADAPTER_MODES = ("lora", "dense", "full")
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj")


class DeltaLinear(nn.Module):
    """``y = x (W + Δ)ᵀ + b`` with W frozen and Δ trainable (initialised to zero); Δ can be disabled."""

    def __init__(self, base: nn.Linear):
        super().__init__()
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.delta = nn.Parameter(torch.zeros_like(base.weight))
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return self.base(x)
        return F.linear(x, self.base.weight + self.delta.to(self.base.weight.dtype), self.base.bias)


def add_adapters(
    model: nn.Module,
    mode: str = "lora",
    *,
    rank: int = 128,
    alpha: float = 256.0,
    dropout: float = 0.0,
    targets: Sequence[str] = DEFAULT_TARGETS,
) -> nn.Module:
    """Freeze `model` and add trainable deltas; returns the model to train (a peft model for LoRA).

    The default targets q/k/v mean ``qkv_proj`` on models with a fused projection (Phi-3).

    Example:
        >>> model = add_adapters(model, "lora", rank=16, alpha=32)  # doctest: +SKIP
        >>> with AdapterSwitch(model).off():  # the original weights  # doctest: +SKIP
        ...     teacher_logits = model(ids).logits
    """
    if mode not in ADAPTER_MODES:
        raise UserError(f"unknown adapter mode {mode!r}; choose one of {', '.join(ADAPTER_MODES)}")
    for p in model.parameters():
        p.requires_grad_(False)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        targets = _check_targets(model, targets)
        config = LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets), bias="none"
        )
        with warnings.catch_warnings():
            # peft reads transformers' deprecated `is_gradient_checkpointing` itself; nothing to call differently.
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            return get_peft_model(model, config)
    if mode == "dense":
        targets = _check_targets(model, targets)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    else:
        layers = _decoder_layers(model)
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith(layers)]
    for name in names:
        parent, attr = _parent(model, name)
        setattr(parent, attr, DeltaLinear(getattr(parent, attr)))
    return model


class AdapterSwitch:
    """Turns a model's trainable deltas off inside `off()`, leaving the original (frozen) weights.

    The adapter layers are found once, here: the teacher pass switches them twice per training step,
    and walking the whole model (as peft's ``disable_adapter()`` does, with its status checks) costs
    more than a small model's forward on a GPU.

    Example:
        >>> adapters = AdapterSwitch(model)  # doctest: +SKIP
        >>> with adapters.off():  # doctest: +SKIP
        ...     teacher_logits = model(ids).logits
    """

    def __init__(self, model: nn.Module):
        self._deltas = [m for m in model.modules() if isinstance(m, DeltaLinear)]
        self._peft = [m for m in model.modules() if _is_peft_layer(m)]
        self._is_off = False

    @contextmanager
    def off(self) -> Iterator[None]:
        """Adapters off inside the block; nested blocks leave them off until the outermost one ends."""
        if self._is_off:
            yield
            return
        self._set(False)
        self._is_off = True
        try:
            yield
        finally:
            self._set(True)
            self._is_off = False

    def _set(self, enabled: bool) -> None:
        for m in self._deltas:
            m.enabled = enabled
        for m in self._peft:
            m.enable_adapters(enabled)


def _is_peft_layer(module: nn.Module) -> bool:
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return False
    return isinstance(module, BaseTunerLayer)


def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The weights of `model` with its deltas folded in, named as the plain transformers model names
    them, on the CPU and in `dtype`; `model` itself is left as it was.

    Each adapted weight is merged in fp32 on the CPU, one layer at a time (``W + scaling · B @ A`` for
    LoRA, as peft's ``merge_and_unload`` computes it; ``W + Δ`` for dense deltas), then cast to `dtype`.
    Every other floating-point tensor is cast to `dtype` on the CPU (other tensors keep theirs); a tensor
    the model shares under two names (a tied output embedding) is one tensor here too. So the only
    memory taken is one copy of the model in `dtype` on the CPU, and none on the model's device.

    Args:
        model: a model with adapters (`add_adapters`), or one inside a data-parallel or
            ``torch.compile`` wrapper.
        dtype: dtype of the floating-point tensors (default: that of the model's frozen weights).

    Returns:
        Name -> tensor, for ``load_state_dict`` of the model without adapters. Tensors already on the
        CPU in `dtype` are the model's own, not copies: read them, do not write them.

    Raises:
        UserError: the model is sharded over processes (FSDP: export a checkpoint instead), or it has an
            adapter kind other than plain LoRA on linear layers or dense deltas.

    Example:
        >>> plain = AutoModelForCausalLM.from_config(model.config)  # doctest: +SKIP
        >>> plain.load_state_dict(merged_state_dict(model, torch.bfloat16))  # doctest: +SKIP
    """
    model = transformers_model(model)
    if dtype is None:
        frozen = [p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()]
        dtype = frozen[0] if frozen else next(model.parameters()).dtype
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        _add_merged(model, "", dtype, out, {})
    return out


def unwrap(model: nn.Module) -> nn.Module:
    """`model` without its data-parallel (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    from torch.nn.parallel import DistributedDataParallel

    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under `model`'s wrappers (data-parallel, ``torch.compile``, peft's
    ``PeftModel``), its adapter layers in place."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _add_merged(
    module: nn.Module, prefix: str, dtype: torch.dtype, out: dict[str, torch.Tensor], done: dict[int, torch.Tensor]
) -> None:
    """Put `module`'s tensors into `out` as a state dict names them, adapter layers merged into one
    weight; `done` maps tensors already converted (by id) to their conversion, which keeps ties."""
    if isinstance(module, DeltaLinear) or _is_peft_layer(module):
        base = module.base if isinstance(module, DeltaLinear) else _lora_base(module)
        out[prefix + "weight"] = _merged_weight(module, base).to(dtype)
        if base.bias is not None:
            out[prefix + "bias"] = _converted(base.bias, dtype, done)
        return
    for name, param in module._parameters.items():
        if param is not None:
            out[prefix + name] = _converted(param, dtype, done)
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            out[prefix + name] = _converted(buffer, dtype, done)
    for name, child in module._modules.items():
        if child is not None:
            _add_merged(child, f"{prefix}{name}.", dtype, out, done)


def _converted(tensor: torch.Tensor, dtype: torch.dtype, done: dict[int, torch.Tensor]) -> torch.Tensor:
    if id(tensor) not in done:
        cpu = _on_cpu(tensor)
        done[id(tensor)] = cpu.to(dtype) if cpu.is_floating_point() else cpu
    return done[id(tensor)]


def _on_cpu(tensor: torch.Tensor) -> torch.Tensor:
    if hasattr(tensor, "full_tensor"):  # a DTensor: gathering it needs every process
        raise UserError(
            "a model sharded over processes (FSDP) cannot be merged by one process; export its checkpoint instead"
        )
    return tensor.detach().cpu()  # copied to the CPU before any cast: no temporary on the model's device


def _merged_weight(layer: nn.Module, base: nn.Linear) -> torch.Tensor:
    """The adapter layer's weight with its delta folded in, in fp32 on the CPU."""
    weight = _on_cpu(base.weight).float()
    if isinstance(layer, DeltaLinear):
        return weight + _on_cpu(layer.delta).float()
    for name in layer.active_adapters:
        if name not in layer.lora_A or name in layer.merged_adapters:  # merged ones are in the weight already
            continue
        a, b = (_on_cpu(m[name].weight).float() for m in (layer.lora_A, layer.lora_B))
        delta = b @ a
        weight = weight + (delta.T if layer.fan_in_fan_out else delta) * layer.scaling[name]
    return weight


def _lora_base(layer: nn.Module) -> nn.Linear:
    """The frozen linear layer under a peft LoRA layer, after checking that the LoRA is the plain kind."""
    from peft.tuners.lora import Linear as LoraLinear

    plain = isinstance(layer, LoraLinear) and not any(
        n in layer.lora_variant or layer.lora_bias.get(n) for n in layer.active_adapters
    )
    if not plain:
        raise UserError(f"cannot merge a {type(layer).__name__} adapter layer: only plain LoRA on linear layers")
    return layer.get_base_layer()


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors only, by name (what a checkpoint must keep)."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in adapter_subset(model, state).items():
            params[name].copy_(tensor)


def adapter_subset(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The trainable tensors of `state`, checked against `model`'s trainable parameters.

    Names of frozen tensors are dropped: linearard 0.1 saved a tied output embedding (the frozen
    input embedding under a second name) among the adapters.

    Raises:
        UserError: a trainable parameter is missing, or a name is not the model's at all.
    """
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n for n, _ in model.named_parameters(remove_duplicate=False)} - expected
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected - frozen)
    if missing or unexpected:
        raise UserError(
            f"checkpoint adapters do not match this model and adapter setting "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return {name: tensor for name, tensor in state.items() if name in expected}


def _check_targets(model: nn.Module, targets: Sequence[str]) -> Sequence[str]:
    found = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    if tuple(targets) == DEFAULT_TARGETS and "q_proj" not in found and "qkv_proj" in found:
        return ("qkv_proj",)  # fused projection (Phi-3)
    missing = [t for t in targets if t not in found]
    if missing:
        raise UserError(f"the model has no linear layers named {missing}; its projections are {sorted(found)}")
    return targets


def _decoder_layers(model: nn.Module) -> str:
    for name, module in model.named_modules():
        if name.endswith("layers") and isinstance(module, nn.ModuleList):
            return name + "."
    raise UserError("cannot find the decoder layers of this model")


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return (model.get_submodule(path) if path else model), attr
