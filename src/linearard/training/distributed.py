"""Multi-process training under ``torchrun``: process-group setup, DDP / FSDP2 wrapping, reductions.

linearard launches nothing itself. ``torchrun --nproc_per_node N -m linearard restore --strategy ddp``
starts N processes; each reads RANK / WORLD_SIZE / LOCAL_RANK from its environment. Multi-node runs use
torchrun's own rendezvous flags (``--nnodes``, ``--node_rank``, ``--rdzv_endpoint``).

What is wrapped is a `LossModule`: a module whose forward runs the objective on a batch (teacher and
student forwards inside) and returns the loss. Its output is the loss itself, so DDP's search for
unused parameters starts from the loss and sees exactly the adapters that get a gradient, and FSDP's
root (the embeddings, final norm and a tied LM head) stays gathered across both forwards.

- ``ddp``: DistributedDataParallel over the model; only trainable parameters (the adapters) are
  all-reduced (in fp32, or in bf16 with ``reduce_dtype``), and gradient accumulation skips the all-reduce
  on all but the last micro-batch.
- ``fsdp``: FSDP2 ``fully_shard`` on every decoder layer and on the root, frozen base and trainable
  adapters sharded alike; bf16 mixed precision when training in bf16 (gradients reduced in fp32 unless
  ``reduce_dtype`` is bf16). The teacher is the same
  sharded weights with the adapters switched off, so nothing is loaded twice.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from linearard.errors import UserError
from linearard.training.graphed import on_side_stream


@dataclass
class DistContext:
    """Who this process is, and how the model is spread over the processes."""

    strategy: str = "none"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this run started the process group and must end it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.strategy != "none"


def setup(strategy: str, device: str = "auto") -> DistContext:
    """Start (or join) the process group for `strategy` and pick this process's device.

    Args:
        strategy: ``none``, ``ddp`` or ``fsdp``.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda was asked for but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if strategy == "none":
        if world_size > 1:
            raise UserError(
                f"started by torchrun with {world_size} processes but --strategy is none; "
                "pass --strategy ddp or --strategy fsdp"
            )
        return DistContext(device=torch.device("cuda" if use_cuda else "cpu"))
    if "RANK" not in os.environ:
        raise UserError(
            f"--strategy {strategy} runs under torchrun: torchrun --nproc_per_node N -m linearard restore ..."
        )
    _check_available(strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"process {rank} has LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices exist"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    owns = not dist.is_initialized()
    if owns:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        try:
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30), **kwargs)
        except Exception as err:  # any rendezvous/backend failure becomes one line
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UserError(f"could not start the {backend} process group: {first}") from None
    return DistContext(strategy, rank, dist.get_world_size(), local_rank, dev, owns)


def teardown(ctx: DistContext) -> None:
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()


def _check_available(strategy: str) -> None:
    if not dist.is_available():
        raise UserError(f"--strategy {strategy} needs torch.distributed, which this torch build lacks")
    if strategy == "fsdp":
        try:
            from torch.distributed.fsdp import fully_shard  # noqa: F401
        except ImportError:
            raise UserError(
                f"--strategy fsdp needs FSDP2 (torch.distributed.fsdp.fully_shard, torch >= 2.6); "
                f"this is torch {torch.__version__}"
            ) from None


