"""What every objective shares: the batch format, the two forwards, layer selection, metrics.

An objective does not run the model itself. It starts a `Step` for a batch; the step says what it
needs from the teacher and the student forward (attention inputs of some layers, hidden states at
some depths) and turns what it received into a loss. `run_steps` runs one teacher forward and one
student forward for any number of steps, so a combination such as ``ard+hidden`` costs no more
forwards than ``ard`` alone.
"""

from __future__ import annotations

import contextlib
import itertools
import re
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, TypedDict

import torch
from typing_extensions import NotRequired

from linearard.errors import UserError

if TYPE_CHECKING:
    from linearard.models.teacher_student import AttentionInputs, TeacherStudent
    from linearard.objectives.spec import Reads


class Batch(TypedDict):
    """One micro-batch. ``attention_mask`` is 1 for real tokens and 0 for padding.

    ``padded_right`` (optional) promises that padding only ever ends a row, as in training blocks. The
    model forwards then get no mask: causal attention never reads a later position, so the real
    positions' outputs are the same without it, and every objective leaves out the padding itself.
    Without a mask, attention takes its fastest causal kernels and needs no host-side mask check.

    Shape:
        input_ids: [B, T] (long); attention_mask: [B, T] (long or bool).
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    padded_right: NotRequired[bool]


Metrics = dict[str, torch.Tensor]
HiddenStates = dict[int, torch.Tensor]


class Step:
    """One objective's work on one batch.

    Hidden-state indices follow transformers' ``hidden_states`` tuple: 0 is the embedding output,
    ``i`` the output of decoder layer ``i - 1`` and ``num_layers`` the final, normalised state.
    """

    needs_teacher: bool = True
    # Whether the attention hooks must be called (installing the capture costs a little on its own),
    # and of which layers.
    captures_attention: bool = False
    attention_layers: frozenset[int] = frozenset()
    teacher_hidden: frozenset[int] = frozenset()
    student_hidden: frozenset[int] = frozenset()

    def on_teacher_attention(self, layer: int, inputs: AttentionInputs) -> None:
        """Called inside each attention call of the teacher forward (under ``no_grad``)."""

    def on_student_attention(self, layer: int, inputs: AttentionInputs) -> None:
        """Called inside each attention call of the student forward, and again for a layer whose
        forward gradient checkpointing recomputes during backward."""

    def on_attention_pair(self, layer: int, teacher: AttentionInputs, student: AttentionInputs) -> None:
        """Called instead of the two hooks above when the pair recomputes the teacher's attention inputs
        (`TeacherStudent.recompute_teacher`): inside the student's attention call of `layer`, with the
        teacher's inputs of that layer. This default hands them to the two hooks; a step that keeps
        the teacher's inputs there should use them here instead and keep nothing past the call, which is
        what saves the memory."""
        self.on_teacher_attention(layer, teacher)
        self.on_student_attention(layer, student)

    def finish(self, teacher: HiddenStates, student: HiddenStates) -> tuple[torch.Tensor, Metrics]:
        """The scalar loss and detached 0-d metric tensors, once both forwards have returned."""
        raise NotImplementedError


class Objective:
    """A training loss computed from a batch and the teacher/student pair.

    Subclasses set `name` and implement `start`. Calling an objective runs its forwards and returns
    ``(loss, metrics)``; the caller only calls ``loss.backward()``.
    """

    name: ClassVar[str]

    def start(self, ts: TeacherStudent, batch: Batch) -> Step:
        raise NotImplementedError

    def reads(self, num_layers: int) -> Reads:
        """What its steps read of the two forwards on a model of `num_layers` decoder layers."""
        raise NotImplementedError

    def memory(self, shape: Any, tokens: int, act_bytes: int, *, recompute_teacher: bool) -> dict[str, int]:
        """Bytes its step keeps for one micro-batch of `tokens` tokens beyond the student's own
        activations, by part; `shape` is a `linearard.training.plan.ModelShape`; `recompute_teacher` as
        `TeacherStudent`'s."""
        return {}

    def __call__(self, ts: TeacherStudent, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = self.run(ts, batch)
        return loss, metrics_to_floats(metrics)

    def run(self, ts: TeacherStudent, batch: Batch) -> tuple[torch.Tensor, Metrics]:
        """As calling it, with the metrics left as 0-d tensors on the device (no synchronisation)."""
        ((loss, metrics),) = run_steps(ts, batch, [self.start(ts, batch)])
        return loss, metrics


def run_steps(
    ts: TeacherStudent, batch: Batch, steps: Sequence[Step]
) -> list[tuple[torch.Tensor, Metrics]]:
    """One teacher forward (if any step needs it) and one student forward serving every step."""
    input_ids = batch["input_ids"]
    mask = None if batch.get("padded_right") else attention_mask(batch)
    teacher: HiddenStates = {}
    capturing = [s for s in steps if s.captures_attention]
    layers = frozenset().union(*(s.attention_layers for s in capturing))
    student_hooks = [s.on_student_attention for s in capturing]
    if any(s.needs_teacher for s in steps):
        wanted = frozenset().union(*(s.teacher_hidden for s in steps))
        if ts.recompute_teacher and capturing:
            with torch.no_grad(), ts.teacher(), ts.record(layers) as calls:
                teacher = _forward(ts, input_ids, mask, wanted, layers)
            student_hooks = [_pairs(ts, calls, capturing)]
        else:
            with torch.no_grad(), ts.teacher(), _capture(ts, [s.on_teacher_attention for s in capturing]):
                teacher = _forward(ts, input_ids, mask, wanted, layers)
    wanted = frozenset().union(*(s.student_hidden for s in steps))
    with ts.student(), _capture(ts, student_hooks):
        student = _forward(ts, input_ids, mask, wanted, layers)
    return [s.finish(teacher, student) for s in steps]


def _pairs(ts: TeacherStudent, calls: dict, steps: Sequence[Step]) -> Callable[[int, AttentionInputs], None]:
    """The student's attention hook when the teacher's inputs are recomputed: each recorded layer's
    teacher inputs, recomputed from its call, go to every step with the student's."""

    def pair(layer: int, student: AttentionInputs) -> None:
        if layer in calls:
            teacher = ts.teacher_attention(layer, calls[layer])
            for step in steps:
                step.on_attention_pair(layer, teacher, student)
        else:
            for step in steps:
                step.on_student_attention(layer, student)

    return pair


def forward_layers(num_layers: int, attention: Iterable[int], hidden: Iterable[int]) -> int:
    """How many leading decoder layers a forward runs when its loss reads the attention inputs of the
    layers `attention` and the hidden states `hidden` (``hidden_states`` indices): through the deepest
    layer whose inputs are read, and one layer past the deepest hidden state read below the top, since
    transformers hands back the last layer run normalised, in its place. All of them when nothing is read.

    Example:
        >>> forward_layers(30, attention=range(15), hidden=[])
        15
        >>> forward_layers(30, attention=[], hidden=[4])
        5
    """
    return min(max([i + 1 for i in (*attention, *hidden)], default=num_layers), num_layers)


def attention_mask(batch: Batch) -> torch.Tensor:
    """The batch's attention mask, all ones when the batch has none."""
    mask = batch.get("attention_mask")
    return torch.ones_like(batch["input_ids"]) if mask is None else mask


def metrics_to_floats(metrics: Metrics) -> dict[str, float]:
    """Detached 0-d tensors -> floats with a single device synchronisation."""
    if not metrics:
        return {}
    values = torch.stack([v.detach().float().reshape(()) for v in metrics.values()]).tolist()
    return dict(zip(metrics, values))


def select_layers(spec: str | Sequence[int], num_layers: int) -> list[int]:
    """Resolve a layer choice to sorted decoder-layer indices in ``[0, num_layers)``.

    Args:
        spec: ``"all"``, ``"every-other"`` (the first, third, …), a list of indices, or a string of
            comma-separated indices and inclusive ranges (``"0-11"``, ``"0,4,8"``). Negative indices
            count from the end.
        num_layers: the model's number of decoder layers.

    Example:
        >>> select_layers("every-other", 5)
        [0, 2, 4]
        >>> select_layers("1,-1", 4)
        [1, 3]
        >>> select_layers("0-2,5", 8)
        [0, 1, 2, 5]
    """
    if isinstance(spec, str):
        if spec == "all":
            return list(range(num_layers))
        if spec == "every-other":
            return list(range(0, num_layers, 2))
        spec = parse_indices(spec, what="layers")
    chosen = set()
    for index in spec:
        resolved = index + num_layers if index < 0 else index
        if not 0 <= resolved < num_layers:
            raise UserError(f"layer {index} is out of range: this model has layers 0..{num_layers - 1}")
        chosen.add(resolved)
    if not chosen:
        raise UserError("no layers chosen")
    return sorted(chosen)


def parse_indices(text: str, what: str = "indices") -> list[int]:
    """Comma-separated integers and inclusive ranges: ``"0-2,5,-1"`` -> ``[0, 1, 2, 5, -1]``.

    Raises:
        UserError: a part that is neither, naming `what` was being read.
    """
    indices = []
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)\s*-\s*(\d+)", part)
        try:
            indices.extend(range(int(match[1]), int(match[2]) + 1) if match else [int(part)])
        except ValueError:
            raise UserError(
                f"{what} must be 'all', 'every-other' or indices and ranges such as '0-11,15'; got {text!r}"
                if what == "layers" else f"{what} must be integers such as '256,1024'; got {text!r}"
            ) from None
    return indices


