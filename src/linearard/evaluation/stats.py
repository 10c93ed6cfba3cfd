"""Numbers with standard errors, and the cells that hold them in results.

Every reported number is a *cell*: a plain dict ``{"value": float, "stderr": float | None, "n": int}``
(JSON-ready), or ``{"value": None, "note": "n/a (...)"}`` when the number cannot be measured (a length
beyond what the model supports, no chat template, ...). Standard errors are those of a mean of ``n``
independent samples (sample variance with ``n - 1``), as lm-evaluation-harness reports them;
perplexities carry the delta-method error ``ppl * se(mean NLL)``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

Cell = dict


def mean_cell(samples: Iterable[float]) -> Cell:
    """The mean of `samples` with its standard error (None for fewer than two samples).

    Example:
        >>> mean_cell([1.0, 0.0, 1.0, 1.0])["value"]
        0.75
    """
    xs = [float(x) for x in samples]
    if not xs:
        raise ValueError("mean_cell needs at least one sample")
    n = len(xs)
    mean = math.fsum(xs) / n
    if n < 2:
        return {"value": mean, "stderr": None, "n": n}
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return {"value": mean, "stderr": math.sqrt(var / n), "n": n}


def perplexity_cell(nll: Cell) -> Cell:
    """exp(mean NLL), with the delta-method standard error ``ppl * se(NLL)``."""
    ppl = math.exp(nll["value"])
    se = None if nll["stderr"] is None else ppl * nll["stderr"]
    return {"value": ppl, "stderr": se, "n": nll["n"]}


def na_cell(reason: str) -> Cell:
    """A number that was not measured, and why (shown as ``n/a (reason)`` in tables)."""
    return {"value": None, "note": f"n/a ({reason})"}


def is_na(cell: Cell) -> bool:
    return cell.get("value") is None


def ratio_cell(numerator: Cell, denominator: Cell) -> Cell:
    """numerator / denominator, with first-order error propagation treating both as independent.

    The two are usually measured on the same items, so this error is an upper bound.
    """
    if is_na(numerator) or is_na(denominator):
        return na_cell("missing score")
    if denominator["value"] == 0:
        return na_cell("reference score is 0")
    r = numerator["value"] / denominator["value"]
    rel = [
        c["stderr"] / c["value"]
        for c in (numerator, denominator)
        if c.get("stderr") is not None and c["value"] != 0
    ]
    se = abs(r) * math.sqrt(sum(x * x for x in rel)) if rel else None
    return {"value": r, "stderr": se, "n": min(numerator.get("n", 0), denominator.get("n", 0))}


def average_cells(cells: Sequence[Cell]) -> Cell:
    """The unweighted mean of several measured numbers; errors add in quadrature."""
    measured = [c for c in cells if not is_na(c)]
    if not measured:
        return na_cell("nothing measured")
    k = len(measured)
    value = math.fsum(c["value"] for c in measured) / k
    errs = [c["stderr"] for c in measured if c.get("stderr") is not None]
    se = math.sqrt(math.fsum(e * e for e in errs)) / k if errs else None
    return {"value": value, "stderr": se, "n": k}


def format_cell(cell: Cell, digits: int = 3, percent: bool = False, with_error: bool = True) -> str:
    """``0.412 ± 0.016``, ``41.2 ± 1.6`` (percent), or the n/a note."""
    if is_na(cell):
        return cell.get("note", "n/a")
    scale = 100.0 if percent else 1.0
    value = cell["value"] * scale
    if not percent and abs(value) >= 100:
        digits = 1
    text = f"{value:.{digits}f}"
    if with_error and cell.get("stderr") is not None:
        text += f" ± {cell['stderr'] * scale:.{digits}f}"
    return text


def task_result(
    metrics: dict[str, Cell],
    *,
    primary: str | None = None,
    lower_is_better: Sequence[str] = (),
    details: dict | None = None,
) -> dict:
    """What every task returns: its cells, the headline metric, and which metrics fall as they improve.

    ``details`` holds anything else worth keeping (grids, per-text numbers, generated answers).
    """
    if primary is not None and primary not in metrics:
        raise ValueError(f"primary metric {primary!r} is not among {list(metrics)}")
    return {
        "metrics": metrics,
        "primary": primary,
        "lower_is_better": [m for m in metrics if m in set(lower_is_better)],
        "details": details or {},
    }


def join_names(names: Sequence[str]) -> str:
    """``a``, ``a and b``, ``a, b and c``."""
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
