"""One model, two roles: the native-RoPE teacher and the RoPE-scaled student share every weight.

- teacher: adapters off, the model's own rotary embedding (native frequencies);
- student: adapters on, a `StudentRope` built from the scaled config.

Q/K/V are read where attention receives them, through transformers' attention interface: a thin
implementation registered under its own name hands the tensors to a callback and then delegates to
the model's usual implementation (sdpa, eager, flash…). No per-architecture patches. The callback
travels as a forward keyword argument, which gradient checkpointing replays on recomputation.

The registration and the model config's attention setting last as long as the `TeacherStudent`: its
`close()` (or the end of a ``with TeacherStudent(...)`` block) puts the model's own implementation
back and takes the name out of transformers' registries once no other open pair uses it.

Under gradient checkpointing the pair can keep, of the teacher forward, only what each attention module
received (its input hidden states, one width per token instead of the Q/K/V widths) and recompute the
teacher's Q/K/V of a layer inside the student's forward of that layer (``recompute_teacher=True``): the
student layer's checkpoint then drops them with the rest of the layer and recomputes them in backward.
"""

from __future__ import annotations

import contextvars
import sys
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from linearard.errors import UserError
from linearard.models.adapters import AdapterSwitch
from linearard.models.rope import LENGTH_DEPENDENT, RopeScaling, scaled_config


@dataclass(frozen=True)
class AttentionInputs:
    """What one attention call received.

    Shape:
        query: [B, Hq, T, D] after RoPE (and q-norm where the model has one).
        key, value: [B, Hkv, T, D], not repeated for grouped-query attention.
    """

    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    scaling: float


LayerCallback = Callable[[int, AttentionInputs], None]
# What one attention module was called with: (args, kwargs), the capture keyword left out.
AttentionCall = tuple[tuple[Any, ...], dict[str, Any]]
FROZEN = "frozen-long-context"

_PREFIX = "linearard_capture:"
# The callback travels as a forward keyword argument: gradient checkpointing stores a layer's kwargs
# and replays them when it recomputes the layer in backward, so the callback runs there too.
_CALLBACK_KWARG = "linearard_capture"
# Set while forwards run on rows without padding (`TeacherStudent.causal_only`): no mask tensor is built.
_CAUSAL_ONLY = contextvars.ContextVar("linearard_causal_only", default=False)
# Implementations that apply causality themselves when given no mask (sdpa's is_causal).
_CAUSAL_WITHOUT_MASK = frozenset({"sdpa"})


def _capturing_attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    callback = kwargs.pop(_CALLBACK_KWARG, None)
    if callback is not None:  # a graph break under compilation, only in forwards that capture
        _deliver(callback, module, query, key, value, scaling)
    inner = module.config._attn_implementation.removeprefix(_PREFIX)
    if inner == "eager":
        fn = sys.modules[type(module).__module__].eager_attention_forward
    else:
        fn = ALL_ATTENTION_FUNCTIONS[inner]
    return fn(module, query, key, value, attention_mask, **kwargs)


@torch.compiler.disable
def _deliver(callback: LayerCallback, module: nn.Module, query, key, value, scaling) -> None:
    # Outside any compiled graph: a compiled layer must not read the layer index (one graph serves
    # every layer) nor trace the objective's code.
    callback(module.layer_idx, AttentionInputs(query, key, value, float(scaling)))


class _Recomputed(Exception):
    """Carries a recomputed attention call's inputs out of the attention module (`TeacherStudent.teacher_attention`)."""

    def __init__(self, inputs: AttentionInputs):
        super().__init__()
        self.inputs = inputs


def _hand_back(_layer: int, inputs: AttentionInputs) -> None:
    # The callback of a recomputed teacher call: the inputs are all it is for, so attention never runs.
    raise _Recomputed(inputs)


class _Recorder:
    """Forward pre-hook of every attention module, for the pair's lifetime (hooks added to a compiled
    layer after it compiled would not run): records the calls of the chosen layers inside `record`."""

    def __init__(self) -> None:
        self.calls: dict[int, AttentionCall] | None = None
        self.layers: frozenset[int] = frozenset()
        self.hook = torch.compiler.disable(self._record)

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.calls is not None and module.layer_idx in self.layers:
            self.calls[module.layer_idx] = (args, {k: v for k, v in kwargs.items() if k != _CALLBACK_KWARG})