def layer_groups(layers: Sequence[int], num_layers: int) -> dict[str, list[int]]:
    """Split chosen layer indices into the thirds of the model they fall in, named by their range.

    Example:
        >>> layer_groups([0, 2, 4, 5], 6)
        {'layers_0-1': [0], 'layers_2-3': [2], 'layers_4-5': [4, 5]}
    """
    bounds = [round(num_layers * k / 3) for k in range(4)]
    groups = {}
    for lo, hi in itertools.pairwise(bounds):
        members = [i for i in layers if lo <= i < hi]
        if members:
            groups[f"layers_{lo}-{hi - 1}"] = members
    return groups


def _capture(ts: TeacherStudent, hooks: list[Callable]) -> contextlib.AbstractContextManager:
    if not hooks:
        return contextlib.nullcontext()
    if len(hooks) == 1:
        return ts.capture(hooks[0])

    def each(layer: int, inputs: AttentionInputs) -> None:
        for hook in hooks:
            hook(layer, inputs)

    return ts.capture(each)


def _forward(
    ts: TeacherStudent,
    input_ids: torch.Tensor,
    mask: torch.Tensor | None,
    wanted: frozenset[int],
    attention_layers: frozenset[int],
) -> HiddenStates:
    # Through the whole model, so wrappers around it (peft, data-parallel) see a forward; but with the
    # LM head on the last position only: objectives that need logits apply the head themselves, in
    # chunks. All hidden states are asked for (transformers before 5.24 takes no list of indices); they
    # are layer outputs that autograd or checkpointing keeps anyway, and only the wanted ones are returned.
    with (
        ts.causal_only(input_ids.shape[1]) if mask is None else contextlib.nullcontext(),
        ts.first_layers(forward_layers(ts.num_layers, attention_layers, wanted)),
    ):
        out = ts.model(
            input_ids=input_ids,
            attention_mask=mask,
            use_cache=False,
            logits_to_keep=1,
            output_hidden_states=bool(wanted),
        )
    return {i: out.hidden_states[i] for i in wanted}
