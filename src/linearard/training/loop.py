"""The restore run: load, plan, train stage by stage, checkpoint, evaluate, export.

`restore(config)` is the whole of `linearard restore` as a function. One model is in memory: the
student is the model with adapters on and the scaled rotary embedding, the teacher the same weights
with adapters off and the native rotary embedding (`linearard.models.teacher_student`).

Example:
    >>> from linearard.config import build_config
    >>> result = restore(build_config(flags={"max_tokens": 20_000}))  # doctest: +SKIP
    >>> result.perplexity  # doctest: +SKIP
    {'teacher': 21.3, 'scaled student': 128.0, 'restored student': 33.9}
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from linearard.config import RestoreConfig, build_config
from linearard.data import TokenBlocks, estimate_corpus_tokens, training_files
from linearard.data.documents import check_text_encoding
from linearard.errors import Interrupted, UserError
from linearard.export import check_exportable
from linearard.models.adapters import adapter_subset, add_adapters, trainable_parameters
from linearard.models.compat import enable_activation_checkpointing
from linearard.models.load import load_model
from linearard.models.teacher_student import TeacherStudent, compile_layers
from linearard.outputs import check_output, clear_own, describe_os_error, mark, written_by
from linearard.training import distributed as dist_utils
from linearard.training.batches import MicroBatches
from linearard.training.checkpoint import (
    CheckpointWriteError,
    TrainerState,
    latest_checkpoint,
    list_checkpoints,
    newest_valid_checkpoint,
    read_checkpoint,
    rng_state,
    set_rng_state,
    write_checkpoint,
)
from linearard.training.distributed import DistContext
from linearard.training.graphed import DDP_WARMUP, WARMUP, GraphedStep, make_capturable, portable_state
from linearard.training.interrupt import StopRequest
from linearard.training.metrics import MetricsWriter, Progress, stage_label
from linearard.training.plan import (
    ModelShape,
    Plan,
    Stage,
    estimate_memory,
    plan_stages,
    read_model_meta,
    resolve_scaling,
)
from linearard.training.schedule import current_lr, warmup_cosine

# Settings that only steer bookkeeping (or, like the strategy, the precision of the gradient reduction and
# CUDA graphs, how a step is spread over processes or launched, not what it computes: the world size is
# checked on its own); every other setting must match to resume a run.
RESUMABLE_CHANGES = frozenset(
    {"resume", "overwrite", "dry_run", "output", "save_every", "keep_checkpoints", "log_every", "eval",
     "eval_tokens", "eval_seq_len", "export", "device", "strategy", "reduce_dtype", "cuda_graphs"}
)
OBJECTIVE_FILE = "objective.yaml"  # each stage's resolved objective, beside config.yaml (see outputs.RESTORE_ENTRIES)
_AGREEMENT_BATCH = 4  # windows per forward pass of the end-of-run agreement
OOM_HINT = "lower --seq-len or --batch-size (raise --grad-accum to keep the step size), or add --gradient-checkpointing"


@dataclass
class RestoreResult:
    """What a finished run did and where it left things.

    ``perplexity`` maps ``teacher`` / ``scaled student`` / ``restored student`` to the held-out
    perplexity (empty when evaluation was off); ``agreement`` maps ``scaled student`` / ``restored
    student`` to their agreement with the teacher on the same held-out text, ``{"kl": next-token
    KL(teacher ‖ student) in nats, "top1": the fraction of positions where both rank the same token
    first}`` (what restoration means: perplexity alone also rewards fitting the text's domain);
    ``export`` is the merged model's folder (or None).
    """

    output: Path
    plan: Plan
    steps: int
    tokens: int
    seconds: float
    train_seconds: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)
    perplexity: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, dict[str, float]] = field(default_factory=dict)
    export: Path | None = None
    main_process: bool = True


def restore(config: RestoreConfig, *, log: Callable[[str], None] = print) -> RestoreResult:
    """Run `linearard restore` with `config` (see `linearard.config.RestoreConfig`).

    Under torchrun with ``strategy`` ddp/fsdp every process calls this; only the main one logs,
    checkpoints and exports, and each returns the same result.

    Raises:
        UserError: bad input, a non-finite loss (the last good checkpoint is kept), out of memory.
    """
    config.validate()
    ctx = dist_utils.setup(config.strategy, config.device)
    run = _Run(config, ctx, log if ctx.is_main else _silent)
    try:
        # Each compiled graph is one decoder layer, so DDP's buckets already fill while later layers run
        # backward. Dynamo's own DDP support would split each layer's graph at bucket edges, and the
        # pieces keep more activations for backward (DDP on one H200, SmolLM2 shape: +1.1 GiB, 1.3% slower).
        with torch._dynamo.config.patch(optimize_ddp=False):
            return run.run()
    except torch.OutOfMemoryError:
        raise UserError(f"out of memory: {OOM_HINT}") from None
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "out of memory" in str(err).lower():
            raise UserError(f"out of memory: {OOM_HINT}") from None
        raise
    finally:
        run.close()
        del run
        # The run's objects reference each other: free them now, not at some later gc, and DDP's reducer
        # before the process group ends (freed after it, it ends the group itself and can hang there).
        gc.collect()
        dist_utils.teardown(ctx)


def _silent(_: str) -> None:
    return None


class _Run:
    def __init__(self, config: RestoreConfig, ctx: DistContext, log: Callable[[str], None]):
        self.config = config
        self.ctx = ctx
        self.log = log
        self.output = Path(config.output)
        self.bf16 = config.trains_in_bf16(ctx.device.type)
        self.ts: TeacherStudent | None = None

    def close(self) -> None:
        """Undo what the teacher/student pair changed in the model and in transformers."""
        if self.ts is not None:
            self.ts.close()

    # -- set-up -------------------------------------------------------------------------------------

    def run(self) -> RestoreResult:
        started = time.perf_counter()
        config, ctx = self.config, self.ctx
        resume_from = self._resume_point()
        _seed_everything(config.seed)
        self._load()
        plan = self.plan
        self.log(plan.describe())
        if ctx.is_main:
            self._make_output(resumed=resume_from is not None)
            _save_objectives(self.output / OBJECTIVE_FILE, plan.stages)

        self.wrapped = dist_utils.wrap(
            dist_utils.LossModule(self.model),
            ctx,
            list(self.ts.decoder.layers),
            bf16=self.bf16,
            reduce_bf16=config.reduce_dtype == "bf16",
            find_unused=any(plan.untrained(stage) for stage in plan.stages),
            graphs=plan.graphs,
        )
        checkpoint = read_checkpoint(resume_from, rank=ctx.rank, world_size=ctx.world_size) if resume_from else None
        self.trainer = checkpoint.trainer if checkpoint else TrainerState(world_size=ctx.world_size)
        if checkpoint:
            self._set_adapters(checkpoint.adapters)
            self.log(f"resuming from {checkpoint.path} (stage {self.trainer.stage + 1}, step {self.trainer.step})")

        self.writer = MetricsWriter(
            self.output, enabled=ctx.is_main, resume_step=self._global_step() if checkpoint else None
        )
        self.progress = Progress(
            plan.total_tokens, self.trainer.tokens, enabled=ctx.is_main,
            description=stage_label(plan.stages[self.trainer.stage].name, self.trainer.stage, len(plan.stages)),
        )
        last: dict[str, float] = {}
        training = time.perf_counter()
        self.stop = StopRequest(announce=ctx.is_main)
        try:
            with self.stop.catching():
                for index, stage in enumerate(plan.stages):
                    if index < self.trainer.stage:
                        continue
                    resumed = checkpoint if checkpoint and index == self.trainer.stage else None
                    if not resumed:
                        self.trainer.stage, self.trainer.step = index, 0
                    last = self._train_stage(index, stage, resumed) or last
        finally:
            self.progress.close()
            self.writer.close()

        result = RestoreResult(
            self.output, plan, self._global_step(), self.trainer.tokens, 0.0, time.perf_counter() - training, last,
            main_process=ctx.is_main,
        )
        if config.eval:
            result.perplexity, result.agreement = self._evaluate()
        if config.export:
            rows = _agreement_rows(result.perplexity, result.agreement)
            heldout = {"perplexity": result.perplexity}
            for metric in ("kl", "top1"):
                heldout[metric] = {role: a[metric] for role, a in rows.items() if metric in a}
            result.export = self._export(heldout)
        result.seconds = time.perf_counter() - started
        return result

    def _resume_point(self) -> Path | None:
        # Decided by the main process alone, which is the one that writes: the others might look at
        # the folder while it changes it, and all must resume from the same checkpoint.
        outcome: Any = None
        if self.ctx.is_main:
            try:
                outcome = self._check_resume_point()
            except UserError as err:
                outcome = err
        outcome = dist_utils.broadcast_object(outcome, self.ctx)
        if isinstance(outcome, UserError):
            raise outcome
        return outcome

    def _check_resume_point(self) -> Path | None:
        config = self.config
        check_run_folder(config)
        if not config.resume:
            return None
        found, skipped = newest_valid_checkpoint(self.output)
        for path, problem in skipped:
            self.log(f"skipping checkpoint {path}: {problem}")
        if found is None and skipped:
            raise UserError(f"--resume: no intact checkpoint in {self.output / 'checkpoints'} ({skipped[0][1]})")
        if found is None:
            raise UserError(f"--resume: no checkpoint in {self.output / 'checkpoints'}; start without --resume")
        saved = _saved_settings(found / "config.yaml", config)
        changed = [k for k, v in config.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v]
        if changed:
            details = ", ".join(f"{k} {saved.get(k)!r} -> {getattr(config, k)!r}" for k in changed[:4])
            raise UserError(f"--resume with different settings than the checkpoint: {details}")
        return found

    def _make_output(self, *, resumed: bool) -> None:
        try:
            if not resumed:
                clear_own(self.output)  # an earlier run's files, after check_run_folder allowed it
            self.output.mkdir(parents=True, exist_ok=True)
            mark(self.output, "restore")
            self.config.save(self.output / "config.yaml")
        except OSError as err:
            raise UserError(f"cannot write --output {self.output}: {describe_os_error(err)}") from None

    def _load(self) -> None:
        config, ctx = self.config, self.ctx
        # FSDP moves each layer to the GPU as it shards it, so the full model never sits on one GPU.
        device = torch.device("cpu") if config.strategy == "fsdp" else ctx.device
        dtype = torch.bfloat16 if self.bf16 else torch.float32
        model, self.tokenizer = load_model(config.model, device=device, dtype=dtype)
        self.scaling = resolve_scaling(config, model.config)
        check_exportable(model.config, self.scaling)
        model = add_adapters(
            model, config.adapter, rank=config.lora_rank, alpha=config.lora_alpha, dropout=config.lora_dropout
        )
        for p in trainable_parameters(model):
            p.data = p.data.float()  # adapters and their AdamW state in fp32, whatever the base dtype
        if config.gradient_checkpointing:
            enable_activation_checkpointing(model)
        self.model = model
        self.files = training_files(config.data)
        if config.data:
            check_text_encoding(self.files)
        shape = ModelShape.of(model, model.config)
        self.stages = plan_stages(
            config, self.scaling, shape, world_size=ctx.world_size, device=str(ctx.device), bf16=self.bf16
        )
        self.ts = TeacherStudent(model, self.scaling, recompute_teacher=any(s.recompute_teacher for s in self.stages))
        if config.compiles(ctx.device.type):
            compile_layers(self.ts)
        self.plan = Plan(
            config=config,
            model=shape,
            scaling=self.scaling,
            data_files=self.files,
            corpus_tokens=estimate_corpus_tokens(self.files, self.tokenizer),
            stages=self.stages,
            world_size=ctx.world_size,
            device=str(ctx.device),
            bf16=self.bf16,
            memory=estimate_memory(config, shape, self.stages, world_size=ctx.world_size, bf16=self.bf16),
        )

    # -- training -----------------------------------------------------------------------------------

    def _train_stage(self, index: int, stage: Stage, checkpoint: Any) -> dict[str, float]:
        config, ctx = self.config, self.ctx
        self.objective = stage.objective.build()
        # What the stage's objective cannot reach gets no gradient: it stays out of the optimizer, and
        # FSDP gathers before backward the layers it trains only through the Q/K/V their attention handed over.
        unreached = set(self.plan.untrained(stage))
        params = [p for name, p in self.model.named_parameters() if p.requires_grad and name not in unreached]
        reads = stage.objective.reads(self.ts.num_layers)
        gather = [self.ts.decoder.layers[i] for i in sorted(reads.attention) if i >= reads.depth(self.ts.num_layers)]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
        scheduler = warmup_cosine(
            optimizer, warmup_steps=config.warmup_steps, total_steps=stage.steps, min_ratio=config.min_lr_ratio
        )
        blocks = self._blocks(stage)
        if checkpoint is not None:
            set_optimizer_state_dict(self.model, optimizer, checkpoint.optimizer, options=self._sd_options(False))
            scheduler.load_state_dict(self.trainer.scheduler)
            blocks.load_state_dict(checkpoint.rank_state["data"])
            set_rng_state(checkpoint.rank_state["rng"])
        run_step = functools.partial(self._optimizer_step, optimizer, params, gather)
        if self.plan.graphs:
            make_capturable(optimizer)
            run_step = GraphedStep(run_step, warmup=DDP_WARMUP if ctx.strategy == "ddp" else WARMUP)
        batches = MicroBatches(blocks, stage.batch_size, ctx.device)
        self.progress.set_description(stage_label(stage.name, index, len(self.stages)))
        self.model.train()
        log = _StepLog(self, stage)
        try:
            for step in range(self.trainer.step, stage.steps):
                totals = run_step([next(batches) for _ in range(stage.grad_accum)])
                lr = current_lr(scheduler)
                scheduler.step()
                self.trainer.step = step + 1
                self.trainer.tokens += stage.tokens_per_step
                log.add(self._global_step(), totals, lr)
                saving = step + 1 == stage.steps or bool(
                    config.save_every and self._global_step() % config.save_every == 0
                )
                stopping = self.stop.due(self._global_step(), ctx, checkpoint=saving)
                if saving or stopping or log.due():
                    log.flush()  # raises on a non-finite loss before anything is saved
                if saving or stopping:
                    self._save(optimizer, scheduler, batches)
                if stopping:
                    where = latest_checkpoint(self.output)
                    raise Interrupted(
                        f"stopped on {self.stop.name} after step {self._global_step()}; checkpoint {where}",
                        self.stop.exit_code,
                    )
        finally:
            batches.close()
            if isinstance(run_step, GraphedStep):  # the gradients live in the graph's memory pool: drop them first
                optimizer.zero_grad(set_to_none=True)
                run_step.close()
        return log.last

    def _optimizer_step(
        self, optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], gather: list[torch.nn.Module],
        micro_batches: list[dict[str, Any]],
    ) -> dict[str, torch.Tensor]:
        """One optimizer step over `micro_batches`: their metrics averaged, and the gradient norm before
        clipping, all left on the device."""
        config, ctx = self.config, self.ctx
        optimizer.zero_grad(set_to_none=True)
        totals: dict[str, torch.Tensor] = {}
        for micro, batch in enumerate(micro_batches):
            sync = micro == len(micro_batches) - 1
            with dist_utils.gradient_sync(self.wrapped, ctx, sync), self._autocast():
                loss, metrics = self.wrapped(self._objective_step, batch)
                dist_utils.gather_for_backward(ctx, gather)
                (loss / len(micro_batches)).backward()
            for key, value in metrics.items():
                part = value.detach().float() / len(micro_batches)
                totals[key] = totals[key] + part if key in totals else part
        totals["grad_norm"] = _clip(params, config.clip)
        optimizer.step()
        return totals

    def _objective_step(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.objective.run(self.ts, batch)

    def _blocks(self, stage: Stage) -> TokenBlocks:
        return TokenBlocks(
            self.files,
            self.tokenizer,
            stage.seq_len,
            add_bos=_adds_bos(self.tokenizer),
            shuffle_buffer=self.config.shuffle_buffer,
            seed=self.config.seed,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )

    def _autocast(self) -> Any:
        if not self.bf16:
            return nullcontext()
        # no cache of cast weights: a CUDA graph cannot record one
        return torch.autocast(self.ctx.device.type, dtype=torch.bfloat16, cache_enabled=False)

    def _stop_on_nonfinite(self, stage: Stage, step: int, loss: float, grad_norm: float) -> None:
        good = latest_checkpoint(self.output)
        where = f"the last good checkpoint is {good}" if good else "no checkpoint was written yet"
        what = f"loss {loss:g}" if not math.isfinite(loss) else f"gradient norm {grad_norm:g}"
        raise UserError(
            f"stopped: non-finite {what} at step {step} of the {stage.name} stage; {where} "
            "(try a lower --lr, or --precision fp32)"
        )

    # -- checkpoints --------------------------------------------------------------------------------

    def _global_step(self) -> int:
        return sum(s.steps for s in self.stages[: self.trainer.stage]) + self.trainer.step

    def _sd_options(self, saving: bool) -> StateDictOptions:
        # Under FSDP the shards are gathered into full tensors (offloaded to the CPU); elsewhere the
        # tensors are already whole.
        full = self.config.strategy == "fsdp"
        return StateDictOptions(full_state_dict=full, cpu_offload=saving, ignore_frozen_params=saving)

    def _save(self, optimizer: torch.optim.Optimizer, scheduler: Any, data: MicroBatches) -> None:
        adapters = self._trainable_tensors()
        optim = portable_state(get_optimizer_state_dict(self.model, optimizer, options=self._sd_options(True)))
        ranks = dist_utils.gather_objects({"data": data.state_dict(), "rng": rng_state()}, self.ctx)
        self.trainer.scheduler = portable_state(scheduler.state_dict())
        failure = None
        if self.ctx.is_main:
            try:
                write_checkpoint(
                    self.output,
                    self._global_step(),
                    adapters=adapters,
                    optimizer=optim,
                    trainer=self.trainer,
                    ranks=ranks,
                    config_yaml=self.config.to_yaml(),
                    keep=self.config.keep_checkpoints,
                )
            except CheckpointWriteError as err:
                failure = err
        if dist_utils.any_rank(failure is not None, self.ctx):  # also the barrier after the write
            raise failure or UserError("the main process could not write a checkpoint")

    def _trainable_tensors(self) -> dict[str, torch.Tensor]:
        """Exactly the trainable tensors, whole, on the main process. Not the model's state dict: that
        also names a tied output embedding, which is the frozen input embedding under a second name."""
        out = {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                tensor = param.full_tensor() if hasattr(param, "full_tensor") else param  # FSDP: gather
                if self.ctx.is_main:
                    out[name] = tensor.detach().cpu()
        return out

    def _set_adapters(self, adapters: dict[str, torch.Tensor]) -> None:
        options = StateDictOptions(full_state_dict=self.config.strategy == "fsdp", strict=False)
        set_model_state_dict(self.model, adapter_subset(self.model, adapters), options=options)

    # -- evaluation and export ----------------------------------------------------------------------

    def _evaluate(self) -> tuple[dict[str, float], dict[str, dict[str, float]]]:
        """Held-out perplexity of the three roles, and the two students' agreement with the teacher."""
        from linearard.data import heldout_texts
        from linearard.evaluation.agreement import AgreementTally, agreement_windows
        from linearard.evaluation.perplexity import perplexity
        from linearard.evaluation.scoring import forward, pad_batch

        config = self.config
        try:
            texts = heldout_texts()
        except UserError as err:
            self.log(f"skipping the held-out evaluation: {err}")
            return {}, {}
        length = config.eval_seq_len or config.seq_len
        per_text = max(length, config.eval_tokens // len(texts))
        # Tokenize only the beginning of each text: no tokenizer needs 16 characters for a token.
        texts = {name: text[: per_text * 16] for name, text in texts.items()}
        students = {"scaled student": self._untrained, "restored student": self.ts.student}

        def measure() -> dict[str, float]:
            result = perplexity(self.model, self.tokenizer, texts, lengths=[length], max_tokens=per_text)
            value = result["metrics"][f"all@{length}"]["value"]
            return {"ppl": float("nan") if value is None else value}

        def agree() -> dict[str, dict[str, float]]:
            # One batch at a time under the teacher, then under each student: the teacher's logits of the
            # whole text would not fit in memory for a large vocabulary.
            windows = agreement_windows(self.tokenizer, texts, length=length, max_tokens=per_text)
            tallies = {role: AgreementTally() for role in students}
            for start in range(0, len(windows), _AGREEMENT_BATCH):
                batch = windows[start:start + _AGREEMENT_BATCH]
                ids, mask = (t.to(self.ctx.device) for t in pad_batch(batch))
                with self.ts.teacher():
                    reference = forward(self.model, ids, mask)[0]
                for role, view in students.items():
                    with view():
                        tallies[role].add(reference, forward(self.model, ids, mask)[0], batch)
            cells = {role: tally.result()["metrics"] for role, tally in tallies.items()}
            return {role: {k: c["value"] for k, c in m.items()} for role, m in cells.items()}

        values: dict[str, float] = {}
        self.model.eval()
        try:
            for role, view in self._roles().items():
                with torch.no_grad(), view, self._autocast():
                    values[role] = self.wrapped(measure)["ppl"]
            with torch.no_grad(), self._autocast():
                agreement = self.wrapped(agree)
        finally:
            self.model.train()
        rope = f"{self.scaling.rope_type} x{self.scaling.factor:g}"
        self.log(_perplexity_report(values, rope, length, per_text * len(texts), agreement))
        return values, agreement

    def _roles(self) -> dict[str, Any]:
        """The three models compared, each a context not yet entered: teacher, untrained scaled student
        (scaled RoPE, adapters off), restored student."""
        return {"teacher": self.ts.teacher(), "scaled student": self._untrained(),
                "restored student": self.ts.student()}

    @contextmanager
    def _untrained(self) -> Iterator[None]:
        with self.ts.student(), self.ts.adapters.off():
            yield

    def _export(self, heldout: dict[str, dict[str, float]]) -> Path:
        from linearard.export import export_checkpoint, export_model

        target = self.output / "model"
        card = {"heldout": heldout, "tokens_trained": self.trainer.tokens}  # for the model card
        if self.ctx.is_main:
            _, _, dtype = read_model_meta(self.config.model)
            if self.config.strategy == "fsdp":
                # The shards are spread over the processes: rebuild the model from the final checkpoint.
                export_checkpoint(
                    latest_checkpoint(self.output), target, dtype=dtype, card=card, overwrite=True, log=self.log
                )
            else:
                export_model(
                    self.model, self.tokenizer, self.scaling, target, dtype=dtype, config=self.config, card=card,
                    overwrite=True,
                )
            self.log(f"exported the restored model to {target} (adapters in {target / 'adapter'})")
        dist_utils.barrier(self.ctx)
        return target


def check_run_folder(config: RestoreConfig) -> None:
    """Raise `UserError` unless the run may write into ``config.output`` (see `linearard.outputs`):
    a new or empty folder, an earlier run with --resume or --overwrite, or an earlier run's failed start."""
    from linearard.models.load import local_model_path

    output = Path(config.output)
    inputs = [p for p in (local_model_path(config.model),) if p is not None] + list(config.data)
    check_output(output, "restore", overwrite=config.overwrite, resume=config.resume, inputs=inputs)
    if config.resume or config.overwrite or written_by(output) is None:
        return
    found = list_checkpoints(output)
    if found or (output / "model").exists():
        what = f"checkpoints up to {found[-1].name}" if found else "an exported model"
        raise UserError(
            f"{output} already holds a run ({what}); pass --resume to continue it, --overwrite to start it "
            "over, or choose another --output"
        )


def _saved_settings(path: Path, config: RestoreConfig) -> dict[str, Any]:
    """The settings a checkpoint was written with, with ``layers`` spelled as in `config` where both
    spellings give the checkpoint's objective the same layers. Earlier versions wrote the default as
    ``all``; it is now left unset, which for ard and attention means the same (for hidden it does not)."""
    saved = build_config(yaml_source=path)
    if saved.layers != config.layers:
        try:
            same = dataclasses.replace(saved, layers=config.layers).objective_spec() == saved.objective_spec()
        except UserError:  # `config`'s layers are no choice for the checkpoint's objective
            same = False
        if same:
            saved.layers = config.layers
    return saved.to_dict()


def _save_objectives(path: Path, stages: list[Stage]) -> None:
    """Each stage's objective spec, as the run resolved it (for the record; the config rebuilds it)."""
    import yaml

    path.write_text(yaml.safe_dump({stage.name: stage.objective.to_dict() for stage in stages}, sort_keys=False))


def _clip(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """Clip the gradients; returns their total norm before clipping, on the device (no synchronisation)."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP: a DTensor spread over the processes
        norm = norm.full_tensor()
    return norm.detach().float()


class _StepLog:
    """Per-step metrics kept on the device and read in one transfer every few steps (a read waits for
    the device, so reading every step would keep the host from running ahead): then averaged over
    processes, checked for non-finite values, written step by step and shown on the progress bar."""

    READ_EVERY = 16  # steps between reads on a GPU (on the CPU a read costs nothing: every step)

    def __init__(self, run: _Run, stage: Stage):
        self.run = run
        self.stage = stage
        self.pending: list[tuple[int, dict[str, torch.Tensor], float, int]] = []
        self.last: dict[str, float] = {}
        self.timer = time.perf_counter()

    def add(self, step: int, metrics: dict[str, torch.Tensor], lr: float) -> None:
        self.pending.append((step, metrics, lr, self.run.trainer.tokens))

    def due(self) -> bool:
        every = self.READ_EVERY if self.run.ctx.device.type == "cuda" else 1
        return len(self.pending) >= every

    def flush(self) -> None:
        if not self.pending:
            return
        run, stage = self.run, self.stage
        keys = sorted(self.pending[0][1])
        table = torch.stack([torch.stack([m[k].reshape(()) for k in keys]) for _, m, _, _ in self.pending])
        table = dist_utils.mean_tensor_over_ranks(table, run.ctx).tolist()
        now = time.perf_counter()
        rate = stage.tokens_per_step * len(self.pending) / max(now - self.timer, 1e-9)
        self.timer = now
        for (step, _, lr, tokens), row in zip(self.pending, table):
            values = dict(zip(keys, row))
            loss, grad_norm = values.get("loss", float("nan")), values["grad_norm"]
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                run._stop_on_nonfinite(stage, step, loss, grad_norm)
            self.last = {**values, "lr": lr, "tokens": tokens, "tokens_per_s": rate}
            if step % run.config.log_every == 0 or step == self.pending[-1][0]:
                run.writer.write(step, {"stage": stage.name, **self.last})
        run.progress.update(stage.tokens_per_step * len(self.pending), loss=self.last["loss"], lr=self.last["lr"])
        self.pending = []


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _adds_bos(tokenizer: Any) -> bool:
    from linearard.evaluation.scoring import bos_prefix

    return bool(bos_prefix(tokenizer))


def _agreement_rows(
    perplexity: dict[str, float], agreement: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """The students' agreement with the teacher, and the teacher's with itself (KL 0, top-1 1) when it was
    measured and the students were compared with it."""
    if "teacher" not in perplexity or not agreement:
        return agreement
    return {"teacher": {"kl": 0.0, "top1": 1.0}, **agreement}


def _perplexity_report(
    values: dict[str, float], rope: str, length: int, tokens: int, agreement: dict[str, dict[str, float]] | None = None
) -> str:
    """The end-of-run summary: perplexity of the three roles, then the students' agreement with the teacher.

    Agreement is the measure of restoration; the perplexity recovery can pass 100 % when training fits
    the held-out text's domain better than the teacher does, and the summary says so.
    """
    agreement = _agreement_rows(values, agreement or {})
    lines = [f"held-out perplexity and agreement with the teacher (up to {tokens} tokens in {length}-token windows):",
             f"  {'':<40} {'perplexity':>10} {'KL to teacher':>14} {'top-1 agreement':>16}"]
    labels = {"teacher": "teacher (native RoPE)", "scaled student": f"scaled student, untrained ({rope})",
              "restored student": "restored student"}
    for role, value in values.items():
        a = agreement.get(role, {})
        kl = f"{a['kl']:14.4f}" if a.get("kl") is not None else f"{'':14}"
        top1 = f"{a['top1']:16.1%}" if a.get("top1") is not None else f"{'':16}"
        lines.append(f"  {labels[role]:<40} {value:10.2f} {kl} {top1}")
    t, s, r = (values.get(k) for k in ("teacher", "scaled student", "restored student"))
    before, after = agreement.get("scaled student", {}).get("kl"), agreement.get("restored student", {}).get("kl")
    if before is not None and after is not None and before > 0:
        lines.append(f"  restored {(before - after) / before:.0%} of the agreement with the teacher lost to the RoPE "
                     f"scaling (next-token KL {before:.4f} -> {after:.4f})")
    if all(v and math.isfinite(v) for v in (t, s, r)) and s > t:
        recovered = (math.log(s) - math.log(r)) / (math.log(s) - math.log(t))
        line = f"  restored {recovered:.0%} of the log-perplexity lost to the RoPE scaling"
        if r < t:
            line += (" (below the teacher's perplexity: the training fits this text's domain; the agreement "
                     "above is the measure of restoration)")
        lines.append(line)
    return "\n".join(lines)