class _Capture:
    """The callback that attention calls receive: one object for the model's lifetime (a compiled layer
    checks its identity, so a new closure every step would recompile it every step), which calls the
    function of the newest `TeacherStudent.capture` block. A layer that gradient checkpointing
    recomputes during backward, after its block has closed, reaches that block's function again: the
    student's, whose forward is the last before backward."""

    def __init__(self) -> None:
        self.fn: LayerCallback | None = None

    def __call__(self, layer: int, inputs: AttentionInputs) -> None:
        if self.fn is not None:
            self.fn(layer, inputs)


# Dynamo's nested_graph_breaks came before torch 2.11 in early forms; it is used where it was verified (2.11, 2.13).
_RESUMES_NESTED_FRAMES = torch.__version__ >= (2, 11)


def compile_layers(ts: TeacherStudent, backend: str = "inductor") -> None:
    """Compile each decoder layer in place with `torch.compile` (the modules keep their identity, so
    adapters, data-parallel wrappers and checkpoints see the same model).

    One compiled graph serves every layer of the same shape; the teacher (adapters off, no gradient)
    and the student compile once each. The capture of Q/K/V runs between two graphs of a layer:

    - The capture sits three calls deep (layer, attention module, attention function). Dynamo resumes
      tracing inside those calls (``nested_graph_breaks``, torch 2.11 on) rather than ending a graph in
      every frame on the way, each of which would be compiled again on its own (SmolLM2's teacher and
      student: 4 graphs instead of 13, a cold compile of 12.7 s instead of 16.0 on one H200).
    - With gradients on, the first layer's input is made to ask for a gradient like every later layer's
      (a hook on the input embeddings), so the first layer does not compile a forward and a backward of
      its own. Its only cost is the first layer's input gradient, which nothing reads.
    """
    for layer in ts.decoder.layers:
        layer.compile(dynamic=False, backend=backend)
        if _RESUMES_NESTED_FRAMES:
            # the setting is read while tracing, which happens inside the compiled call
            resuming = torch._dynamo.config.patch(nested_graph_breaks=True)
            layer._compiled_call_impl = resuming(layer._compiled_call_impl)
    ts.decoder.get_input_embeddings().register_forward_hook(_input_asks_for_gradient)


