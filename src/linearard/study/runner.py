"""Running a study: plan every (arm, seed) run, train it, evaluate it, and pick up where a stopped study left off.

Layout of the output folder::

    OUTPUT/
      results.json  report.md  *.png       the study's report (rewritten as runs finish)
      runs/native/results.json             the reference: the original model, evaluated
      runs/scaled/results.json             the untrained scaled student, evaluated
      runs/<arm>/seed-<n>/train/           a `linearard restore` run folder (checkpoints, logs, model/)
      runs/<arm>/seed-<n>/results.json     that run's config, training numbers and evaluation

A run is finished when its ``results.json`` holds an evaluation made with the current evaluation
settings (and, for a trained run, its exported model exists): a rerun of the same command skips it.
A trained run whose export exists is only re-evaluated; one with checkpoints but no export resumes
training from its newest checkpoint. A finished run whose settings differ from the command's is an
error rather than a silent mix of two studies in one table.

Evaluation: every run is scored with the same tasks and `EvalSettings`. The reference (native) model
runs every task once. For the other runs the tasks that compare with the reference (agreement, chat)
are evaluated beside it, and all other tasks on the run's model alone, so the reference's benchmarks
are not recomputed for every arm.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearard.config import RestoreConfig
from linearard.errors import UserError
from linearard.evaluation.settings import EvalSettings
from linearard.models.rope import RopeScaling
from linearard.study.arms import Arm, format_tokens
from linearard.training.loop import RESUMABLE_CHANGES
from linearard.training.plan import Stage

# Tasks whose scores compare a model with the reference inside `evaluate`.
REFERENCE_TASKS = ("agreement", "chat")
REFERENCE = "native"
RECORD = "results.json"
EXPORT = Path("train") / "model"

Log = Callable[[str], None]


@dataclass
class StudySettings:
    """Everything a study needs, resolved from the command line (see `linearard.study.command`).

    Args:
        base: the restore settings shared by every trained arm (model, data, optimisation, ...).
        arms: the arms, in table order.
        seeds: seeds of each trained arm without its own ``seeds=``.
        cpt_share: fraction of a ``+cpt`` arm's budget spent on its second (next-token) stage.
        output: the study folder.
        tasks: resolved evaluation task names.
        eval_settings: the evaluation settings of every run.
        eval_device: where models are evaluated (None: CUDA if available).
        command: the command line that reproduces the study.
    """

    base: RestoreConfig
    arms: list[Arm]
    seeds: int
    cpt_share: float
    output: Path
    tasks: list[str]
    eval_settings: EvalSettings
    eval_device: str | None = None
    command: str = ""
    argv: list[str] | None = None


@dataclass
class Run:
    """One (arm, seed) pair: what it trains and where it lives."""

    arm: Arm
    seed: int | None  # None for arms that train nothing
    folder: Path
    spec: str  # what `evaluate` loads: a model spec (untrained arms) or the export folder
    config: RestoreConfig | None = None
    stages: list[Stage] = field(default_factory=list)
    label: str = ""  # the row name in per-run tables

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD


def arm_config(
    arm: Arm, base: RestoreConfig, scaling: RopeScaling, *, seed: int, output: Path, cpt_share: float
) -> RestoreConfig:
    """The restore settings of one trained run of `arm`.

    Every arm starts from ``base`` (same model, data, data order, optimiser) with the study's RoPE; the
    arm sets the objective, the token budget and its stages, then its own ``KEY=VALUE`` settings.

    Raises:
        UserError: the arm's settings are invalid (the message names the arm).
    """
    budget = arm.tokens(base.max_tokens)
    names = arm.objectives()
    kept_weights = {k: w for k, w in base.weights.items() if k in names}
    values: dict[str, Any] = {
        "objective": arm.objective,
        "max_tokens": budget,
        "seed": seed,
        "output": str(output),
        "rope_type": scaling.rope_type,
        "rope_factor": scaling.factor,
        "target_length": scaling.target_length,
        "cpt_tokens": round(budget * cpt_share) if arm.cpt_stage else 0,
        "weights": {**kept_weights, **dict(arm.weights)},
        "export": True,
        "eval": False,  # the study evaluates every arm itself, with the same tasks
        "resume": False,
        "dry_run": False,
    }
    if arm.objective == "cpt":
        values["seq_len"] = base.cpt_seq_len or scaling.target_length  # continual pre-training on long blocks
    if arm.relations:
        values["relations"] = dict(arm.relations)
    if arm.layers:
        values["layers"] = arm.layers
    values.update(dict(arm.settings))
    try:
        return dataclasses.replace(base, **values).validate()
    except UserError as err:
        raise UserError(f"arm {arm.name}: {err}") from None


class Study:
    """Plans and carries out a study's runs; `linearard.study.report` turns their records into the report."""

    def __init__(self, settings: StudySettings, log: Log = print):
        self.s = settings
        self.log = log
        self.failures: dict[str, str] = {}

    # -- planning -----------------------------------------------------------------------------------

    def plan(self) -> list[Run]:
        """Resolve the RoPE and every run's settings and stages, before anything is trained.

        Raises:
            UserError: any arm's settings or budget are invalid (nothing has run yet).
        """
        from linearard.training.plan import plan_stages, read_model_meta, resolve_scaling

        base = self.s.base
        if base.strategy != "none":
            raise UserError("a study trains its arms one after another in one process; leave --strategy at none")
        model_config = read_model_meta(base.model)[0]
        self.scaling = resolve_scaling(base, model_config)
        self.num_layers = model_config.num_hidden_layers
        scaled_spec = f"{base.model}@{self.scaling.rope_type}:{self.scaling.factor:g}"
        runs_dir = self.s.output / "runs"
        runs: list[Run] = []
        arms = self.s.arms
        if not any(a.base == REFERENCE for a in arms):
            arms = [Arm(name=REFERENCE, base=REFERENCE, family=REFERENCE), *arms]  # recovery needs it
        for arm in arms:
            if not arm.trains:
                spec = base.model if arm.base == REFERENCE else scaled_spec
                runs.append(Run(arm, None, runs_dir / arm.slug, spec, label=arm.name))
                continue
            seeds = arm.seeds or self.s.seeds
            for i in range(seeds):
                seed = base.seed + i
                folder = runs_dir / arm.slug / f"seed-{seed}"
                config = arm_config(arm, base, self.scaling, seed=seed, output=folder / "train",
                                    cpt_share=self.s.cpt_share)
                try:
                    stages = plan_stages(config, self.scaling, 1)
                    self._check_layers(config)
                except UserError as err:
                    raise UserError(f"arm {arm.name}: {err}") from None
                label = arm.name if seeds == 1 else f"{arm.name} (seed {seed})"
                runs.append(Run(arm, seed, folder, str(folder / EXPORT), config, stages, label))
        self.runs = runs
        self.reference = next(r for r in runs if r.arm.base == REFERENCE)
        return runs

    def _check_layers(self, config: RestoreConfig) -> None:
        from linearard.objectives import select_layers

        if config.layers != "all" and set(config.objective.split("+")) & {"ard", "attention", "hidden"}:
            select_layers(config.layers, self.num_layers)

    def fingerprint(self) -> dict[str, Any]:
        """What must match for an earlier evaluation to count: tasks, settings, device type."""
        device = self.s.eval_device or ("cuda" if torch.cuda.is_available() else "cpu")
        value = {"tasks": self.s.tasks, "settings": dataclasses.asdict(self.s.eval_settings),
                 "device": torch.device(device).type}
        return json.loads(json.dumps(value))  # tuples -> lists, as read back from a file

    def status(self, run: Run) -> str:
        """``done``, ``evaluate`` (trained, not evaluated), ``resume`` (checkpoints, no export) or ``train``.

        Raises:
            UserError: the folder holds a run made with other settings.
        """
        from linearard.training.checkpoint import latest_checkpoint

        record = read_json(run.record_path)
        if record:
            self._check_same_settings(run, record)
        trained = not run.arm.trains or ("training" in record and (run.folder / EXPORT / "config.json").exists())
        if not trained:
            return "resume" if latest_checkpoint(run.folder / "train") is not None else "train"
        evaluation = record.get("evaluation") or {}
        return "done" if evaluation.get("fingerprint") == self.fingerprint() else "evaluate"

    def _check_same_settings(self, run: Run, record: dict) -> None:
        where = f"{run.folder} holds a run of arm {run.arm.name} made with other settings"
        hint = "use another --output, or delete that folder to redo the run"
        if not run.arm.trains:
            if record.get("model") != run.spec:
                raise UserError(f"{where} (model {record.get('model')!r}, now {run.spec!r}); {hint}")
            return
        saved = record.get("config") or {}
        now = json.loads(json.dumps(run.config.to_dict()))
        changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        if changed:
            details = ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:3])
            raise UserError(f"{where} ({details}); {hint}")

    # -- running ------------------------------------------------------------------------------------

    def run(self, on_progress: Callable[[list[Run]], None] | None = None) -> list[Run]:
        """Train and evaluate every unfinished run in order; returns the runs.

        `on_progress` is called after each run that did some work (to rewrite a partial report).
        Failures of one run (a non-finite loss, out of memory) are logged and recorded in
        ``self.failures``; the others go on.
        """
        runs = self.plan()
        self.s.output.mkdir(parents=True, exist_ok=True)
        statuses = {r.label: self.status(r) for r in runs}  # every folder checked before any work
        # The reference first: without it nothing can be compared, so a problem with it should stop the study early.
        todo = sorted((r for r in runs if statuses[r.label] != "done"), key=lambda r: r.arm.base != REFERENCE)
        self.log(f"study: {len(runs)} runs, {len(runs) - len(todo)} already finished, {len(todo)} to do")
        for index, run in enumerate(todo, 1):
            state = self.status(run)
            self.log(f"study: [{index}/{len(todo)}] {run.label}: {_DOING[state]}")
            try:
                if state in ("train", "resume"):
                    self._train(run, resume=state == "resume")
                self._evaluate(run)
            except UserError as err:
                if run.arm.base == REFERENCE:
                    raise  # nothing can be compared without the reference
                self.failures[run.label] = str(err)
                self.log(f"study: {run.label} failed: {err}")
            finally:
                _free_memory()
            if on_progress:
                on_progress(runs)
        return runs

    def _train(self, run: Run, *, resume: bool) -> None:
        from linearard.training.loop import restore

        config = dataclasses.replace(run.config, resume=resume)
        cuda = torch.cuda.is_available() and config.device != "cpu"
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        try:
            result = restore(config, log=self.log)
        except UserError as err:
            raise UserError(f"arm {run.label}: {err}") from None
        seconds = time.perf_counter() - started
        training = {
            "tokens": result.tokens,
            "steps": result.steps,
            "seconds": round(seconds, 2),
            "resumed": resume,
            "device": _device_name(torch.device("cuda") if cuda else torch.device("cpu")),
            "gpus": 1 if cuda else 0,
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if cuda else None,
            "stages": [
                {"name": s.name, "objective": s.objective, "seq_len": s.seq_len, "steps": s.steps,
                 "tokens": s.tokens}
                for s in result.plan.stages
            ],
            "last_metrics": result.last_metrics,
        }
        del result
        write_json(run.record_path, self._record(run, training=training))

    def _evaluate(self, run: Run) -> None:
        from linearard.evaluation import evaluate

        kwargs = {"device": self.s.eval_device, "seed": self.s.eval_settings.seed, "settings": self.s.eval_settings}
        started = time.perf_counter()
        if run.arm.base == REFERENCE:
            res = evaluate({REFERENCE: run.spec}, self.s.tasks, **kwargs)
            entry, meta = res["models"][REFERENCE], res["meta"]
        else:
            relative = [t for t in self.s.tasks if t in REFERENCE_TASKS]
            own = [t for t in self.s.tasks if t not in REFERENCE_TASKS]
            parts, meta = [], None
            if relative:
                res = evaluate({REFERENCE: self.reference.spec, run.label: run.spec}, relative,
                               reference=REFERENCE, **kwargs)
                parts.append(res["models"][run.label])
                meta = res["meta"]
            if own:
                res = evaluate({run.label: run.spec}, own, **kwargs)
                parts.append(res["models"][run.label])
                meta = res["meta"]
            entry = _merge_entries(parts, self.s.tasks)
        if run.arm.trains:
            entry["spec"] = os.path.relpath(run.spec, self.s.output)
        evaluation = {
            "fingerprint": self.fingerprint(),
            "seconds": round(time.perf_counter() - started, 2),
            "entry": entry,
            "meta": meta,
        }
        write_json(run.record_path, self._record(run, evaluation=evaluation))

    def _record(self, run: Run, **parts: Any) -> dict[str, Any]:
        record = read_json(run.record_path)
        record.update(arm=run.arm.name, label=run.label, seed=run.seed, trains=run.arm.trains)
        if run.arm.trains:
            record["config"] = run.config.to_dict()
            record["planned_stages"] = [dataclasses.asdict(s) for s in run.stages]
        else:
            record["model"] = run.spec
        if "training" in parts:
            record.pop("evaluation", None)  # a new model: any older evaluation is of another one
        record.update(parts)
        return record

    def records(self) -> dict[str, dict]:
        """label -> record, for every run of the plan whose folder holds one."""
        return {r.label: read_json(r.record_path) for r in self.runs}


