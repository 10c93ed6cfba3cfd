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

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from linearard.study.command import add_arguments, run

if TYPE_CHECKING:
    from linearard.study.runner import StudySettings

__all__ = ["add_arguments", "run", "run_study"]


def run_study(settings: StudySettings, *, log: Callable[[str], None] = print) -> dict[str, str]:
    """Carry out a study (`linearard.study.runner.StudySettings`), write its report, print the tables.

    The runs go one after another in this process, or to several devices at once (``settings.devices``,
    or every visible GPU when there are several): `linearard.study.parallel`. The report is rewritten
    (without plots) after every run, so a stopped study leaves one behind. A worker of a parallel
    study (``settings.only``) carries out its runs and writes no report.

    Returns:
        run label -> error message for every run that failed (empty when all finished).
    """
    from linearard.study.parallel import visible_devices
    from linearard.study.report import main_tables, study_results, write_report
    from linearard.study.runner import Study

    study = Study(settings, log=log)
    if settings.only:
        study.run()
        return dict(study.failures)
    devices = list(settings.devices)
    if not devices and settings.base.device != "cpu" and settings.eval_device != "cpu":
        devices = visible_devices() if len(visible_devices()) > 1 else []
    if devices:
        runs = _run_parallel(study, devices, log,
                             lambda: write_report(study_results(study, study.runs), settings.output, plots=False))
    else:
        runs = study.run(on_progress=lambda runs: write_report(study_results(study, runs), settings.output,
                                                               plots=False))
    results = study_results(study, runs)
    write_report(results, settings.output)
    log(main_tables(results))
    log(f"report: {settings.output / 'report.md'}")
    return dict(study.failures)


def _run_parallel(study, devices: list[str], log: Callable[[str], None], on_progress: Callable[[], object]) -> list:
    """Every unfinished run of `study` as a worker process on `devices`; returns the (re-planned) runs.

    `on_progress` runs after each run ends (one at a time), so a study cut off leaves a report behind.
    """
    import threading

    from linearard.errors import UserError
    from linearard.study.parallel import Job, WorkerLauncher, schedule

    study.plan()
    study.s.output.mkdir(parents=True, exist_ok=True)
    todo = study.todo()
    total = len(study.every_run())
    log(f"study: {total} runs, {total - len(todo)} already finished, {len(todo)} to do on "
        f"{len(devices)} device(s): {','.join(devices)}")
    jobs = [Job(run.label, tuple(r.label for r in study.sweep_of(run.arm.family)) if run.pending else ())
            for run in todo]
    launch = WorkerLauncher(study.s.command, study.s.output, devices)
    lock = threading.Lock()

    def launch_logged(job: Job, device: str) -> str | None:
        with lock:  # one line at a time from the device threads
            log(f"study: {job.label}: started on device {device}")
        error = launch(job, device)
        with lock:
            log(f"study: {job.label}: " + (f"failed: {error}" if error else "finished"))
            on_progress()
        return error

    with _workers_stopped_on_exit(launch):
        failures = schedule(jobs, devices, launch_logged)
    if study.reference.label in failures:
        raise UserError(f"the reference failed, so nothing can be compared: {failures[study.reference.label]}")
    runs = study.plan()  # the sweep has decided the learning rates now
    recorded = {r.label for r in study.sweep_runs if study.status(r) == "failed"}  # shown in the sweep table
    study.failures.update({k: v for k, v in failures.items() if k not in recorded})
    return runs


@contextmanager
def _workers_stopped_on_exit(launch) -> Iterator[None]:
    """Stop the workers when the parent is interrupted (Ctrl-C, or a time limit's SIGTERM)."""
    import signal
    import threading

    def terminate(signum, frame):
        raise KeyboardInterrupt

    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, terminate) if main else None
    try:
        yield
    except BaseException:
        launch.stop()
        raise
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)
