"""PNG plots of an evaluation: perplexity vs context length, passkey heatmaps, benchmark bars.

Drawn with matplotlib's object-oriented API on an Agg canvas, so no display and no global backend
change is needed.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from linearard.evaluation.stats import is_na
from linearard.evaluation.tasks import BENCHMARKS, LM_EVAL_PREFIX


def write_plots(results: dict, output_dir: Path) -> list[Path]:
    """Every plot the results allow; returns the written paths."""
    paths = []
    tasks = results["meta"]["tasks"]
    if "ppl" in tasks or "longppl" in tasks:
        paths.append(_ppl_vs_length(results, output_dir / "ppl_vs_length.png"))
    if "passkey" in tasks:
        for name in [n for n, m in results["models"].items() if "passkey" in m["tasks"]]:
            paths.append(_passkey_heatmap(results, name, output_dir / f"passkey_{_slug(name)}.png"))
    bench = [t for t in tasks if t in BENCHMARKS or t.startswith(LM_EVAL_PREFIX)]
    if bench:
        paths.append(_benchmark_bars(results, bench, output_dir / "benchmarks.png"))
    return paths


def _save(fig: Figure, path: Path) -> Path:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def _colors(n: int) -> list:
    """`n` colours that tell `n` models apart: matplotlib's ten-colour cycle repeats after ten (a study
    plots a dozen runs or more), so larger sets take tab20 and, beyond twenty, a continuous map."""
    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    if n <= 20:
        return [colormaps["tab20"](i) for i in range(n)]
    return [colormaps["turbo"](i / (n - 1)) for i in range(n)]


# more legend entries than this go beside the axes, where they hide no data
_INSIDE_LEGEND = 6
_BESIDE = dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _series(metrics: dict, prefix: str) -> tuple[list[int], list[float]]:
    points = sorted(
        (int(k[len(prefix):]), c["value"])
        for k, c in metrics.items()
        if k.startswith(prefix) and not is_na(c)
    )
    return [p[0] for p in points], [p[1] for p in points]


def _ppl_vs_length(results: dict, path: Path) -> Path:
    tasks = results["meta"]["tasks"]
    panels = [t for t in ("ppl", "longppl") if t in tasks]
    fig = Figure(figsize=(6 * len(panels), 4.2))
    colors = _colors(len(results["models"]))  # a model keeps its colour in every panel
    for k, task in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), k + 1)
        for color, (name, m) in zip(colors, results["models"].items()):
            if task not in m["tasks"]:
                continue
            metrics = m["tasks"][task]["metrics"]
            if task == "ppl":
                xs, ys = _series(metrics, "all@")
            else:
                ctx = m["tasks"][task]["details"]["context"]
                pts = sorted((ctx[key], c["value"]) for key, c in metrics.items() if not is_na(c))
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
            if xs:
                ax.plot(xs, ys, marker="o", label=name, color=color)
        if task == "ppl":
            ax.set_xscale("log", base=2)
            ax.set_xlabel("window length (tokens)")
            ax.set_title("held-out perplexity")
        else:
            target = results["meta"]["settings"]["longppl_target"]
            ax.set_xscale("symlog", base=2, linthresh=max(1, target))
            ax.set_xlabel("preceding context (tokens)")
            ax.set_title(f"perplexity of the last {target} tokens")
        ax.set_ylabel("perplexity")
        ax.grid(alpha=0.3)
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    if len(lines) > _INSIDE_LEGEND:  # one legend for the panels, beside the last
        fig.axes[-1].legend(list(lines.values()), list(lines), **_BESIDE)
    else:
        for ax in fig.axes:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _passkey_heatmap(results: dict, name: str, path: Path) -> Path:
    details = results["models"][name]["tasks"]["passkey"]["details"]
    lengths = list(details["grid"])
    depths = details["depths"]
    values = [[details["grid"][n][str(d)]["value"] for d in depths] for n in lengths]
    fig = Figure(figsize=(1.2 + 0.9 * len(depths), 1.2 + 0.6 * len(lengths)))
    ax = fig.add_subplot(1, 1, 1)
    grid = np.ma.masked_invalid([[np.nan if v is None else v for v in row] for row in values])
    cmap = colormaps["RdYlGn"].with_extremes(bad="lightgrey")  # n/a cells in grey
    image = ax.imshow(grid, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            ax.text(j, i, "n/a" if v is None else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), lengths)
    ax.set_xlabel("depth of the key")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(f"passkey accuracy: {name}")
    fig.colorbar(image, ax=ax)
    return _save(fig, path)


def _benchmark_bars(results: dict, tasks: list[str], path: Path) -> Path:
    models = list(results["models"])
    fig = Figure(figsize=(min(20.0, max(6.0, 1.3 * len(tasks) * max(1, len(models)) ** 0.5)), 4.2))
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / len(models)
    for k, (name, color) in enumerate(zip(models, _colors(len(models)))):
        xs, ys, errs = [], [], []
        for i, task in enumerate(tasks):
            res = results["models"][name]["tasks"].get(task)
            cell = res["metrics"][res["primary"]] if res and res["primary"] else None
            if cell is None or is_na(cell):
                continue
            xs.append(i + (k - (len(models) - 1) / 2) * width)
            ys.append(cell["value"])
            errs.append(cell["stderr"] or 0.0)
        rec = results["recovery"][name]["mean"]
        label = name if is_na(rec) else f"{name} (recovery {100 * rec['value']:.1f}%)"
        ax.bar(xs, ys, width=width, yerr=errs, capsize=2, label=label, color=color)
    labels = [f"{t}\n{BENCHMARKS[t].primary}" if t in BENCHMARKS else t for t in tasks]
    ax.set_xticks(range(len(tasks)), labels, fontsize=8)
    ax.set_ylabel("score")
    ax.set_title("short-text benchmarks (± standard error)")
    ax.legend(**(_BESIDE if len(models) > _INSIDE_LEGEND else {"fontsize": 8}))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "model"