def _input_asks_for_gradient(_module: nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and not output.requires_grad:
        output.requires_grad_()
    return output


# Open TeacherStudent pairs per registered name: the last one to close takes the name out.
_OPEN: dict[str, int] = {}


def _register(inner: str) -> str:
    """Register the capturing implementation over `inner` and return its name. Class-wide: transformers
    builds masks (sliding windows…) only for names in the mask interface's class-wide mapping."""
    name = _PREFIX + inner
    if not _OPEN.get(name):
        AttentionInterface.register(name, _capturing_attention)
        AttentionMaskInterface.register(name, _mask_builder(ALL_MASK_ATTENTION_FUNCTIONS[inner]))
    _OPEN[name] = _OPEN.get(name, 0) + 1
    return name


def _mask_builder(build: Callable[..., Any]) -> Callable[..., Any]:
    """`build`, the inner implementation's mask builder, except inside `TeacherStudent.causal_only`."""

    def builder(*args: Any, **kwargs: Any) -> Any:
        return None if _CAUSAL_ONLY.get() else build(*args, **kwargs)

    return builder


def _unregister(name: str) -> None:
    _OPEN[name] -= 1
    if not _OPEN[name]:
        del _OPEN[name]
        # the interfaces have no way to unregister; their class-wide mapping is where register() wrote
        del AttentionInterface._global_mapping[name]
        del AttentionMaskInterface._global_mapping[name]


def _restore_attention(config: Any, own: str, registered: str) -> None:
    config._attn_implementation = own
    _unregister(registered)


class StudentRope(nn.Module):
    """The student's rotary embedding: the model's own rotary class built from the scaled config.

    Types whose frequencies depend on the current length (dynamic NTK, LongRoPE) are frozen at their
    long-context frequencies; on short training texts they would otherwise fall back to the native
    frequencies, and there would be nothing to restore. YaRN/LongRoPE attention scaling stays inside
    cos/sin, so it enters the relation logits exactly as it enters attention.
    """

    def __init__(self, native: nn.Module, config: Any, scaling: RopeScaling):
        super().__init__()
        self.rope = type(native)(config)
        per_type = isinstance(self.rope.rope_type, dict)
        for layer_type in self.rope.rope_type if per_type else [None]:
            kind = self.rope.rope_type[layer_type] if per_type else self.rope.rope_type
            if kind not in LENGTH_DEPENDENT:
                continue
            kwargs = {"layer_type": layer_type} if per_type else {}
            inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[kind](
                config, None, seq_len=scaling.target_length, **kwargs
            )
            prefix = f"{layer_type}_" if per_type else ""
            getattr(self.rope, f"{prefix}inv_freq").copy_(inv_freq)
            getattr(self.rope, f"{prefix}original_inv_freq").copy_(inv_freq)
            setattr(self.rope, f"{prefix}attention_scaling", attention_scaling)
            # A name transformers' run-time update does not recognise (it tests `"dynamic" in name`):
            # the frequencies stay put at every length.
            if per_type:
                self.rope.rope_type[layer_type] = FROZEN
            else:
                self.rope.rope_type = FROZEN

    def forward(self, *args, **kwargs):
        return self.rope(*args, **kwargs)


class TeacherStudent:
    """The teacher and the student as two views of one model.

    The pair changes the model's attention setting and registers an attention implementation with
    transformers until `close()`; use it as a context manager to have that undone for you.

    Args:
        model: a transformers causal LM, usually with adapters (`linearard.models.adapters`).
        scaling: the student's RoPE scaling.
        recompute_teacher: keep only the attention modules' inputs of the teacher forward and recompute
            a layer's teacher Q/K/V when the student reaches it (`record`, `teacher_attention`). It saves
            memory only where the decoder layers checkpoint, and costs the host a second pass through each
            distilled layer's attention module (on one H200, SmolLM2 shape at 4K-token blocks: a third
            slower); `linearard restore` turns it on where the teacher's Q/K/V would not fit. Needs each
            decoder layer's attention module as ``self_attn``, as every supported family has.

    Example:
        >>> with TeacherStudent(model, RopeScaling.resolve(model.config, "linear", 4.0)) as ts:  # doctest: +SKIP
        ...     with torch.no_grad(), ts.teacher(), ts.capture(lambda i, a: ...):
        ...         model(input_ids)
    """

    def __init__(self, model: nn.Module, scaling: RopeScaling, recompute_teacher: bool = False):
        self.model = model
        self.scaling = scaling
        self.decoder = _find_decoder(model)
        self.num_layers: int = self.decoder.config.num_hidden_layers
        self.adapters = AdapterSwitch(model)
        attention = [getattr(layer, "self_attn", None) for layer in self.decoder.layers]
        if recompute_teacher and None in attention:
            layer = self.decoder.layers[attention.index(None)]
            raise UserError(f"recompute_teacher needs each decoder layer's attention module as `self_attn`; "
                            f"{type(layer).__name__} has none")
        self.recompute_teacher = recompute_teacher
        self._hooks = []
        if self.recompute_teacher:
            self._recorder = _Recorder()
            self._attention = attention
            self._layer_adapters = [AdapterSwitch(a) for a in attention]
            self._hooks = [a.register_forward_pre_hook(self._recorder.hook, with_kwargs=True) for a in attention]
        self.native_rope = self.decoder.rotary_emb
        self.student_config = scaled_config(self.decoder.config, scaling)
        self.student_rope = StudentRope(self.native_rope, self.student_config, scaling)
        self._callback = _Capture()
        # Installed for the pair's lifetime, not per capture: gradient checkpointing recomputes layers
        # during backward, after the capture block has closed, and must reach it again. Without a
        # callback it only delegates.
        config = self.decoder.config
        self._own_attention = config._attn_implementation
        if self._own_attention.startswith(_PREFIX):
            raise UserError("this model already has an open TeacherStudent; close that one first")
        attention = _register(self._own_attention)
        config._attn_implementation = attention
        # also undone when the pair is garbage-collected unclosed
        self._undo = weakref.finalize(self, _restore_attention, config, self._own_attention, attention)

    def close(self) -> None:
        """Give the model its own attention implementation back and unregister the capturing one (once
        no other pair uses it). Safe to call twice; the pair captures nothing afterwards."""
        self._undo()
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    def __enter__(self) -> TeacherStudent:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def config(self) -> Any:
        return self.decoder.config

    @contextmanager
    def teacher(self) -> Iterator[None]:
        """Adapters off, native RoPE. Wrap in ``torch.no_grad()`` yourself."""
        with self.adapters.off(), self._rope(self.native_rope):
            yield

    @contextmanager
    def student(self) -> Iterator[None]:
        """Adapters on, scaled RoPE."""
        with self._rope(self.student_rope):
            yield

    @contextmanager
    def capture(self, fn: LayerCallback) -> Iterator[None]:
        """Call ``fn(layer_idx, AttentionInputs)`` inside every attention call of the block."""

        self._callback.fn = fn

        def add_callback(module, args, kwargs):
            return args, {**kwargs, _CALLBACK_KWARG: self._callback}

        handle = self.decoder.register_forward_pre_hook(add_callback, with_kwargs=True)
        try:
            yield
        finally:
            handle.remove()

    @contextmanager
    def record(self, layers: frozenset[int]) -> Iterator[dict[int, AttentionCall]]:
        """Record the attention calls of `layers` made inside the block (the teacher forward), for
        `teacher_attention`. Needs ``recompute_teacher``."""
        if not self.recompute_teacher:
            raise RuntimeError("this pair does not recompute the teacher (recompute_teacher=False)")
        calls: dict[int, AttentionCall] = {}
        self._recorder.calls, self._recorder.layers = calls, layers
        try:
            yield calls
        finally:
            self._recorder.calls, self._recorder.layers = None, frozenset()

    def teacher_attention(self, layer: int, call: AttentionCall) -> AttentionInputs:
        """The teacher's attention inputs of `layer`, recomputed from its recorded call: the attention
        module runs again, with its adapters off and without gradients, up to its attention call."""
        args, kwargs = call
        with torch.no_grad(), self._layer_adapters[layer].off():
            try:
                self._attention[layer](*args, **kwargs, **{_CALLBACK_KWARG: _hand_back})
            except _Recomputed as done:
                return done.inputs
        raise RuntimeError(f"layer {layer}'s attention module returned without calling attention")

    @contextmanager
    def first_layers(self, count: int) -> Iterator[None]:
        """Forwards in the block run the first `count` decoder layers only: what a loss reads of a
        forward ends at some layer, and the layers past it would compute what nothing reads. The
        decoder's final state is then layer ``count - 1``'s output, normalised. Transformers' decoders
        run ``layers[: config.num_hidden_layers]``, which the block lowers."""
        config = self.config
        if count >= self.num_layers:
            yield
            return
        config.num_hidden_layers = count
        try:
            yield
        finally:
            config.num_hidden_layers = self.num_layers

    @contextmanager
    def causal_only(self, length: int) -> Iterator[None]:
        """Forwards in the block take rows of `length` tokens without padding: where the attention kernel
        applies causality itself (sdpa) and no layer's window is shorter than the rows, no mask tensor is
        built. Transformers decides the same by looking at the mask, which it cannot do while a CUDA graph
        is captured: there it would build a mask, and the compiled layers would meet an input they were
        not compiled for."""
        config = self.config
        windows = [getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size")]
        if self._own_attention not in _CAUSAL_WITHOUT_MASK or any(w is not None and w < length for w in windows):
            yield
            return
        token = _CAUSAL_ONLY.set(True)
        try:
            yield
        finally:
            _CAUSAL_ONLY.reset(token)

    @contextmanager
    def _rope(self, rope: nn.Module) -> Iterator[None]:
        previous = self.decoder.rotary_emb
        device = _buffer_device(previous)
        if _buffer_device(rope) != device:
            rope.to(device)
        self.decoder.rotary_emb = rope
        try:
            yield
        finally:
            self.decoder.rotary_emb = previous


def _find_decoder(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if hasattr(module, "rotary_emb") and hasattr(module, "layers"):
            return module
    raise UserError(
        f"{type(model).__name__} has no rotary embedding module this tool can scale (unsupported architecture)"
    )


def _buffer_device(module: nn.Module) -> torch.device:
    for buf in module.buffers():
        return buf.device
    return torch.device("cpu")