class LossModule(nn.Module):
    """``forward(fn, *args)`` returns ``fn(*args)`` run inside this module's hooks, so DDP/FSDP can wrap it.

    The loop passes the objective's step (``fn(batch) -> (loss, metrics)``) to train, and evaluation
    functions to evaluate: every call goes through the wrapper, so an FSDP root gathers its weights
    around it whatever runs.

    Args:
        model: the model with adapters (registered here so its parameters belong to this module).

    Example:
        >>> wrapped = wrap(LossModule(model), ctx, layers, bf16=False)  # doctest: +SKIP
        >>> loss, metrics = wrapped(step, batch)  # doctest: +SKIP
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


def wrap(
    module: LossModule,
    ctx: DistContext,
    decoder_layers: list[nn.Module],
    *,
    bf16: bool,
    reduce_bf16: bool = False,
    find_unused: bool = True,
    graphs: bool = False,
) -> nn.Module:
    """Wrap `module` for `ctx.strategy`; the returned module is what the loop calls.

    Args:
        module: the objective as a module.
        decoder_layers: the model's decoder layers (FSDP shards each on its own).
        bf16: FSDP gathers the weights in bf16 (and reduces gradients in fp32 unless `reduce_bf16`).
        reduce_bf16: average the gradients between processes in bf16: half the bytes of fp32 on the link.
        find_unused: DDP looks for adapters without a gradient each step (needed when the objective
            cannot reach some of them: `linearard.objectives.ObjectiveSpec.reaches`).
        graphs: steps will be recorded in a CUDA graph, DDP's gradient hooks included
            (`linearard.training.graphed`).
    """
    if ctx.strategy == "ddp":
        import inspect

        from torch.nn.parallel import DistributedDataParallel

        # The rotary buffers are identical everywhere and are swapped between teacher and student;
        # torch >= 2.13 spells "do not sync them every forward" differently.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
        # A recording holds DDP's hooks: build DDP on its stream, and let DDP time (with events it waits
        # for) only its first steps, which run before the recording.
        with on_side_stream() if graphs else contextlib.nullcontext():
            wrapped = DistributedDataParallel(
                module,
                device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
                find_unused_parameters=find_unused,
                **no_sync,
            )
        if graphs:
            wrapped._set_ddp_runtime_logging_sample_rate(2**31 - 1)
        if reduce_bf16:
            wrapped.register_comm_hook(None, bf16_average)
        return wrapped
    if ctx.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # bf16 gathers also make a group's dtypes uniform (bf16 base weights, fp32 adapters).
        policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16 if bf16 else None,
            reduce_dtype=torch.bfloat16 if reduce_bf16 else torch.float32 if bf16 else None,
        )
        mesh = _device_mesh(ctx)
        for layer in decoder_layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(module, mesh=mesh, mp_policy=policy)
        return module
    return module


def bf16_average(group, bucket):  # unannotated: DDP rejects annotations it reads as strings
    """DDP communication hook: average a bucket of gradients over the processes in bf16.

    `group` is the process group (None: the default one) and `bucket` a ``torch.distributed.GradBucket``.
    The bucket is rounded to bf16 and divided by the world size before the all-reduce, and the result is
    written back into the bucket in its own dtype; returns the future DDP waits for. (PyTorch's own bf16
    hook refuses gloo.)
    """
    buffer = bucket.buffer()
    reduced = buffer.to(torch.bfloat16).div_(dist.get_world_size(group))
    future = dist.all_reduce(reduced, group=group, async_op=True).get_future()

    def written_back(done: torch.futures.Future) -> torch.Tensor:
        return buffer.copy_(done.value()[0])

    return future.then(written_back)


def _device_mesh(ctx: DistContext) -> Any:
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(ctx.device.type, (ctx.world_size,))


def gather_for_backward(ctx: DistContext, layers: list[nn.Module]) -> None:
    """Under FSDP, gather the weights of `layers` before ``backward()``.

    FSDP gathers a layer for its backward when the gradient reaches the layer's output. A layer whose
    parameters get a gradient only through the Q/K/V its attention handed to the loss (the deepest
    distilled layer: its output feeds no loss) would meet its backward with freed weights. Keeping it
    gathered from forward to backward does not do: switching the adapters off for the teacher flips
    their ``requires_grad``, which must happen while the layer is sharded. FSDP's end-of-backward
    callback reshards these layers and reduces their gradients.
    """
    if ctx.strategy == "fsdp":
        for layer in layers:
            layer.unshard()


@contextlib.contextmanager
def gradient_sync(wrapped: nn.Module, ctx: DistContext, enabled: bool) -> Iterator[None]:
    """Skip the gradient all-reduce / reduce-scatter inside the block unless `enabled` (accumulation)."""
    if ctx.strategy == "ddp" and not enabled:
        with wrapped.no_sync():
            yield
    elif ctx.strategy == "fsdp":
        wrapped.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
    else:
        yield


def mean_tensor_over_ranks(values: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """`values` averaged element-wise over the processes (every process gets the result); a NaN or Inf
    on any process stays in the mean, so every process sees it."""
    if not ctx.distributed:
        return values
    tensor = values.to(device=_comm_device(ctx), dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor / ctx.world_size


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every process when `flag` is true on any of them (e.g. a failed checkpoint write)."""
    if not ctx.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=_comm_device(ctx))
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every process's `obj`, in rank order, on the main process (others get an empty list)."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size if ctx.is_main else []
    dist.gather_object(obj, out if ctx.is_main else None, dst=0)
    return out


def broadcast_object(obj: Any, ctx: DistContext) -> Any:
    """The main process's `obj` on every process."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def _comm_device(ctx: DistContext) -> torch.device:
    return ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
