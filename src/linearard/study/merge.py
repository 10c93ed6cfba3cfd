"""One report from several study folders: arms run as separate jobs (another GPU, another machine).

``linearard study --merge A B C --output ALL`` reads each folder's ``results.json``, refuses folders
whose studies differ in anything that decides the numbers (model, RoPE, data, seeds, budgets, tokens
per step, the sweep, any shared restore setting, evaluation tasks and settings), and writes one report
into ``ALL`` over the union of their runs. The runs stay in their folders. The native reference is
the first folder's that evaluated it; when none did, the merge evaluates it once, into ``ALL/runs``.

Example:
    >>> merge_studies([Path("study/ref"), Path("study/ard")], Path("study/all"))  # doctest: +SKIP
    {}
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Callable
from pathlib import Path
from typing import Any

from linearard.errors import UserError
from linearard.evaluation.settings import measured
from linearard.study.runner import REFERENCE, Run, Study, read_json

# Restore settings that may differ between jobs: where and how a job ran, not what it computed.
_BOOKKEEPING = frozenset({"device", "output", "resume", "dry_run", "save_every", "keep_checkpoints", "log_every"})


def merge_studies(
    folders: list[Path], output: Path, *, command: str = "", log: Callable[[str], None] = print
) -> dict[str, str]:
    """Merge the study `folders` into one report in `output`; returns the failed runs (label -> error).

    Raises:
        UserError: a folder is not a study folder, the folders disagree (one line naming the setting
            and the two folders), or two folders hold the same arm.
    """
    from linearard.study.report import main_tables, study_results, write_report

    if len({f.resolve() for f in folders}) != len(folders):
        raise UserError("--merge lists a folder twice")
    metas = [_study_meta(folder) for folder in folders]
    check_agreement(folders, metas)
    studies = [_replan(folder, meta, log) for folder, meta in zip(folders, metas)]
    merged = _merged(studies, folders, metas, output, command, log)
    output.mkdir(parents=True, exist_ok=True)
    if not read_json(merged.reference.record_path).get("evaluation"):
        log(f"study: no folder evaluated the native reference; evaluating it once into {merged.reference.folder}")
        merged.run_one(merged.reference)
    results = study_results(merged, merged.runs)
    write_report(results, output)
    log(main_tables(results))
    log(f"report: {output / 'report.md'} ({len(folders)} folders merged)")
    return dict(merged.failures)


def check_agreement(folders: list[Path], metas: list[dict[str, Any]]) -> None:
    """Refuse folders whose studies differ in a setting that decides the numbers.

    Raises:
        UserError: ``cannot merge: SETTING differs: A in FOLDER, B in FOLDER``.
    """
    first, where = _settings(metas[0]), folders[0]
    for folder, meta in zip(folders[1:], metas[1:]):
        other = _settings(meta)
        for name in first.keys() | other.keys():
            if first.get(name) != other.get(name):
                raise UserError(f"cannot merge: {name} differs: {first.get(name)!r} in {where}, "
                                f"{other.get(name)!r} in {folder}")


def _settings(meta: dict[str, Any]) -> dict[str, Any]:
    """What must agree, by the name the refusal gives it."""
    rope = meta.get("rope") or {}
    out = {
        "model": meta.get("model"),
        "RoPE": (rope.get("type"), rope.get("factor"), rope.get("target_length")),
        "seed": meta.get("seed"),
        "seeds": meta.get("seeds"),
        "max_tokens": meta.get("max_tokens"),
        "cpt_share": meta.get("cpt_share"),
        "tokens_per_step": meta.get("tokens_per_step"),
        "lr_sweep": meta.get("lr_sweep"),
        "sweep_tokens": meta.get("sweep_tokens"),
        "evaluation tasks": meta.get("tasks"),
        "evaluation device": (meta.get("eval_fingerprint") or {}).get("device"),
    }
    for key, value in (meta.get("restore_settings") or {}).items():
        if key not in _BOOKKEEPING:
            out[key] = value
    for key, value in measured(meta.get("eval_settings") or {}).items():
        out[f"evaluation {key}"] = value
    return out


def _study_meta(folder: Path) -> dict[str, Any]:
    meta = read_json(folder / "results.json").get("study")
    if not meta or not meta.get("command"):
        raise UserError(f"{folder} is not a study folder (no results.json of a study); run the study there first")
    *_, last = meta["command"].splitlines()
    if "--merge" in shlex.split(last):  # its runs live in the folders it was made from
        raise UserError(f"{folder} holds a merged report; merge the folders it was made from instead ({last})")
    return meta


def _replan(folder: Path, meta: dict[str, Any], log: Callable[[str], None]) -> Study:
    """The study that wrote `folder`, planned again from its recorded command line."""
    from linearard.cli import build_parser
    from linearard.evaluation.settings import EvalSettings
    from linearard.study.command import settings_from_args

    argv = shlex.split(meta["command"])[1:]
    try:
        args = build_parser().parse_args(argv)
    except SystemExit:
        raise UserError(f"{folder}: cannot read its recorded command line: {meta['command']}") from None
    args.output = str(folder)
    settings = settings_from_args(args)
    recorded = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["eval_settings"].items()}
    device = (meta.get("eval_fingerprint") or {}).get("device")
    settings = dataclasses.replace(settings, eval_settings=EvalSettings(**recorded),
                                   eval_device=device or settings.eval_device, only=(), devices=())
    study = Study(settings, log=log)
    study.plan()
    return study


def _merged(studies: list[Study], folders: list[Path], metas: list[dict], output: Path, command: str,
            log: Callable[[str], None]) -> Study:
    arms, runs, sweeps, owner = [], [], [], {}
    reference: Run | None = None
    for study, folder in zip(studies, folders):
        for arm in study.s.arms:
            if arm not in arms:
                arms.append(arm)
        for run in study.runs:
            if run.arm.base == REFERENCE:
                if reference is None and read_json(run.record_path).get("evaluation"):
                    reference = run
                continue
            if run.label in owner:
                if not run.arm.trains:  # an untrained arm evaluated twice: the first will do
                    continue
                raise UserError(f"cannot merge: arm {run.label} is in both {owner[run.label]} and {folder}; "
                                "merge only one of them")
            owner[run.label] = folder
            runs.append(run)
        sweeps += [r for r in study.sweep_runs if r.label not in {s.label for s in sweeps}]
    first = studies[0]
    commands = [m["command"] for m in metas] + ([command] if command else [])
    settings = dataclasses.replace(first.s, arms=arms, output=output, command="\n".join(commands), argv=None,
                                   reference=True)
    merged = Study(settings, log=log)
    merged.scaling, merged.num_layers, merged.tokens_per_step = first.scaling, first.num_layers, first.tokens_per_step
    if reference is None:
        native = first.reference
        reference = Run(native.arm, None, output / "runs" / native.arm.slug, native.spec, label=native.label)
    merged.reference = reference
    merged.runs = [reference, *runs]
    merged.sweep_runs = sweeps
    for meta in metas:  # failures recorded by the jobs, unless a later job finished the run
        for label, error in (meta.get("failed") or {}).items():
            if label in owner or label in {s.label for s in sweeps}:
                merged.failures.setdefault(label, error)
    return merged
