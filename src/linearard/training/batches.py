"""Micro-batches made ahead of the training step.

A background thread draws a stage's token blocks (tokenising the corpus as it goes), stacks them into
micro-batches in pinned memory and queues a few; the step copies each to the device without waiting.
Tokenising and stacking then overlap the device's work instead of adding to it. Each queued batch
carries the data position after it, so a checkpoint records exactly what the steps consumed, however
far ahead the thread has run.

The stream does not deliver evenly: one tokenizer call hands over a few hundred blocks at once, and at an
epoch's start the shuffle buffer fills before the first block comes out. The thread therefore runs about
a million tokens ahead, so that a step which trains half a million tokens a second does not wait for it.
"""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from typing import Any

import torch

from linearard.data import TokenBlocks

_DONE = object()
# made ahead: micro-batches holding about this many tokens, within [_MIN_DEPTH, _MAX_DEPTH]
_AHEAD_TOKENS = 1 << 20
_MIN_DEPTH, _MAX_DEPTH = 4, 64


class MicroBatches:
    """An endless iterator of ``{"input_ids", "attention_mask"}`` micro-batches on `device`.

    Args:
        blocks: the stage's block stream, positioned where training continues.
        batch_size: blocks per micro-batch.
        device: where the batches go (copied without blocking from pinned memory on CUDA).
        depth: micro-batches made ahead; by default as many as hold about a million tokens (4 to 64).

    Example:
        >>> batches = MicroBatches(blocks, 8, torch.device("cuda"))  # doctest: +SKIP
        >>> batch = next(batches)  # doctest: +SKIP
        >>> state = batches.state_dict()  # the position after `batch`  # doctest: +SKIP
        >>> batches.close()  # doctest: +SKIP
    """

    def __init__(self, blocks: TokenBlocks, batch_size: int, device: torch.device, depth: int | None = None):
        if depth is None:
            depth = min(max(math.ceil(_AHEAD_TOKENS / (batch_size * blocks.seq_len)), _MIN_DEPTH), _MAX_DEPTH)
        self.blocks = blocks
        self.batch_size = batch_size
        self.device = device
        self._position = blocks.position()
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._pin = device.type == "cuda"
        self._thread = threading.Thread(target=self._produce, name="linearard-batches", daemon=True)
        self._thread.start()

    def __iter__(self) -> MicroBatches:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        item = self._queue.get()
        if item is _DONE:
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        batch, self._position = item
        # token blocks are padded at the end only (see `linearard.objectives.Batch`)
        return {**{k: v.to(self.device, non_blocking=self._pin) for k, v in batch.items()}, "padded_right": True}

    def state_dict(self) -> dict[str, Any]:
        """The data position after the last micro-batch returned."""
        return self.blocks.state_dict(self._position)

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # unblock a producer waiting on a full queue
                self._queue.get(timeout=0.05)

    def _produce(self) -> None:
        try:
            stream = iter(self.blocks)
            while not self._stop.is_set():
                try:
                    blocks = [next(stream) for _ in range(self.batch_size)]
                except StopIteration:
                    self._put(_DONE)
                    return
                batch = {k: torch.stack([b[k] for b in blocks]) for k in blocks[0]}
                if self._pin:
                    batch = {k: v.pin_memory() for k, v in batch.items()}
                self._put((batch, self.blocks.position()))
        except BaseException as err:  # handed to the training thread, which raises it
            self._put(err)

    def _put(self, item: Any) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
