"""The study's report: one row per arm (seeds aggregated), the training cost, the budget curve, and every
run's evaluation in full.

``results.json`` holds:

- ``study``: the command line, model, RoPE, budgets, seeds, shared restore settings, evaluation tasks
  and settings, the package versions its runs were evaluated with (each distinct set once), device, and
  which runs are unfinished or failed;
- ``arms``: per arm its description, runs, training numbers and seed-aggregated scores;
- ``runs``: every run's record (config, training numbers, evaluation settings and time), by run label;
- ``evaluation``: every run as `linearard.evaluation.evaluate` reports models (``meta``, ``models``,
  ``recovery`` against the native model);
- ``by_arm``: the same with one seed-aggregated entry per arm (what the main tables show);
- ``sweep``: per arm family the learning-rate sweep (each rate's agreement with native, the rate chosen);
- ``verdict``: where each ARD arm wins, ties or loses against each baseline (`verdict`);
- ``variants``: each variant of ARD (the ablations) against ``ard`` itself, the same way (`variants`);
- ``plots``: the PNG files written beside it.

A seed-aggregated number is the mean over seeds with, as its ``stderr``, the standard deviation over
seeds (the spread); an arm with one seed keeps its evaluation's standard error.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from linearard.evaluation.report import report_markdown, summary_tables
from linearard.evaluation.stats import format_cell, is_na, join_names
from linearard.evaluation.suite import package_versions, recovery
from linearard.study.arms import STUDY_SETTINGS, Arm, format_tokens
from linearard.study.runner import REFERENCE, Run, Study, read_json, write_json

BUDGET_PLOT = "budget_curve.png"
# Restore settings each run sets for itself (or the study reports elsewhere): left out of the shared ones.
PER_RUN_SETTINGS = (STUDY_SETTINGS - {"model", "max_tokens", "seed"}) | {"cpt_tokens"}


def study_results(study: Study, runs: Sequence[Run]) -> dict[str, Any]:
    """Everything the study measured so far, in the ``results.json`` layout (module docstring)."""
    records = {r.label: read_json(r.record_path) for r in runs}
    evaluated = [r for r in runs if records[r.label].get("evaluation")]
    per_run = _per_run_results(study, evaluated, records)
    arms = _arms_in_order(runs)
    by_arm: dict[str, Any] = {"meta": per_run["meta"], "models": {}, "recovery": {}}
    arm_info = []
    for arm in arms:
        planned = [r for r in runs if r.arm.name == arm.name]
        done = [r for r in planned if r in evaluated]
        label = _arm_label(arm, len(done), len(planned))
        info = {
            "name": arm.name,
            "base": arm.base,
            "label": label,
            "family": arm.family,
            "description": describe_arm(planned[0], study),
            "trains": arm.trains,
            "runs": [r.label for r in planned],
            "finished": [r.label for r in done],
            "training": _training_summary([records[r.label].get("training") for r in planned]),
        }
        if done and per_run["models"]:
            by_arm["models"][label] = aggregate_entries([per_run["models"][r.label] for r in done])
            by_arm["recovery"][label] = aggregate_recovery([per_run["recovery"][r.label] for r in done])
        arm_info.append(info)
    unfinished = [r.label for r in runs if r not in evaluated and r.label not in study.failures]
    results = {
        "study": _study_meta(study, unfinished),
        "arms": arm_info,
        "runs": {label: _without_entry(rec) for label, rec in records.items()},
        "evaluation": per_run,
        "by_arm": by_arm,
        "sweep": sweep_summary(study),
    }
    results["verdict"] = verdict(results)
    results["variants"] = variants(results)
    return results


def write_report(results: dict[str, Any], output: Path, *, plots: bool = True) -> list[Path]:
    """Write results.json, report.md and (with `plots`) the PNG plots into `output`; returns the paths."""
    from linearard.evaluation.plots import write_plots
    from linearard.study.plots import budget_curve

    previous = [name for name in read_json(output / "results.json").get("plots", []) if _is_plot_name(name)]
    written: list[Path] = []
    if plots and results["evaluation"]["models"]:
        written += write_plots(results["evaluation"], output)
        curve = budget_curve(budget_points(results), results["by_arm"], output / BUDGET_PLOT)
        if curve is not None:
            written.append(curve)
        for stale in set(previous) - {p.name for p in written}:  # e.g. the heatmap of a run no longer listed
            (output / stale).unlink(missing_ok=True)
    names = [p.name for p in written]
    results["plots"] = names if plots else previous
    write_json(output / "results.json", results)
    (output / "report.md").write_text(report_text(results, names))
    return [output / "results.json", output / "report.md", *written]


def _is_plot_name(name: str) -> bool:
    return isinstance(name, str) and Path(name).name == name and name.endswith(".png")


def main_tables(results: dict[str, Any]) -> str:
    """One row per arm: short-text scores with recovery %, long-context scores, training cost."""
    parts = []
    if results["by_arm"]["models"]:
        parts.append(summary_tables(results["by_arm"]))
    parts.append(_training_table(results))
    return "\n\n".join(parts)


def report_text(results: dict[str, Any], plots: list[str]) -> str:
    s = results["study"]
    rope = s["rope"]
    lines = [
        f"# LinearARD study: {s['model']}, {rope['description']}",
        "",
        f"Every arm starts from the same native model and trains with the same data, data order and seed"
        f" ({_seeds_text(s)}) on its token budget (default {format_tokens(s['max_tokens'])}) in optimizer steps of "
        f"{s['tokens_per_step']:,} tokens whatever its block length{_sweep_phrase(s)}; `+cpt` arms spend "
        f"{s['cpt_share']:.1%} of theirs on the second, next-token stage on long blocks. `scaled` is the "
        f"untrained student (`{s['scaled_spec']}`). Every run is evaluated with the same tasks and settings; "
        "recovery % compares with the native model.",
        f"Training device: {s['device']}; GPU time of all training runs: {_hours(s['gpu_seconds'])}.",
        "",
        "```",
        s["command"],
        "```",
        "",
        "## Results",
        "",
        "Numbers are `value ± standard error`; for arms run with several seeds, `mean ± standard deviation "
        "over the seeds`.",
        "",
        main_tables(results),
        "",
    ]
    if s["failed"] or s["unfinished"]:
        lines += ["**Not in the tables yet:** "
                  + "; ".join([f"{k} failed ({v})" for k, v in s["failed"].items()]
                              + [f"{k} unfinished" for k in s["unfinished"]]), ""]
    if results["verdict"]:
        lines += ["## ARD against each baseline", "", VERDICT_NOTE, "",
                  *[f"- {v['text']}" for v in results["verdict"]], ""]
    if results["variants"]:
        lines += ["## ARD's variants against ARD", "", VARIANTS_NOTE, "",
                  *[f"- {v['text']}" for v in results["variants"]], ""]
    curve = budget_sentences(results)
    if curve or BUDGET_PLOT in plots:
        lines += ["## Token budget", "", *curve, "", _budget_table(results), ""]
        if BUDGET_PLOT in plots:
            lines += [f"![budget curve]({BUDGET_PLOT})", ""]
    if results["sweep"]:
        lines += ["## Learning-rate sweep", "", _sweep_text(results), ""]
    lines += ["## Arms", ""] + [f"- `{a['name']}`: {a['description']}" for a in results["arms"]] + [""]
    if results["evaluation"]["models"]:
        evaluation_plots = [p for p in plots if p != BUDGET_PLOT]
        lines += ["## Every run", "", *_demoted(report_markdown(results["evaluation"], evaluation_plots))]
    return "\n".join(lines) + "\n"


# -- aggregation ------------------------------------------------------------------------------------


def spread_cell(cells: Sequence[dict]) -> dict:
    """Mean over seeds with the standard deviation over seeds as ``stderr`` (one measured seed: as is).

    Example:
        >>> spread_cell([{"value": 1.0, "stderr": 0.1, "n": 9}, {"value": 3.0, "stderr": 0.1, "n": 9}])
        {'value': 2.0, 'stderr': 1.4142135623730951, 'n': 2, 'spread': 'std over 2 seeds'}
    """
    measured = [c for c in cells if not is_na(c)]
    if not measured:
        return dict(cells[0])
    if len(measured) == 1:
        return dict(measured[0])
    values = [c["value"] for c in measured]
    return {"value": statistics.fmean(values), "stderr": statistics.stdev(values), "n": len(values),
            "spread": f"std over {len(values)} seeds"}


def aggregate_entries(entries: Sequence[dict]) -> dict:
    """One evaluation entry from several seeds' entries of the same arm (metrics via `spread_cell`)."""
    first = entries[0]
    if len(entries) == 1:
        return first
    tasks = {}
    for task, res in first["tasks"].items():
        metrics = {m: spread_cell([e["tasks"][task]["metrics"][m] for e in entries]) for m in res["metrics"]}
        tasks[task] = {**res, "metrics": metrics}  # details (grids, answers) stay those of the first seed
    seconds = {t: round(sum(e["seconds"].get(t, 0.0) for e in entries), 2) for t in first["seconds"]}
    return {**first, "tasks": tasks, "seconds": seconds}


