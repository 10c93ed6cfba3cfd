"""Evaluation of original, scaled and restored models side by side (`linearard eval`).

:func:`evaluate` runs any set of tasks on several models with the same data and seeds and returns
(and optionally writes) every number with its standard error; the per-task functions below are the
same measurements for one model.

Short text: ``ppl`` (:func:`perplexity`), ``agreement`` (:func:`agreement`), the zero-shot benchmarks
``hellaswag``, ``arc_easy``, ``arc_challenge``, ``piqa``, ``winogrande``, ``mmlu``, ``lambada``
(:func:`multiple_choice`), ``chat`` (:func:`chat`), and any lm-evaluation-harness task as
``lm_eval:<task>`` (:class:`HarnessModel`). Long context: ``passkey`` (:func:`passkey`), the RULER-style
tasks (:func:`ruler`) and ``longppl`` (:func:`long_perplexity`).
"""

from linearard.evaluation.agreement import agreement
from linearard.evaluation.chat import chat, chat_answers, chat_prompts, token_f1
from linearard.evaluation.harness import HarnessModel, lm_eval_model, run_lm_eval_task
from linearard.evaluation.multiple_choice import multiple_choice
from linearard.evaluation.passkey import passkey
from linearard.evaluation.perplexity import long_perplexity, perplexity
from linearard.evaluation.report import summary_tables, write_outputs
from linearard.evaluation.ruler import ruler
from linearard.evaluation.settings import EvalSettings
from linearard.evaluation.suite import evaluate, recovery
from linearard.evaluation.tasks import LONG_TASKS, RULER_TASKS, SHORT_TASKS, TASK_GROUPS, resolve_tasks

__all__ = [
    "LONG_TASKS",
    "RULER_TASKS",
    "SHORT_TASKS",
    "TASK_GROUPS",
    "EvalSettings",
    "HarnessModel",
    "agreement",
    "chat",
    "chat_answers",
    "chat_prompts",
    "evaluate",
    "lm_eval_model",
    "long_perplexity",
    "multiple_choice",
    "passkey",
    "perplexity",
    "recovery",
    "resolve_tasks",
    "ruler",
    "run_lm_eval_task",
    "summary_tables",
    "token_f1",
    "write_outputs",
]
