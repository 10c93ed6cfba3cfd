"""The budget curve: what an arm restores as a function of its training tokens.

Drawn with matplotlib's object-oriented API on an Agg canvas, like the evaluation plots.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from linearard.evaluation.stats import is_na
from linearard.study.arms import format_tokens

# (key in a budget point, axis label, the native model's value: the line to reach)
_PANELS = (
    ("recovery", "short-text recovery (%)", 100.0),
    ("kl", "next-token KL to the native model", 0.0),
    ("top1", "top-1 agreement with the native model", 1.0),
)


def budget_curve(points: dict[str, list[dict[str, Any]]], by_arm: dict[str, Any], path: Path) -> Path | None:
    """One panel per measured quantity (recovery %, KL, top-1), one line per arm family against tokens.

    Args:
        points: family -> points from `linearard.study.report.budget_points`.
        by_arm: the seed-aggregated results (for the untrained ``scaled`` arm's level, drawn dotted).
        path: the PNG to write.

    Returns:
        `path`, or None when there is no family with two budgets or nothing measured to draw.
    """
    panels = [p for p in _PANELS if any(_measured(pt.get(p[0])) for pts in points.values() for pt in pts)]
    if not points or not panels:
        return None
    scaled = _scaled_levels(by_arm)
    budgets = sorted({p["tokens"] for pts in points.values() for p in pts})
    fig = Figure(figsize=(5.5 * len(panels), 4.2), layout="constrained")
    for k, (key, label, native) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        scale = 100.0 if key == "recovery" else 1.0
        for family, pts in points.items():
            measured = [p for p in pts if _measured(p.get(key))]
            xs = [p["tokens"] for p in measured]
            ys = [p[key]["value"] * scale for p in measured]
            errs = [(p[key].get("stderr") or 0.0) * scale for p in measured]
            ax.errorbar(xs, ys, yerr=errs, marker="o", capsize=3, label=family)
        ax.axhline(native, color="black", linestyle="--", linewidth=1, label="native")
        if _measured(scaled.get(key)):
            ax.axhline(scaled[key]["value"] * scale, color="grey", linestyle=":", linewidth=1,
                       label="scaled, untrained")
        ax.set_xscale("log")
        ax.set_xticks(budgets)  # ticks at the budgets that were trained, labelled as budgets are written
        ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: format_tokens(round(x), exact=False)))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("training tokens")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("what the token budget buys")
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120)
    return path


def _measured(cell: dict | None) -> bool:
    return bool(cell) and not is_na(cell)


def _scaled_levels(by_arm: dict[str, Any]) -> dict[str, dict | None]:
    if "scaled" not in by_arm["models"]:
        return {}
    agreement = by_arm["models"]["scaled"]["tasks"].get("agreement", {}).get("metrics", {})
    return {"recovery": by_arm["recovery"]["scaled"]["mean"], "kl": agreement.get("kl"), "top1": agreement.get("top1")}
