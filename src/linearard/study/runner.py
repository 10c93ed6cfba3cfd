"""Running a study: plan every (arm, seed) run, train it, evaluate it, and pick up where a stopped study left off.

Layout of the output folder::

    OUTPUT/
      results.json  report.md  *.png       the study's report (rewritten as runs finish)
      runs/native/results.json             the reference: the original model, evaluated
      runs/scaled/results.json             the untrained scaled student, evaluated
      runs/<arm>/seed-<n>/train/           a `linearard restore` run folder (checkpoints, logs, model/)
      runs/<arm>/seed-<n>/results.json     that run's config, training numbers and evaluation
      runs/<run>/evaluation-progress.json  the finished tasks of an evaluation under way
      runs/<arm>/sweep/lr-<lr>/            a learning-rate sweep run of that arm (``--lr-sweep``)
      logs/<run>.log                       a run's output when runs go to several devices (``--devices``)

A run is finished when its ``results.json`` holds its training numbers and an evaluation made with the
current evaluation settings: a rerun of the same command skips it, also when its weights were deleted
or the study folder was copied without them. A trained run whose evaluation is missing or stale is
re-evaluated from its export; one with checkpoints but no export resumes training from its newest
checkpoint. An evaluation resumes task by task: each finished task is saved as it ends
(``evaluation-progress.json``), and a rerun evaluates only the others, as long as the evaluation settings
are the same and the run has not trained since. A finished run whose settings differ from the command's is an
error rather than a silent mix of two studies in one table.

Fairness: every trained run gets the same number of tokens per optimizer step (``--tokens-per-step``,
whatever its block length: the restore config's `tokens_per_step`), so arms with the same budget take
the same number of steps;
arms on blocks longer than the distillation arms' recompute their layers in the backward pass (gradient
checkpointing) so that their memory stays near the others'. With ``--lr-sweep`` each trained arm first
runs every learning rate of the sweep on ``--sweep-tokens`` and keeps the one whose model agrees best
with the native model (lowest next-token KL on validation text that no evaluation uses), then trains
its full budget at that rate.

Evaluation: every run is scored with the same tasks and `EvalSettings`. The reference (native) model
runs every task once. For the other runs the tasks that compare with the reference (agreement, chat)
are evaluated beside it, and all other tasks on the run's model alone, so the reference's benchmarks
are not recomputed for every arm.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from linearard.config import RestoreConfig
from linearard.errors import UserError
from linearard.evaluation.settings import EvalSettings, measured
from linearard.files import write_atomic
from linearard.models.load import free_memory
from linearard.models.rope import RopeScaling
from linearard.study.arms import Arm, format_tokens, slugify
from linearard.training.loop import RESUMABLE_CHANGES
from linearard.training.plan import Stage

# Tasks whose scores compare a model with the reference inside `evaluate`.
REFERENCE_TASKS = ("agreement", "chat")
REFERENCE = "native"
# The sweep's validation text: a long held-out document that no evaluation task scores on short windows.
SWEEP_TEXTS = ("tragedies",)
RECORD = "results.json"
PROGRESS = "evaluation-progress.json"
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
    tokens_per_step: int | None = None  # None: the longest first-stage block x batch size x grad accumulation
    lr_sweep: tuple[float, ...] = ()
    sweep_tokens: int | None = None
    reference: bool = True  # evaluate the native model here even when --arms does not list it
    only: tuple[str, ...] = ()  # run labels to carry out (a worker of --devices); empty: all
    devices: tuple[str, ...] = ()  # run on these devices in parallel, one worker process per device


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
    sweep_lr: float | None = None  # set for a run of the learning-rate sweep
    pending: bool = False  # its learning rate waits for the sweep

    @property
    def is_sweep(self) -> bool:
        return self.sweep_lr is not None

    @property
    def record_path(self) -> Path:
        return self.folder / RECORD

    @property
    def progress_path(self) -> Path:
        return self.folder / PROGRESS


def arm_config(
    arm: Arm,
    base: RestoreConfig,
    scaling: RopeScaling,
    *,
    seed: int,
    output: Path | str,
    cpt_share: float,
    tokens_per_step: int | None = None,
    budget: int | None = None,
    lr: float | None = None,
) -> RestoreConfig:
    """The restore settings of one trained run of `arm`.

    Every arm starts from ``base`` (same model, data, data order, optimiser) with the study's RoPE; the
    arm sets the objective, the token budget (``budget`` replaces it, for a sweep run) and its stages,
    then its own ``KEY=VALUE`` settings. With `tokens_per_step` the arm's batch size and accumulation
    give every optimizer step that many tokens, in every stage; `lr` (a sweep's) applies unless the arm
    sets its own. An arm on blocks longer than ``base.seq_len`` gets gradient checkpointing.

    Raises:
        UserError: the arm's settings are invalid (the message names the arm).
    """
    budget = arm.tokens(base.max_tokens) if budget is None else budget
    names = arm.objectives()
    # the base's objective settings that this arm's objectives take (a logits weight means nothing to ard)
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
        "relations": base.relations if "ard" in names else {},
        "layers": base.layers if {"ard", "attention", "hidden"} & set(names) else None,
        "objective_options": {k: v for k, v in base.objective_options.items() if k in names},
        "export": True,
        "eval": False,  # the study evaluates every arm itself, with the same tasks
        "resume": False,
        "dry_run": False,
    }
    if lr is not None:
        values["lr"] = lr
    if arm.objective == "cpt":
        values["seq_len"] = base.cpt_seq_len or scaling.target_length  # continual pre-training on long blocks
    if arm.relations:
        values["relations"] = dict(arm.relations)
    if arm.layers:
        values["layers"] = arm.layers
    own = dict(arm.settings)
    values.update(own)
    try:
        seq_len = values.get("seq_len", base.seq_len)
        longest = seq_len
        if arm.cpt_stage:
            longest = max(seq_len, values.get("cpt_seq_len", base.cpt_seq_len) or scaling.target_length)
        if longest > base.seq_len and "gradient_checkpointing" not in own:
            values["gradient_checkpointing"] = True  # long blocks: keep memory near the short-block arms'
        if tokens_per_step and not {"batch_size", "grad_accum"} & set(own):
            values["tokens_per_step"] = tokens_per_step  # each stage splits it into its own blocks
        return dataclasses.replace(base, **values).validate()
    except UserError as err:
        raise UserError(f"arm {arm.name}: {err}") from None


class Study:
    """Plans and carries out a study's runs; `linearard.study.report` turns their records into the report.

    After `plan`: ``runs`` (the table's runs, in order), ``sweep_runs`` (the learning-rate sweep) and
    ``reference`` (the native model's run, which agreement compares with even when it is not in
    ``runs``).
    """

    def __init__(self, settings: StudySettings, log: Log = print):
        self.s = settings
        self.log = log
        self.failures: dict[str, str] = {}
        self.runs: list[Run] = []
        self.sweep_runs: list[Run] = []

    # -- planning -----------------------------------------------------------------------------------

    def plan(self) -> list[Run]:
        """Resolve the RoPE and every run's settings and stages, before anything is trained.

        A run whose learning rate comes from a sweep that has not finished is planned with the base
        learning rate and marked ``pending``; `resolve_lr` sets it once the sweep is done.

        Raises:
            UserError: any arm's settings or budget are invalid (nothing has run yet).
        """
        from linearard.training.plan import read_model_meta, resolve_scaling

        base = self.s.base
        if base.strategy != "none":
            raise UserError("a study trains each arm in one process; leave --strategy at none")
        model_config = read_model_meta(base.model)[0]
        self.scaling = resolve_scaling(base, model_config)
        self.num_layers = model_config.num_hidden_layers
        self.tokens_per_step = self.s.tokens_per_step or self._automatic_tokens_per_step()
        scaled_spec = f"{base.model}@{self.scaling.rope_type}:{self.scaling.factor:g}"
        runs_dir = self.s.output / "runs"
        native = Arm(name=REFERENCE, base=REFERENCE, family=REFERENCE)
        self.reference = Run(native, None, runs_dir / native.slug, base.model, label=REFERENCE)
        arms = self.s.arms
        if self.s.reference and not any(a.base == REFERENCE for a in arms):
            arms = [native, *arms]  # recovery needs it
        runs: list[Run] = []
        sweeps: list[Run] = []
        swept: set[str] = set()
        for arm in arms:
            if not arm.trains:
                spec = base.model if arm.base == REFERENCE else scaled_spec
                runs.append(self.reference if arm.base == REFERENCE else
                            Run(arm, None, runs_dir / arm.slug, spec, label=arm.name))
                continue
            if self._swept(arm) and arm.family not in swept:
                swept.add(arm.family)
                for lr in self.s.lr_sweep:
                    folder = runs_dir / slugify(arm.family) / "sweep" / f"lr-{lr:g}"
                    run = Run(arm, base.seed, folder, str(folder / EXPORT), label=sweep_label(arm.family, lr),
                              sweep_lr=lr)
                    self._configure(run, budget=self.s.sweep_tokens, lr=lr)
                    sweeps.append(run)
            seeds = arm.seeds or self.s.seeds
            for i in range(seeds):
                seed = base.seed + i
                folder = runs_dir / arm.slug / f"seed-{seed}"
                label = arm.name if seeds == 1 else f"{arm.name} (seed {seed})"
                run = Run(arm, seed, folder, str(folder / EXPORT), label=label)
                self._configure(run)
                runs.append(run)
        self.runs, self.sweep_runs = runs, sweeps
        for run in runs:
            if run.arm.trains and self._swept(run.arm):
                self.resolve_lr(run, strict=False)
        return runs

    def _swept(self, arm: Arm) -> bool:
        """Whether `arm` takes its learning rate from the sweep (a trained arm without its own lr)."""
        return bool(self.s.lr_sweep) and arm.trains and "lr" not in dict(arm.settings)

    def _automatic_tokens_per_step(self) -> int:
        """Without --tokens-per-step: the base config's, else one long block (--cpt-seq-len, else the target
        length) per micro-batch slot, i.e. that length x the base batch size x grad accumulation; the same
        whichever arms are listed."""
        base = self.s.base
        long = base.cpt_seq_len or self.scaling.target_length
        if base.tokens_per_step:
            return base.tokens_per_step
        return math.lcm(base.seq_len, long) * (base.batch_size or 1) * (base.grad_accum or 1)

    def _configure(self, run: Run, *, budget: int | None = None, lr: float | None = None) -> None:
        from linearard.training.plan import plan_stages, resolve_device

        arm = run.arm
        config = arm_config(arm, self.s.base, self.scaling, seed=run.seed, output=run.folder / "train",
                            cpt_share=self.s.cpt_share, tokens_per_step=self.tokens_per_step,
                            budget=budget, lr=lr)
        try:
            run.stages = plan_stages(config, self.scaling, None, world_size=1, device=resolve_device(config),
                                     bf16=False)
            config.objective_spec().reads(self.num_layers)  # the layers exist in this model
        except UserError as err:
            raise UserError(f"arm {arm.name}{' (sweep)' if run.is_sweep else ''}: {err}") from None
        run.config = config

    def sweep_of(self, family: str) -> list[Run]:
        return [r for r in self.sweep_runs if r.arm.family == family]

    def chosen_lr(self, family: str) -> tuple[float | None, str]:
        """The sweep's best learning rate of `family` and why: ``(lr, "")``, or ``(None, reason)`` while
        some sweep run is unfinished or when every one of them failed."""
        best, waiting = None, []
        for run in self.sweep_of(family):
            record = read_json(run.record_path)
            if record.get("failed"):
                continue
            if not self.evaluated(run, record):
                waiting.append(run.label)
                continue
            kl = record["evaluation"]["entry"]["tasks"]["agreement"]["metrics"]["kl"]["value"]
            if kl is not None and (best is None or kl < best[0]):
                best = (kl, run.sweep_lr)
        if waiting:
            return None, f"waits for the learning-rate sweep ({', '.join(waiting)})"
        if best is None:
            return None, f"every learning rate of its sweep failed ({', '.join(map(str, self.s.lr_sweep))})"
        return best[1], ""

    def resolve_lr(self, run: Run, *, strict: bool = True) -> None:
        """Give `run` its sweep's learning rate (``pending`` while the sweep is unfinished).

        Raises:
            UserError: with `strict`, the sweep is unfinished or every run of it failed.
        """
        lr, reason = self.chosen_lr(run.arm.family)
        if lr is None:
            if strict:
                raise UserError(f"arm {run.label}: {reason}")
            run.pending = True
            return
        self._configure(run, lr=lr)
        run.pending = False

    def fingerprint(self, run: Run | None = None) -> dict[str, Any]:
        """What must match for an earlier evaluation to count: tasks, the settings that decide the
        numbers (batch sizes do not), device type (and, for a sweep run, its validation text)."""
        device = self.s.eval_device or ("cuda" if torch.cuda.is_available() else "cpu")
        value = {"tasks": self.s.tasks, "settings": measured(self.s.eval_settings),
                 "device": torch.device(device).type}
        if run is not None and run.is_sweep:
            value.update(tasks=["agreement"], texts=sorted(SWEEP_TEXTS))
        return json.loads(json.dumps(value))  # tuples -> lists, as read back from a file

    def evaluated(self, run: Run, record: dict[str, Any]) -> bool:
        """Whether `record` (the run's results.json) holds an evaluation with this study's fingerprint."""
        return self._current(run, (record.get("evaluation") or {}).get("fingerprint"))

    def _current(self, run: Run, fingerprint: dict[str, Any] | None) -> bool:
        """Whether numbers measured under `fingerprint` count for `run` now."""
        if not fingerprint:
            return False
        # records written before batch sizes left the fingerprint still carry them
        return {**fingerprint, "settings": measured(fingerprint.get("settings") or {})} == self.fingerprint(run)

    def status(self, run: Run) -> str:
        """``done``, ``evaluate`` (trained, not evaluated), ``resume`` (checkpoints, no export), ``train``,
        ``wait`` (its learning rate waits for the sweep) or ``failed`` (a sweep run that failed before).

        Raises:
            UserError: the folder holds a run made with other settings.
        """
        from linearard.training.checkpoint import latest_checkpoint

        if run.pending:
            return "wait"
        record = read_json(run.record_path)
        if record:
            self._check_same_settings(run, record)
        if run.is_sweep and record.get("failed"):
            return "failed"
        if self.evaluated(run, record) and (not run.arm.trains or "training" in record):
            return "done"  # its numbers are recorded: the weights are no longer needed (and may be gone)
        if not run.arm.trains or ("training" in record and (run.folder / EXPORT / "config.json").exists()):
            return "evaluate"
        return "resume" if latest_checkpoint(run.folder / "train") is not None else "train"

    def _check_same_settings(self, run: Run, record: dict) -> None:
        changed = self._changed(run, record)
        if changed:
            raise UserError(f"{run.folder} holds a run of arm {run.arm.name} made with other settings ({changed}); "
                            "use another --output, or delete that folder to redo the run")

    def _changed(self, run: Run, record: dict) -> str:
        """What of `run`'s settings differs from those of the run recorded in its folder ("" if nothing)."""
        if not run.arm.trains:
            model = record.get("model")
            return f"model {model!r}, now {run.spec!r}" if model != run.spec else ""
        saved = record.get("config") or {}
        now = json.loads(json.dumps(run.config.to_dict()))
        changed = [k for k in now if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
        return ", ".join(f"{k} {saved.get(k)!r} -> {now[k]!r}" for k in changed[:3])

    def _check_every_folder(self, runs: list[Run]) -> None:
        """One error naming every folder whose run was made with other settings (extending the sweep can
        change the rate of several arms at once), before any work."""
        conflicts = []
        for run in runs:
            record = {} if run.pending else read_json(run.record_path)
            changed = self._changed(run, record) if record else ""
            if changed:
                conflicts.append(f"{run.folder} (arm {run.arm.name}: {changed})")
        if len(conflicts) > 1:
            raise UserError(f"{len(conflicts)} folders hold runs made with other settings: {'; '.join(conflicts)}; "
                            "use another --output, or delete those folders to redo the runs")

    def todo(self) -> list[Run]:
        """The unfinished runs in the order they run: the reference, the sweep, then the arms.

        With ``only`` (a worker of --devices) just those runs, by label.

        Raises:
            UserError: ``only`` names a run that is not in the plan.
        """
        every = self.every_run()
        if self.s.only:
            labels = {r.label for r in every}
            unknown = [label for label in self.s.only if label not in labels]
            if unknown:
                raise UserError(f"no run {unknown[0]!r} in this study")
            # A worker answers for its own runs only: a sweep that finishes while the study runs can make
            # another arm's folder stale, which the parent reports once; it must not stop every worker.
            every = [r for r in every if r.label in self.s.only]
        self._check_every_folder(every)
        statuses = {r.label: self.status(r) for r in every}  # every folder checked before any work
        # The reference first: without it nothing can be compared, so a problem with it should stop the study early.
        return [r for r in every if statuses[r.label] not in ("done", "failed")]

    def every_run(self) -> list[Run]:
        """The reference (where this study evaluates it), the sweep runs, then every other run."""
        rest = [r for r in self.runs if r is not self.reference]
        head = [self.reference] if self.reference in self.runs else []
        return head + self.sweep_runs + rest

    # -- running ------------------------------------------------------------------------------------

    def run(self, on_progress: Callable[[list[Run]], None] | None = None) -> list[Run]:
        """Train and evaluate every unfinished run in order; returns the runs.

        `on_progress` is called after each run that did some work (to rewrite a partial report).
        Failures of one run (a non-finite loss, out of memory) are logged and recorded in
        ``self.failures``; the others go on.
        """
        runs = self.plan()
        self.s.output.mkdir(parents=True, exist_ok=True)
        todo = self.todo()
        total = len(self.every_run())
        if not self.s.only:  # a worker's parent has said this for the whole study
            self.log(f"study: {total} runs, {total - len(todo)} already finished, {len(todo)} to do")
        for index, run in enumerate(todo, 1):
            self.run_one(run, f"[{index}/{len(todo)}] ")
            if on_progress:
                on_progress(runs)
        return runs

    def run_one(self, run: Run, prefix: str = "") -> bool:
        """Train (or resume) and evaluate one run; returns whether it finished.

        Raises:
            UserError: the reference failed (nothing can be compared without it).
        """
        try:
            if run.pending:
                self.resolve_lr(run)
                self.log(f"study: {run.label}: learning rate {run.config.lr:g}, the best of its sweep")
            state = self.status(run)
            self.log(f"study: {prefix}{run.label}: {_DOING[state]}")
            if state in ("train", "resume"):
                self._train(run, resume=state == "resume")
            self._evaluate(run)
            return True
        except UserError as err:
            if run is self.reference:
                raise
            self.log(f"study: {run.label} failed: {err}")
            if run.is_sweep:  # a rate that diverges is a result of the sweep (its table says so), not a failure
                write_json(run.record_path, self._record(run, failed=str(err)))
            else:
                self.failures[run.label] = str(err)
            return False
        finally:
            free_memory()

    def _train(self, run: Run, *, resume: bool) -> None:
        from linearard.training.loop import restore

        config = dataclasses.replace(run.config, resume=resume)
        # the saved tasks scored the old weights, and a resumed run exports new ones too
        run.progress_path.unlink(missing_ok=True)
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
                {"name": s.name, "objective": s.objective.name, "seq_len": s.seq_len, "steps": s.steps,
                 "tokens": s.tokens, "tokens_per_step": s.tokens_per_step}
                for s in result.plan.stages
            ],
            "last_metrics": result.last_metrics,
        }
        del result
        write_json(run.record_path, self._record(run, training=training))

    def _evaluate(self, run: Run) -> None:
        """Evaluate `run` and record it, saving each finished task so that a stopped evaluation resumes
        with the tasks it had not finished (see `_progress`)."""
        from linearard.evaluation import evaluate

        progress = self._progress(run)
        done = progress["tasks"]
        tasks = progress["fingerprint"]["tasks"]  # in the study's order
        if done:
            self.log(f"[{run.label}] evaluation resumes: {len(done)} of {len(tasks)} tasks already done")

        def save(name: str, task: str, result: dict, seconds: float) -> None:
            if name == run.label:  # not the reference beside it
                done[task] = {"result": result, "seconds": seconds}
                write_json(run.progress_path, progress)

        kwargs = {"device": self.s.eval_device, "seed": self.s.eval_settings.seed, "settings": self.s.eval_settings,
                  "on_task": save}
        # the reused tasks' time counts, so that a resumed evaluation takes about as long as an uninterrupted one
        started = time.perf_counter() - sum(d["seconds"] for d in done.values())
        for models, call_tasks, extra in self._evaluation_calls(run):
            missing = [t for t in call_tasks if t not in done]
            if missing:
                res = evaluate(models, missing, **extra, **kwargs)
                entry = res["models"][run.label]
                progress["model"] = {k: v for k, v in entry.items() if k not in ("tasks", "seconds")}
                progress["meta"] = res["meta"]
                write_json(run.progress_path, progress)
        entry = {**progress["model"], "tasks": {t: done[t]["result"] for t in tasks},
                 "seconds": {t: done[t]["seconds"] for t in tasks}}
        if run.arm.trains:
            entry["spec"] = os.path.relpath(run.spec, self.s.output)
        evaluation = {
            "fingerprint": progress["fingerprint"],
            "seconds": round(time.perf_counter() - started, 2),
            "entry": entry,
            "meta": progress["meta"],
        }
        write_json(run.record_path, self._record(run, evaluation=evaluation))
        run.progress_path.unlink(missing_ok=True)

    def _progress(self, run: Run) -> dict[str, Any]:
        """`run`'s evaluation so far, as saved in its ``evaluation-progress.json``: ``fingerprint``, ``tasks``
        (task -> ``result``, ``seconds``), and from the last `evaluate` call that returned, the model's
        entry without its tasks (``model``) and ``meta``. Empty unless its fingerprint is this study's."""
        progress = read_json(run.progress_path)
        if not self._current(run, progress.get("fingerprint")):
            return {"fingerprint": self.fingerprint(run), "tasks": {}}
        progress["fingerprint"] = self.fingerprint(run)
        if "meta" not in progress and len(progress["tasks"]) == len(progress["fingerprint"]["tasks"]):
            progress["tasks"].popitem()  # stopped as its last call returned: redo one task for the entry and meta
        return progress

    def _evaluation_calls(self, run: Run) -> list[tuple[dict[str, str], list[str], dict[str, Any]]]:
        """The `evaluate` calls that make `run`'s evaluation, as (models, tasks, further arguments)."""
        if run is self.reference:
            return [({REFERENCE: run.spec}, self.s.tasks, {})]
        beside = {REFERENCE: self.reference.spec, run.label: run.spec}
        if run.is_sweep:
            return [(beside, ["agreement"], {"reference": REFERENCE, "heldout_texts": sweep_texts()})]
        relative = [t for t in self.s.tasks if t in REFERENCE_TASKS]
        own = [t for t in self.s.tasks if t not in REFERENCE_TASKS]
        calls = [(beside, relative, {"reference": REFERENCE}), ({run.label: run.spec}, own, {})]
        return [call for call in calls if call[1]]

    def _record(self, run: Run, **parts: Any) -> dict[str, Any]:
        record = read_json(run.record_path)
        record.update(arm=run.arm.name, label=run.label, seed=run.seed, trains=run.arm.trains)
        if run.is_sweep:
            record["sweep_lr"] = run.sweep_lr
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
        return {r.label: read_json(r.record_path) for r in self.every_run()}


def sweep_label(family: str, lr: float) -> str:
    return f"{family} lr={lr:g} (sweep)"


def sweep_texts() -> dict[str, str]:
    """The sweep's validation text: held out from training and from every evaluation task's short texts."""
    from linearard.data import long_texts

    texts = long_texts()
    return {name: texts[name] for name in SWEEP_TEXTS}


_DOING = {
    "wait": "waiting for its learning-rate sweep",
    "failed": "failed before (delete its folder to retry)",
    "train": "training",
    "resume": "resuming training from its newest checkpoint",
    "evaluate": "evaluating",
    "done": "finished before",
}


def describe_plan(study: Study, runs: list[Run]) -> str:
    """The runs a study will make, with their stages and what a rerun would do (``--dry-run``)."""
    s = study.scaling
    lines = [
        f"linearard study: {study.s.base.model}, RoPE {s.describe()}, {len(study.every_run())} runs into "
        f"{study.s.output}",
        f"every optimizer step: {study.tokens_per_step} tokens",
        f"evaluation: {', '.join(study.s.tasks)}",
    ]
    if study.sweep_runs:
        lines.append(f"learning-rate sweep: {', '.join(f'{lr:g}' for lr in study.s.lr_sweep)} on "
                     f"{format_tokens(study.s.sweep_tokens)} tokens per arm, best by next-token KL to native")
    for run in study.every_run():
        state = study.status(run)
        if run.arm.trains:
            stages = " then ".join(
                f"{st.objective.name}: {format_tokens(st.tokens, exact=False)} tokens in {st.steps} steps of "
                f"{st.tokens_per_step // st.seq_len} x {st.seq_len}" for st in run.stages
            )
            lr = "lr from the sweep" if run.pending else f"lr {run.config.lr:g}"
            stages += f", {lr}" + (", gradient checkpointing" if run.config.gradient_checkpointing else "")
        else:
            stages = f"no training ({run.spec})"
        lines.append(f"  {run.label:<28} {stages}  [{state}]")
    return "\n".join(lines)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {path}: {err}") from None


def write_json(path: Path, data: Any) -> None:
    """Write `data` as JSON atomically (a crash never leaves half a file); non-finite floats -> null."""
    write_atomic(path, json.dumps(_finite(data), indent=2, allow_nan=False) + "\n")


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
