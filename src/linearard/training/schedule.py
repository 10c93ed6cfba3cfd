"""Learning-rate schedule: linear warm-up, then cosine decay to a fraction of the peak."""

from __future__ import annotations

import math

import torch


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Multiplier of the peak learning rate for optimizer step `step` (0-based).

    Warm-up rises linearly to 1 over `warmup_steps` steps (the first step already trains, at
    ``1 / warmup_steps``); from that peak the cosine falls to `min_ratio`, reached at the last step.

    Example:
        >>> [round(lr_factor(s, warmup_steps=2, total_steps=6, min_ratio=0.1), 3) for s in range(6)]
        [0.5, 1.0, 0.868, 0.55, 0.232, 0.1]
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    peak = max(warmup_steps - 1, 0)
    decay_steps = total_steps - 1 - peak
    if decay_steps <= 0:
        return 1.0
    progress = min(1.0, (step - peak) / decay_steps)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """A `LambdaLR` following `lr_factor`; call ``step()`` once after every optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: lr_factor(step, warmup_steps=warmup_steps, total_steps=total_steps, min_ratio=min_ratio),
    )


def current_lr(scheduler: torch.optim.lr_scheduler.LambdaLR) -> float:
    """The learning rate of the coming optimizer step, as a number (the optimizer's may be a device tensor,
    and reading that would wait for the device)."""
    return scheduler.base_lrs[0] * scheduler.lr_lambdas[0](scheduler.last_epoch)
