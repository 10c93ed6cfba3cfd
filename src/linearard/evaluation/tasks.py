"""The names of the evaluation tasks and groups (importing this module loads no model code).

Short text: ``ppl``, ``agreement``, the benchmarks below, ``chat`` and ``lm_eval:<task>``.
Long context: ``passkey``, the RULER-style tasks and ``longppl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from linearard.errors import UserError


@dataclass(frozen=True)
class Benchmark:
    """A zero-shot benchmark: its metrics, the headline one, and which split is scored."""

    name: str
    metrics: tuple[str, ...]  # acc, acc_norm (multiple choice) or acc, ppl (LAMBADA, greedy last word)
    primary: str
    split: str


BENCHMARKS = {
    b.name: b
    for b in (
        Benchmark("hellaswag", ("acc", "acc_norm"), "acc_norm", "validation (10,042)"),
        Benchmark("arc_easy", ("acc", "acc_norm"), "acc", "validation (570)"),
        Benchmark("arc_challenge", ("acc", "acc_norm"), "acc_norm", "validation (299)"),
        Benchmark("piqa", ("acc", "acc_norm"), "acc", "validation (1,838)"),
        Benchmark("winogrande", ("acc",), "acc", "winogrande_xl validation (1,267)"),
        Benchmark("mmlu", ("acc",), "acc", "test, 57 subjects (14,042)"),
        Benchmark("lambada", ("acc", "ppl"), "acc", "lambada_openai test (5,153)"),
    )
}
RULER_TASKS = ("niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery", "vt", "cwe", "fwe")
SHORT_TASKS = ("ppl", "agreement", *BENCHMARKS, "chat")
LONG_TASKS = ("passkey", *RULER_TASKS, "longppl")
TASK_GROUPS = {
    "all": SHORT_TASKS + LONG_TASKS,
    "short": SHORT_TASKS,
    "long": LONG_TASKS,
    "benchmarks": tuple(BENCHMARKS),
    "ruler": RULER_TASKS,
}
LM_EVAL_PREFIX = "lm_eval:"


def resolve_tasks(tasks: str | Sequence[str] | None) -> list[str]:
    """Expand groups (``all``, ``short``, ``long``, ``benchmarks``, ``ruler``) and check names.

    Example:
        >>> resolve_tasks("ppl,ruler")[:3]
        ['ppl', 'niah_single', 'niah_multikey']
    """
    if tasks is None:
        names = ["all"]
    elif isinstance(tasks, str):
        names = [t.strip() for t in tasks.split(",") if t.strip()]
    else:
        names = list(tasks)
    out: list[str] = []
    for name in names:
        if name in TASK_GROUPS:
            expanded = list(TASK_GROUPS[name])
        elif name in SHORT_TASKS or name in LONG_TASKS or is_lm_eval_task(name):
            expanded = [name]
        else:
            valid = ", ".join([*TASK_GROUPS, *SHORT_TASKS, *LONG_TASKS, "lm_eval:<task>"])
            raise UserError(f"unknown task {name!r}; valid tasks: {valid}")
        out.extend(t for t in expanded if t not in out)
    if not out:
        raise UserError("no tasks given")
    return out


def is_lm_eval_task(name: str) -> bool:
    return name.startswith(LM_EVAL_PREFIX) and len(name) > len(LM_EVAL_PREFIX)


def is_short(task: str) -> bool:
    return task in SHORT_TASKS or is_lm_eval_task(task)