_DOING = {
    "train": "training",
    "resume": "resuming training from its newest checkpoint",
    "evaluate": "evaluating",
    "done": "finished before",
}


def describe_plan(study: Study, runs: list[Run]) -> str:
    """The runs a study will make, with their stages and what a rerun would do (``--dry-run``)."""
    s = study.scaling
    lines = [
        f"linearard study: {study.s.base.model}, RoPE {s.describe()}, {len(runs)} runs into {study.s.output}",
        f"evaluation: {', '.join(study.s.tasks)}",
    ]
    for run in runs:
        state = study.status(run)
        if run.arm.trains:
            stages = " then ".join(
                f"{st.objective}: {format_tokens(st.tokens)} tokens in {st.seq_len}-token blocks" for st in run.stages
            )
        else:
            stages = f"no training ({run.spec})"
        lines.append(f"  {run.label:<28} {stages}  [{state}]")
    return "\n".join(lines)


def _merge_entries(parts: list[dict], tasks: list[str]) -> dict:
    """One model's evaluation entry from several `evaluate` calls over disjoint task sets."""
    merged = dict(parts[-1])
    all_tasks = {t: r for p in parts for t, r in p["tasks"].items()}
    all_seconds = {t: s for p in parts for t, s in p["seconds"].items()}
    merged["tasks"] = {t: all_tasks[t] for t in tasks if t in all_tasks}
    merged["seconds"] = {t: all_seconds[t] for t in tasks if t in all_seconds}
    return merged


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (a crash never leaves half a file); non-finite floats -> null."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(_finite(data), f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
