"""linearard: restore the short-text skills of RoPE-extended language models.

The core is :func:`attention_kl` / :func:`relation_kl`, an exact, linear-memory KL divergence between
the row-wise softmax distributions of two (causal) relation matrices.
"""

from typing import Any

__all__ = ["attention_kl", "relation_kl"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Imported on first use so that `linearard --help` and the model plumbing stay light.
    if name in __all__:
        from linearard import ops

        return getattr(ops, name)
    raise AttributeError(f"module 'linearard' has no attribute {name!r}")
