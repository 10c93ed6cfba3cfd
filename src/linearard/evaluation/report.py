"""results.json, report.md and the summary tables of an evaluation.

results.json holds everything :func:`linearard.evaluation.evaluate` returns: ``meta`` (tasks,
settings incl. limits and seeds, device, dtype, package versions, time), ``models`` (per model:
spec, supported length, parameter count, per-task results with every metric as ``{"value",
"stderr", "n"}`` or ``{"value": null, "note"}``, seconds per task) and ``recovery``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

from linearard.evaluation.stats import average_cells, format_cell, is_na
from linearard.evaluation.tasks import BENCHMARKS, LM_EVAL_PREFIX, RULER_TASKS


def write_outputs(results: dict, output_dir: str | Path) -> list[Path]:
    """Write results.json, report.md and the PNG plots into `output_dir`; returns the paths."""
    from linearard.evaluation.plots import write_plots

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=2, allow_nan=False) + "\n")
    plots = write_plots(results, out)
    (out / "report.md").write_text(report_markdown(results, [p.name for p in plots]))
    return [out / "results.json", out / "report.md", *plots]


def summary_tables(results: dict) -> str:
    """The main tables (short-text with recovery, long-context) as Markdown."""
    parts = []
    short = _short_columns(results)
    if short:
        parts.append(_table("Short text", results, short))
    long = _long_columns(results)
    if long:
        parts.append(_table("Long context", results, long))
    return "\n\n".join(parts)


def report_markdown(results: dict, plots: list[str]) -> str:
    meta = results["meta"]
    s = meta["settings"]
    lines = [
        "# Evaluation report",
        "",
        f"Reference (original) model: **{meta['reference']}**. Device: {meta['device']} "
        f"({meta['device_name']}), dtype {meta['dtype']}, {meta['seconds']:.0f} s in all.",
        f"Benchmark items: {'all' if s['limit'] is None else s['limit']} per task (seed {s['seed']}); "
        f"long-context lengths {', '.join(map(str, s['lengths']))}; "
        f"{s['samples']} prompt(s) per passkey cell and RULER-style length.",
        "Every number is `value ± standard error`. Recovery = model / reference per short-text metric "
        "(reference / model for perplexity), averaged per task, then over tasks; agreement and chat "
        "compare with the reference directly and are not part of it.",
        "",
        summary_tables(results),
        "",
        "## Models",
        "",
        "| model | spec | supported length | parameters | seconds |",
        "|---|---|---|---|---|",
    ]
    for name, m in results["models"].items():
        lines.append(f"| {name} | `{m['spec']}` | {m['supported_length']} | {m['parameters']:,} | "
                     f"{sum(m['seconds'].values()):.0f} |")
    lines += ["", "## Every task", ""]
    for task in meta["tasks"]:
        lines += _task_section(results, task)
    if plots:
        lines += ["## Plots", ""] + [f"![{p}]({p})" for p in plots] + [""]
    v = meta["versions"]
    lines += ["## Versions", "", ", ".join(f"{k} {val}" for k, val in v.items()) + f"; {meta['time']}.", ""]
    return "\n".join(lines)


def _short_columns(results: dict) -> list[tuple[str, Callable]]:
    tasks = results["meta"]["tasks"]
    cols = []
    if "ppl" in tasks:
        for length in results["meta"]["settings"]["ppl_lengths"]:
            cols.append((f"ppl@{length}", _metric("ppl", f"all@{length}", digits=2)))
    if "agreement" in tasks:
        cols += [("KL", _metric("agreement", "kl", digits=4)), ("top-1", _metric("agreement", "top1"))]
    for task in tasks:
        if task in BENCHMARKS:
            cols.append((f"{task} {BENCHMARKS[task].primary}", _metric(task, BENCHMARKS[task].primary)))
        elif task.startswith(LM_EVAL_PREFIX):
            cols.append((task, _primary(task)))
    if "chat" in tasks:
        cols += [("chat EM", _metric("chat", "exact_match")), ("chat F1", _metric("chat", "token_f1"))]
    if cols:
        cols.append(("recovery %", lambda res, name: format_cell(res["recovery"][name]["mean"], digits=1,
                                                                   percent=True)))
    return cols


def _long_columns(results: dict) -> list[tuple[str, Callable]]:
    tasks = results["meta"]["tasks"]
    lengths = results["meta"]["settings"]["lengths"]
    cols = []
    if "passkey" in tasks:
        cols += [(f"passkey@{n}", _metric("passkey", f"acc@{n}")) for n in lengths]
    ruler = [t for t in tasks if t in RULER_TASKS]
    if ruler:
        cols += [(f"RULER@{n} ({len(ruler)} tasks)", _ruler_mean(ruler, n)) for n in lengths]
    if "longppl" in tasks:
        target = results["meta"]["settings"]["longppl_target"]
        for n in [target, *sorted(n for n in lengths if n > target)]:
            cols.append((f"longppl@{n}", _metric("longppl", f"ppl@{n}", digits=2)))
    return cols


def _metric(task: str, metric: str, digits: int = 3):
    def get(results: dict, name: str) -> str:
        res = results["models"][name]["tasks"].get(task)
        cell = res["metrics"].get(metric) if res else None
        return format_cell(cell, digits=digits) if cell else "—"

    return get


def _primary(task: str):
    def get(results: dict, name: str) -> str:
        res = results["models"][name]["tasks"].get(task)
        return format_cell(res["metrics"][res["primary"]]) if res and res["primary"] else "—"

    return get


def _ruler_mean(tasks: list[str], length: int):
    def get(results: dict, name: str) -> str:
        done = results["models"][name]["tasks"]
        cells = [done[t]["metrics"][f"score@{length}"] for t in tasks if t in done]
        measured = [c for c in cells if not is_na(c)]
        if measured:
            return format_cell(average_cells(measured))
        return cells[0].get("note", "n/a") if cells else "—"

    return get


def _table(title: str, results: dict, cols) -> str:
    header = "| model | " + " | ".join(c for c, _ in cols) + " |"
    rule = "|---" * (len(cols) + 1) + "|"
    rows = [f"| {name} | " + " | ".join(fn(results, name) for _, fn in cols) + " |"
            for name in results["models"]]
    return "\n".join([f"### {title}", "", header, rule, *rows])


def _task_section(results: dict, task: str) -> list[str]:
    models = {name: m for name, m in results["models"].items() if task in m["tasks"]}
    if not models:
        return []
    first = next(iter(models.values()))["tasks"][task]
    metrics = list(first["metrics"])
    lines = [f"### {task}", ""]
    extra = first["details"]
    if task in BENCHMARKS:
        lines += [f"{BENCHMARKS[task].split}; {extra['items']} of {extra['of']} items scored.", ""]
    if task == "longppl":
        ctx = extra["context"]
        pairs = ", ".join(f"{m} → {ctx[m]}" for m in metrics)
        lines += [f"Context before the scored tokens: {pairs} tokens; {extra['target']} tokens scored.", ""]
    lines += ["| model | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for name, m in models.items():
        cells = m["tasks"][task]["metrics"]
        lines.append(f"| {name} | " + " | ".join(format_cell(cells[k]) if k in cells else "—" for k in metrics)
                     + " |")
    lines.append("")
    if task == "passkey":
        for name, m in models.items():
            grid = m["tasks"][task]["details"]["grid"]
            depths = m["tasks"][task]["details"]["depths"]
            lines += [f"Passkey grid, {name} (rows: length, columns: depth):", "",
                      "| length | " + " | ".join(str(d) for d in depths) + " |",
                      "|---" * (len(depths) + 1) + "|"]
            for length, row in grid.items():
                cells = [format_cell(row[str(d)], digits=2, with_error=False) for d in depths]
                lines.append(f"| {length} | " + " | ".join(cells) + " |")
            lines.append("")
    if task == "chat":
        lines += _chat_answers(models)
    return lines


def _chat_answers(models: dict) -> list[str]:
    with_answers = {n: m["tasks"]["chat"]["details"].get("answers") for n, m in models.items()}
    with_answers = {n: a for n, a in with_answers.items() if a}
    if not with_answers:
        return []
    names = list(with_answers)
    lines = ["Answers:", "", "| prompt | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    first = with_answers[names[0]]
    for i, row in enumerate(first):
        cells = [_short_text(with_answers[n][i]["answer"]) for n in names]
        lines.append(f"| {_short_text(row['prompt'])} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def _short_text(text: str, limit: int = 90) -> str:
    text = re.sub(r"\s+", " ", text).replace("|", "\\|").strip()
    return text if len(text) <= limit else text[:limit - 1] + "…"
