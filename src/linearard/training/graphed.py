"""An optimizer step replayed from one CUDA graph.

A restore step of a small model keeps the host busier than the GPU: the Python and the kernel launches
of a teacher forward, a student forward and a backward, layer after layer. On one H200 a step of the
SmolLM2-135M shape with 32 blocks of 1,024 tokens spent about 200 ms on the host for about 135 ms of GPU
work, and with 16 blocks the host alone set the pace. `GraphedStep` runs the first steps as they are
(layers compile, kernels tune, the optimizer creates its state), then records one whole step, every
micro-batch's forward and backward, the clipping and the optimizer's update, as a CUDA graph and replays
it for each later step: the host copies the next micro-batches into the graph's inputs and launches it.

A step can be recorded when it keeps every shape fixed, never waits for the device (no values read, no
shape that depends on the data), lets its backward create the gradients (``zero_grad(set_to_none=True)``
first) and takes its learning rate from a tensor (`make_capturable`). The restore loop's steps do.

Under DDP the recording holds the gradient all-reduce too (NCCL records into CUDA graphs). DDP must then be
built on `side_stream`, reach every trainable parameter each step (no search for unused ones: that reads a
flag back from the device), and have run `DDP_WARMUP` steps first. Decoding replays its steps the same way
(`linearard.evaluation.generation`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

Batches = list[dict[str, Any]]
Metrics = dict[str, torch.Tensor]
WARMUP = 3  # eager steps before the recording
# DDP times its first 10 synchronised steps with CUDA events and waits for them at the start of the next:
# a recording must come after that wait.
DDP_WARMUP = 11


class GraphedStep:
    """`step` run eagerly `warmup` times, then recorded once and replayed.

    Args:
        step: one optimizer step over a list of micro-batches, returning 0-d metric tensors (a step of
            decoding takes no inputs and returns none).
        warmup: eager steps first (on `side_stream`, as CUDA graph capture asks; `DDP_WARMUP` under DDP).

    Each call returns the step's metrics as tensors of their own (a replay overwrites the graph's).

    Example:
        >>> step = GraphedStep(train_step)  # doctest: +SKIP
        >>> for batches in stream:  # doctest: +SKIP
        ...     metrics = step(batches)
        >>> step.close()  # doctest: +SKIP
    """

    def __init__(self, step: Callable[[Batches], Metrics], warmup: int = WARMUP):
        self.step = step
        self.warmup = warmup
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.inputs: Batches = []
        self.outputs: Metrics = {}

    def __call__(self, batches: Batches = ()) -> Metrics:
        self.calls += 1
        if self.graph is None:
            if self.calls <= self.warmup:
                return self._eager(batches)
            self._record(batches)
        for static, batch in zip(self.inputs, batches, strict=True):
            for key, value in static.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(batch[key], non_blocking=True)
        self.graph.replay()
        return {key: value.clone() for key, value in self.outputs.items()}

    def close(self) -> None:
        """Free the graph; its memory pool goes once nothing else holds what the graph created (the
        gradients: set them to None first)."""
        self.graph = None
        self.inputs, self.outputs = [], {}

    def _eager(self, batches: Batches) -> Metrics:
        with on_side_stream():
            return self.step(batches)

    def _record(self, batches: Batches) -> None:
        self.inputs = [{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in batches]
        graph = torch.cuda.CUDAGraph()
        # thread_local: the thread that stacks the next batches in pinned memory may call CUDA meanwhile
        with torch.cuda.graph(graph, stream=side_stream(), capture_error_mode="thread_local"):
            self.outputs = self.step(self.inputs)
        self.graph = graph


@functools.cache
def _side_stream(device: int) -> torch.cuda.Stream:
    return torch.cuda.Stream(device)


def side_stream() -> torch.cuda.Stream:
    """The current CUDA device's one stream for graphed work: warm-up steps run on it and recordings are
    made on it. A model whose gradients a graph records is wrapped in DDP on it too (`on_side_stream`):
    autograd accumulates a parameter's gradient on the stream that was current when its accumulator was
    made, and DDP makes them all when it is built."""
    return _side_stream(torch.cuda.current_device())


@contextmanager
def on_side_stream() -> Iterator[torch.cuda.Stream]:
    """Run the block on `side_stream`, after what the current stream has queued and before what it
    queues next."""
    side, current = side_stream(), torch.cuda.current_stream()
    side.wait_stream(current)
    try:
        with torch.cuda.stream(side):
            yield side
    finally:
        current.wait_stream(side)


def make_capturable(optimizer: torch.optim.Optimizer) -> None:
    """Let a CUDA graph record `optimizer`'s step: its step counts on the device and its learning rate a
    device tensor that learning-rate schedulers fill in place. Call after any ``load_state_dict``."""
    for group in optimizer.param_groups:
        device = group["params"][0].device
        group["capturable"] = True
        if not isinstance(group["lr"], torch.Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), device=device)
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                state["step"] = state["step"].to(device=device, dtype=torch.float32)


def portable_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer's or scheduler's state dict with learning rates as numbers and no `capturable` flag
    set, as a run without graphs (or on the CPU) reads it; `make_capturable` turns it back."""
    def number(value: Any) -> Any:
        return value.item() if isinstance(value, torch.Tensor) and value.dim() == 0 else value

    out = dict(state)
    if "param_groups" in out:
        out["param_groups"] = [
            {**g, "lr": number(g["lr"]), **({"capturable": False} if "capturable" in g else {})}
            for g in out["param_groups"]
        ]
    for key in ("base_lrs", "_last_lr"):
        if key in out:
            out[key] = [number(v) for v in out[key]]
    return out
