"""`linearard study`: LinearARD against its baselines, trained and evaluated from one starting point.

A study trains every arm (`linearard.study.arms`: ``native``, ``scaled``, ``cpt``, ``logits``,
``hidden``, ``ard``, ``ard+cpt``, budget and ablation variants) from the same native model with the
same data, data order and token budget, exports each, evaluates all of them with the same tasks and
settings (`linearard.evaluation.evaluate`), and writes one report into the output folder:
``report.md`` (one row per arm: short-text scores, recovery % against the native model, long-context
scores, tokens, training time; then every task), ``results.json`` and PNG plots. A study that stops
(a crash, a time limit) resumes where it stopped when the same command runs again
(`linearard.study.runner`).

Example:
    >>> from linearard.cli import main
    >>> main(["study", "--arms", "native,scaled,ard", "--max-tokens", "1M", "--output", "runs/s"])  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from linearard.study.command import add_arguments, run

if TYPE_CHECKING:
    from linearard.study.runner import StudySettings

__all__ = ["add_arguments", "run", "run_study"]


def run_study(settings: StudySettings, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """Carry out a study (`linearard.study.runner.StudySettings`), write its report, print the tables.

    The report is rewritten (without plots) after every run, so a stopped study leaves one behind.

    Returns:
        run label -> error message for every run that failed (empty when all finished).
    """
    from linearard.study.report import main_tables, study_results, write_report
    from linearard.study.runner import Study

    study = Study(settings, log=log)
    runs = study.run(on_progress=lambda runs: write_report(study_results(study, runs), settings.output, plots=False))
    results = study_results(study, runs)
    write_report(results, settings.output)
    log(main_tables(results))
    log(f"report: {settings.output / 'report.md'}")
    return dict(study.failures)