def aggregate_recovery(recoveries: Sequence[dict]) -> dict:
    tasks = {t: spread_cell([r["tasks"][t] for r in recoveries if t in r["tasks"]]) for t in recoveries[0]["tasks"]}
    return {"tasks": tasks, "mean": spread_cell([r["mean"] for r in recoveries])}


def budget_points(results: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """family -> points ``{"tokens", "label", "recovery", "kl", "top1"}`` (cells) for every family of
    trained arms evaluated at two or more token budgets, sorted by tokens."""
    by_arm = results["by_arm"]
    families: dict[str, list[dict[str, Any]]] = {}
    for info in results["arms"]:
        label = info["label"]
        tokens = info["training"].get("tokens")
        if not info["trains"] or label not in by_arm["models"] or tokens is None:
            continue
        agreement = by_arm["models"][label]["tasks"].get("agreement", {}).get("metrics", {})
        families.setdefault(info["family"], []).append({
            "tokens": tokens,
            "label": label,
            "recovery": by_arm["recovery"][label]["mean"],
            "kl": agreement.get("kl"),
            "top1": agreement.get("top1"),
        })
    return {f: sorted(p, key=lambda x: x["tokens"]) for f, p in families.items()
            if len({x["tokens"] for x in p}) >= 2}


# -- sweep, verdict, budget --------------------------------------------------------------------------

VERDICT_NOTE = (
    "Each line compares an ARD arm with a baseline on the same held-out text: the difference ± its "
    "combined standard error (the two errors in quadrature; an arm run with several seeds brings its spread "
    "over the seeds). **Wins** / **loses**: the difference is beyond "
    "2 standard errors in ARD's favour / against it; **ties**: within 2. Next-token KL and top-1 "
    "agreement with the native model measure restoration; perplexity and recovery can also reward "
    "fitting the training text's domain (a student can beat its teacher there). The errors of KL and top-1 "
    "come from single positions, which neighbouring positions make look smaller than they are; a margin "
    "that matters should hold over several seeds."
)
VARIANTS_NOTE = (
    "Each line compares a variant of ARD (the ablations: which relations, which layers, which adapter) with "
    "`ard` itself at the same token budget, by the rule above: **wins** means the variant does better."
)
# (label, task, metric, lower is better) of the verdict; recovery is the by-arm mean.
VERDICT_METRICS = (
    ("next-token KL", "agreement", "kl", True),
    ("top-1 agreement", "agreement", "top1", False),
    ("recovery %", None, "recovery", False),
)


def sweep_summary(study: Study) -> dict[str, Any]:
    """family -> ``{"tokens", "points": [{"lr", "label", "kl", "top1", "failed"}], "chosen"}``."""
    out: dict[str, Any] = {}
    for run in study.sweep_runs:
        record = read_json(run.record_path)
        metrics = ((record.get("evaluation") or {}).get("entry") or {}).get("tasks", {}).get("agreement", {})
        metrics = metrics.get("metrics", {})
        family = out.setdefault(run.arm.family, {"tokens": run.config.max_tokens, "points": [], "chosen": None})
        family["points"].append({"lr": run.sweep_lr, "label": run.label, "kl": metrics.get("kl"),
                                 "top1": metrics.get("top1"), "failed": record.get("failed")})
    for family, info in out.items():
        info["chosen"] = study.chosen_lr(family)[0]
    return out


def verdict(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Where each full-budget ARD arm (``ard``, ``ard+cpt``) wins, ties or loses against each baseline.

    Returns one item per (ARD arm, baseline): ``{"ard", "baseline", "metrics": [{"name", "ard",
    "baseline", "difference", "stderr", "outcome"}], "text"}``; outcome is ``wins``, ``ties``,
    ``loses`` or ``n/a``.
    """
    by_arm = results["by_arm"]
    labels = {a["name"]: a["label"] for a in results["arms"] if a["label"] in by_arm["models"]}
    bases = {a["name"]: a["base"] for a in results["arms"]}
    ard_arms = [n for n in ("ard", "ard+cpt") if n in labels]
    baselines = [n for n in labels if n != "native" and not bases.get(n, n).startswith("ard") and "@" not in n]
    return [_versus(by_arm, (ard, labels[ard]), (baseline, labels[baseline]))
            for ard in ard_arms for baseline in baselines]


def variants(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Each variant of ARD (other relations, layers or adapter: the ablations) against ``ard`` itself at
    the same token budget, in :func:`verdict`'s terms: ``wins`` means the variant does better."""
    by_arm = results["by_arm"]
    arms = {a["name"]: a for a in results["arms"] if a["label"] in by_arm["models"]}
    if "ard" not in arms:
        return []
    ard = arms["ard"]
    tokens = ard["training"].get("tokens")
    return [_versus(by_arm, (a["name"], a["label"]), ("ard", ard["label"])) for a in arms.values()
            if a["base"] == "ard" and a["family"] != "ard" and a["training"].get("tokens") == tokens]


def _versus(by_arm: dict, arm: tuple[str, str], baseline: tuple[str, str]) -> dict[str, Any]:
    """One arm against another (each ``(name, label)``) on :data:`VERDICT_METRICS`."""
    metrics = []
    for name, task, metric, lower in VERDICT_METRICS:
        a, b = (_verdict_cell(by_arm, label, task, metric) for _, label in (arm, baseline))
        metrics.append({"name": name, "ard": a, "baseline": b, **_compare(a, b, lower)})
    pieces = [_compare_text(m) for m in metrics if m["outcome"] != "n/a"]
    text = f"**{arm[0]} vs {baseline[0]}**: " + ("; ".join(pieces) if pieces else "nothing measured on both")
    return {"ard": arm[0], "baseline": baseline[0], "metrics": metrics, "text": text}


def _verdict_cell(by_arm: dict, label: str, task: str | None, metric: str) -> dict | None:
    if task is None:
        return by_arm["recovery"].get(label, {}).get("mean")
    return by_arm["models"][label]["tasks"].get(task, {}).get("metrics", {}).get(metric)


def _compare(a: dict | None, b: dict | None, lower_is_better: bool) -> dict[str, Any]:
    """Difference a - b, its combined standard error, and whether a wins, ties or loses (2-SE rule)."""
    if not a or not b or is_na(a) or is_na(b):
        return {"difference": None, "stderr": None, "outcome": "n/a"}
    diff = a["value"] - b["value"]
    errors = [c.get("stderr") for c in (a, b)]
    se = math.sqrt(sum(e * e for e in errors)) if all(e is not None for e in errors) else None
    better = diff < 0 if lower_is_better else diff > 0
    if diff == 0 or (se is not None and abs(diff) <= 2 * se):
        outcome = "ties"
    else:
        outcome = "wins" if better else "loses"
    return {"difference": diff, "stderr": se, "outcome": outcome}


def _compare_text(m: dict[str, Any]) -> str:
    percent = m["name"] == "recovery %"
    scale, digits = (100.0, 1) if percent else (1.0, 4 if m["name"] == "next-token KL" else 3)
    a, b, d = m["ard"]["value"] * scale, m["baseline"]["value"] * scale, m["difference"] * scale
    error = f" ± {m['stderr'] * scale:.{digits}f}" if m["stderr"] is not None else " (no standard error)"
    return f"{m['outcome']} on {m['name']} ({a:.{digits}f} vs {b:.{digits}f}: {d:+.{digits}f}{error})"


def budget_sentences(results: dict[str, Any]) -> list[str]:
    """What the budget curve shows, in words: per family, first and last point, and whether the last
    increase of the budget still moved recovery and KL beyond 2 standard errors."""
    lines = []
    for family, points in budget_points(results).items():
        first, last = points[0], points[-1]
        parts = []
        for key, name, lower in (("recovery", "recovery", False), ("kl", "next-token KL", True)):
            if not (first[key] and last[key]) or is_na(first[key]) or is_na(last[key]):
                continue
            scale, unit, digits = (100.0, " %", 1) if key == "recovery" else (1.0, "", 4)
            step = _compare(last[key], points[-2][key], lower) if points[-2][key] else {"outcome": "n/a"}
            tail = {"wins": "still improving", "ties": "flat within 2 standard errors",
                    "loses": "worse", "n/a": "not measured"}[step["outcome"]]
            first_at, last_at, before = (format_tokens(p["tokens"], exact=False) for p in (first, last, points[-2]))
            parts.append(f"{name} {first[key]['value'] * scale:.{digits}f}{unit} at {first_at} → "
                         f"{last[key]['value'] * scale:.{digits}f}{unit} at {last_at} (from {before}: {tail})")
        if parts:
            lines.append(f"- `{family}`: " + "; ".join(parts) + ".")
    return lines


def _sweep_text(results: dict[str, Any]) -> str:
    sweep = results["sweep"]
    rates = sorted({p["lr"] for info in sweep.values() for p in info["points"]})
    rows = ["Each arm trained at every rate on the sweep budget; the full run took the rate whose model had "
            "the lowest next-token KL to the native model on validation text (Othello, King Lear, Macbeth) "
            "that no short-text evaluation uses. Cells: KL ± standard error (top-1 agreement).", "",
            "| arm | sweep tokens | " + " | ".join(f"lr {r:g}" for r in rates) + " | chosen |",
            "|---|---|" + "---|" * len(rates) + "---|"]
    for family, info in sweep.items():
        cells = []
        for rate in rates:
            point = next((p for p in info["points"] if p["lr"] == rate), None)
            if point is None:
                cells.append("")
            elif point["failed"]:
                cells.append("failed")
            elif not point["kl"] or is_na(point["kl"]):
                cells.append("not run yet")
            else:
                text = format_cell(point["kl"], digits=4)
                if point["top1"] and not is_na(point["top1"]):
                    text += f" ({point['top1']['value']:.3f})"
                cells.append(f"**{text}**" if rate == info["chosen"] else text)
        chosen = f"{info['chosen']:g}" if info["chosen"] is not None else "—"
        rows.append(f"| {family} | {format_tokens(info['tokens'])} | " + " | ".join(cells) + f" | {chosen} |")
    edges = sweep_edges(sweep, *_full_and_untrained_kl(results))
    return "\n".join(rows + (["", *edges] if edges else []))


def _full_and_untrained_kl(results: dict[str, Any]) -> tuple[dict[str, float], float | None]:
    """Next-token KL to native on held-out text of each family's full-budget arm, and of the untrained
    student (``scaled``) when the study has it."""
    by_arm = results["by_arm"]

    def kl(label: str) -> float | None:
        cell = _verdict_cell(by_arm, label, "agreement", "kl") if label in by_arm["models"] else None
        return None if not cell or is_na(cell) else cell["value"]

    arms = {a["name"]: a["label"] for a in results["arms"]}
    full = {f: v for f in results["sweep"] if f in arms and (v := kl(arms[f])) is not None}
    return full, kl(arms["scaled"]) if "scaled" in arms else None


def sweep_edges(sweep: dict[str, Any], full_kl: dict[str, float] | None = None,
                untrained_kl: float | None = None) -> list[str]:
    """A sentence for the arms whose chosen rate is the lowest or the highest their sweep tried: the best
    rate may lie beyond it, so the sweep did not settle it. An arm at the lowest rate whose full run
    (``full_kl``, by family) agrees with native less than the untrained student (``untrained_kl``) is
    said so instead: a lower rate there only comes closer to not training."""
    full_kl = full_kl or {}
    ends: dict[str, list[str]] = {"lowest": [], "highest": [], "away": []}
    for family, info in sweep.items():
        rates = sorted(p["lr"] for p in info["points"])
        if info["chosen"] is None or len(rates) < 2:
            continue
        if info["chosen"] == rates[0]:
            away = untrained_kl is not None and full_kl.get(family, -math.inf) > untrained_kl
            ends["away" if away else "lowest"].append(family)
        elif info["chosen"] == rates[-1]:
            ends["highest"].append(family)
    way = {"lowest": "lower", "highest": "higher"}
    lines = [f"The best rate was the {end} the sweep tried for {join_names(families)}: a {way[end]} one may be better "
             f"still; add it to `--lr-sweep` (the finished sweep runs count again)."
             for end, families in ends.items() if families and end in way]
    if ends["away"]:
        runs = "full run agrees" if len(ends["away"]) == 1 else "full runs agree"
        kls = join_names([f"{full_kl[f]:.4f}" for f in ends["away"]])
        lines.append(f"The best rate was the lowest the sweep tried for {join_names(ends['away'])}, but there the "
                     f"{runs} with the native model less than the untrained student (next-token KL {kls} "
                     f"against {untrained_kl:.4f}) and every higher rate agreed less still: a lower rate only "
                     f"comes closer to not training; the objective, not the rate, limits the agreement.")
    return lines


def _sweep_phrase(s: dict[str, Any]) -> str:
    if not s.get("lr_sweep"):
        return ""
    rates = ", ".join(f"{r:g}" for r in s["lr_sweep"])
    return (f", at the learning rate of {rates} that its {format_tokens(s['sweep_tokens'])}-token sweep run "
            "found closest to the native model")


# -- pieces -----------------------------------------------------------------------------------------


def describe_arm(run: Run, study: Study) -> str:
    """What an arm does, in one line (from its first run's settings and stages)."""
    if run.arm.base == REFERENCE:
        return f"the original model with its native RoPE, untrained (the reference; `{run.spec}`)"
    if not run.arm.trains:
        return f"the original weights with the student's RoPE ({study.scaling.describe()}), untrained"
    c = run.config
    stages = []
    for stage in run.stages:
        what = "next-token loss" if stage.objective.name == "cpt" else f"{stage.objective.name} distillation"
        stages.append(f"{what} on {stage.seq_len}-token blocks for {format_tokens(stage.tokens, exact=False)} tokens")
    extras = []
    ard = c.objective_spec().term("ard")
    if ard is not None:
        extras.append("relations " + ", ".join(f"{r.upper()}/{r.upper()}" + ("" if w == 1 else f" ×{w:g}")
                                                for r, w in ard.options["relations"].items() if w > 0))
    if c.layers is not None:
        extras.append(f"layers {c.layers}")
    if c.weights:
        extras.append("weights " + ", ".join(f"{k} {w:g}" for k, w in c.weights.items()))
    extras += [f"{k} = {v}" for k, v in run.arm.settings]
    text = ", then ".join(stages)
    return text + (f" ({'; '.join(extras)})" if extras else "")


def _per_run_results(study: Study, evaluated: Sequence[Run], records: dict[str, dict]) -> dict[str, Any]:
    reference = next((r for r in evaluated if r.arm.base == REFERENCE), None)
    if reference is None:
        return {"meta": {}, "models": {}, "recovery": {}}
    ref_eval = records[reference.label]["evaluation"]
    ref_entry = ref_eval["entry"]
    meta = dict(ref_eval["meta"])
    meta.update(tasks=study.s.tasks, reference=reference.label,
                seconds=sum(records[r.label]["evaluation"]["seconds"] for r in evaluated))
    models = {r.label: records[r.label]["evaluation"]["entry"] for r in evaluated}
    models[reference.label] = ref_entry  # the same object: recovery of the reference is exactly 1
    return {
        "meta": meta,
        "models": models,
        "recovery": {label: recovery(entry, ref_entry) for label, entry in models.items()},
    }


def _without_entry(record: dict) -> dict:
    """A run's record without its evaluation entry, which ``evaluation.models`` holds already."""
    if "evaluation" not in record:
        return record
    evaluation = {k: v for k, v in record["evaluation"].items() if k != "entry"}
    return {**record, "evaluation": evaluation}


def _arms_in_order(runs: Sequence[Run]) -> list[Arm]:
    arms: list[Arm] = []
    for r in runs:
        if r.arm not in arms:
            arms.append(r.arm)
    return arms


def _arm_label(arm: Arm, done: int, planned: int) -> str:
    if planned <= 1:
        return arm.name
    if done == planned:
        return f"{arm.name} ({planned} seeds)"
    return f"{arm.name} ({done} of {planned} seeds)"


def _training_summary(trainings: Sequence[dict | None]) -> dict[str, Any]:
    done = [t for t in trainings if t]
    if not done:
        return {}
    seconds = [t["seconds"] for t in done]
    peaks = [t["peak_memory_bytes"] for t in done if t.get("peak_memory_bytes")]
    return {
        "tokens": round(statistics.fmean(t["tokens"] for t in done)),
        "stages": done[0]["stages"],
        "seconds": statistics.fmean(seconds),
        "seconds_spread": statistics.stdev(seconds) if len(seconds) > 1 else None,
        "gpu_seconds": sum(t["seconds"] * t["gpus"] for t in done),
        "peak_memory_bytes": max(peaks) if peaks else None,
        "resumed": any(t["resumed"] for t in done),
        "runs": len(done),
    }


def _training_table(results: dict[str, Any]) -> str:
    rows = ["### Training", "",
            "| arm | tokens | stages (tokens × block length, steps) | train time | GPU time | peak GPU memory |",
            "|---|---|---|---|---|---|"]
    for info in results["arms"]:
        t = info["training"]
        if not info["trains"]:
            rows.append(f"| {info['label']} | — | no training | — | — | — |")
            continue
        if not t:
            rows.append(f"| {info['label']} | not trained yet | | | | |")
            continue
        stages = " + ".join(f"{s['objective']} {format_tokens(s['tokens'], exact=False)} × {s['seq_len']} "
                            f"({s['steps']} steps)" for s in t["stages"])
        time_text = _duration(t["seconds"])
        if t["seconds_spread"] is not None:
            time_text += f" ± {_duration(t['seconds_spread'])}"
        if t["resumed"]:
            time_text += " (resumed: last session only)"
        memory = f"{t['peak_memory_bytes'] / 2**30:.1f} GiB" if t["peak_memory_bytes"] else "—"
        rows.append(f"| {info['label']} | {format_tokens(t['tokens'], exact=False)} | {stages} | {time_text} | "
                    f"{_hours(t['gpu_seconds'])} | {memory} |")
    return "\n".join(rows)


def _budget_table(results: dict[str, Any]) -> str:
    rows = ["| arm | tokens | recovery % | KL | top-1 |", "|---|---|---|---|---|"]
    for points in budget_points(results).values():
        for p in points:
            cells = [format_cell(p["recovery"], digits=1, percent=True),
                     *(format_cell(p[k], digits=4 if k == "kl" else 3) if p[k] else "—" for k in ("kl", "top1"))]
            rows.append(f"| {p['label']} | {format_tokens(p['tokens'], exact=False)} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _demoted(markdown: str) -> list[str]:
    """The evaluation report one heading level down, without its own title."""
    lines = markdown.splitlines()
    while lines and (lines[0].startswith("# ") or not lines[0].strip()):
        lines = lines[1:]
    return [("#" + line) if re.match(r"#+ ", line) else line for line in lines]


def _study_meta(study: Study, unfinished: list[str]) -> dict[str, Any]:
    import torch

    s = study.s
    scaling = study.scaling
    gpu_seconds, devices, versions = 0.0, [], []
    for run in [*study.runs, *study.sweep_runs]:
        record = read_json(run.record_path)
        evaluated = (record.get("evaluation") or {}).get("meta", {}).get("versions")
        if evaluated and evaluated not in versions:
            versions.append(evaluated)
        training = record.get("training")
        if training:
            gpu_seconds += training["seconds"] * training["gpus"]
            if training.get("device") and training["device"] not in devices:
                devices.append(training["device"])
    if not devices:  # nothing trained yet: where this study runs
        cuda = torch.cuda.is_available() and s.base.device != "cpu"
        devices = [torch.cuda.get_device_name() if cuda else f"CPU ({platform.machine()})"]
    return {
        "command": s.command,
        "argv": s.argv,
        "model": s.base.model,
        "rope": {"type": scaling.rope_type, "factor": scaling.factor, "native_length": scaling.original_length,
                 "target_length": scaling.target_length, "description": scaling.describe()},
        "scaled_spec": next((r.spec for r in study.runs if r.arm.base == "scaled"),
                            f"{s.base.model}@{scaling.rope_type}:{scaling.factor:g}"),
        "arms": [a.name for a in s.arms],
        "seeds": s.seeds,
        "seed": s.base.seed,
        "max_tokens": s.base.max_tokens,
        "cpt_share": s.cpt_share,
        "tokens_per_step": study.tokens_per_step,
        "lr_sweep": list(s.lr_sweep),
        "sweep_tokens": s.sweep_tokens if s.lr_sweep else None,
        # What every trained arm shares; the arm-specific settings are in each run's record.
        "restore_settings": {k: v for k, v in s.base.to_dict().items() if k not in PER_RUN_SETTINGS},
        "tasks": s.tasks,
        "eval_settings": json.loads(json.dumps(dataclasses.asdict(s.eval_settings))),  # as used, batch sizes too
        "eval_fingerprint": study.fingerprint(),
        "device": ", ".join(devices),  # where the runs trained, as their records say
        "gpu_seconds": gpu_seconds,
        # what the runs were evaluated with, as their records say; before any evaluation, this process's
        "versions": versions or [package_versions()],
        "unfinished": unfinished,
        "failed": dict(study.failures),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _seeds_text(s: dict[str, Any]) -> str:
    if s["seeds"] == 1:
        return f"seed {s['seed']}"
    return f"seeds {s['seed']}..{s['seed'] + s['seeds'] - 1} for every trained arm"


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {sec:02d}s"


def _hours(seconds: float) -> str:
    if not seconds:
        return "—"
    return f"{seconds / 3600:.2f} GPU-h" if seconds >= 360 else f"{seconds / 60:.1f} GPU-min"

