"""Calls whose name changed within the transformers versions we support (5.x)."""

from __future__ import annotations

from typing import Any


def enable_activation_checkpointing(model: Any) -> None:
    """Recompute each decoder layer's activations in the backward pass (non-reentrant checkpointing).

    transformers 5.23 renamed ``gradient_checkpointing_enable`` to ``activation_checkpointing_enable``
    and made the old name warn; call the new one where it exists. A peft model forwards either name
    to the model it wraps.
    """
    enable = getattr(model, "activation_checkpointing_enable", None)
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
