"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM (how clusters preempt a job).

The first signal asks the loop to stop at the next step boundary, after writing a checkpoint; a
second SIGINT or SIGTERM stops at once. Under torchrun every process must stop after the same step,
so the processes compare their flags, but only every `CHECK_EVERY` steps and at checkpoints: a
comparison waits for the device, and the loop avoids waiting for it every step.
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from linearard.training.distributed import DistContext

CHECK_EVERY = 8
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """Set by the first SIGINT/SIGTERM while `catching()`; the loop asks `due()` at each step boundary.

    Example:
        >>> stop = StopRequest()
        >>> with stop.catching():  # doctest: +SKIP
        ...     for step in range(steps):
        ...         train_one_step()
        ...         if stop.due(step + 1, ctx, checkpoint=False):
        ...             save_and_leave()
    """

    def __init__(self, *, announce: bool = True):
        self.signum: int | None = None
        self.announce = announce

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "no signal"

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGINT)

    @contextmanager
    def catching(self) -> Iterator[StopRequest]:
        """Handle SIGINT and SIGTERM inside the block (only in the main thread, where Python allows it)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.getsignal(s) for s in _SIGNALS}
        for s in _SIGNALS:
            signal.signal(s, self._handle)
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def due(self, global_step: int, ctx: DistContext, *, checkpoint: bool) -> bool:
        """Whether to stop after this step; the same answer on every process.

        Args:
            global_step: the step just finished (the processes agree on it).
            checkpoint: a checkpoint was just written (the processes compare flags then too).
        """
        if not ctx.distributed:
            return self.signum is not None
        if not (checkpoint or global_step % CHECK_EVERY == 0):
            return False
        # the largest signal number seen by any process: every process then stops, naming the signal
        device = ctx.device if dist.get_backend() == "nccl" else torch.device("cpu")
        seen = torch.tensor([self.signum or 0], dtype=torch.int32, device=device)
        dist.all_reduce(seen, op=dist.ReduceOp.MAX)
        self.signum = int(seen.item()) or None
        return self.signum is not None

    def _handle(self, signum: int, _frame: object) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now, without a checkpoint
        self.signum = signum
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: stopping after this step with a checkpoint "
                  "(Ctrl-C again stops at once)", file=sys.stderr, flush=True)
