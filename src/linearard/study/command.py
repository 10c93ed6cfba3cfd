"""`linearard study`: the command line of a study (flags -> `StudySettings`), and running it."""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from linearard.config import PAPER_TOKENS, ROPE_KEYS, build_config, load_yaml, parse_count, parse_lengths
from linearard.errors import UserError
from linearard.evaluation.settings import device_defaults
from linearard.models.rope import ROPE_TYPES
from linearard.study.arms import DEFAULT_ARMS, PAPER_CPT_SHARE, PRESETS, parse_arms

if TYPE_CHECKING:  # the runner imports torch and the training loop: only when a study runs
    from linearard.study.runner import StudySettings

DEFAULT_ROPE = ("linear", 4.0)

_PRESET_LINES = "\n                  ".join(f"{k} = {','.join(v)}" for k, v in PRESETS.items())
_EPILOG = f"""\
arms (--arms, comma-separated; quote the list in a shell, brackets are glob characters):
  native          the original model (evaluated even when not listed, unless --no-reference: it is
                  the reference of recovery and agreement)
  scaled          the same weights with the student's RoPE, untrained
  cpt             next-token training on long blocks (--cpt-seq-len, default the target length)
  ard logits hidden attention
                  distillation from the native model on short blocks (--seq-len): relation KL
                  (LinearARD), next-token KL, hidden states (LongReD-style), attention maps; join with
                  '+' for one weighted objective (ard+logits)
  X+cpt           X, then next-token training on long blocks within the same budget (the paper's two
                  stages; --cpt-share of the tokens go to the second stage: 2M of 4.25M by default)
  presets         {_PRESET_LINES}

arm variants: ARM[ITEM,...]@TOKENS
  @0.25M @500K @25%     this arm's token budget (absolute, or a share of --max-tokens)
  [q] [k,v] [q=2,k,v]   the relations ard distils (with weights; default q,k,v)
  [every-other] [0-11]  the decoder layers distilled (0-based indices and ranges, -1 = the last)
  [logits=0.1]          the weight of an objective in a combination
  [seeds=3]             seeds of this arm (default --seeds)
  [lr=2e-4] [adapter=dense] [seq_len=1024] [cpt_tokens=1M]
                        any `linearard restore` setting, for this arm only

Every trained arm starts from the same native model, the same data and data order, the same settings
(--config / --set / flags, as in `linearard restore`), the same tokens per optimizer step and the
study's RoPE; each is exported, then evaluated with the same tasks and settings. Rerunning the same
command skips finished runs, re-evaluates trained ones whose evaluation is missing, resumes
interrupted training (a crash, a time limit) from its last checkpoint, and an interrupted evaluation
with the tasks it had not finished.

arms as separate jobs (one GPU or machine each), one report:
  linearard study --arms native,scaled --output study/ref
  linearard study --arms ard --no-reference --output study/ard      # any number of these, anywhere
  linearard study --merge study/ref study/ard --output study/all    # checks they agree, one report
On one machine with several GPUs the runs go to the GPUs in parallel by themselves (one process per
GPU; --devices 0,1 picks them, --devices 0 keeps one).

examples:
  linearard study                                            # the default arms, PI x4, 4.25M tokens
  linearard study --rope-type yarn --seeds 2 --output runs/yarn4 --seq-len 1024 --cpt-seq-len 32768
  linearard study --arms 'native,scaled,budget,ablations' --tasks short --limit 500
  linearard study --arms 'ard[k,v]@1M,ard+logits[logits=0.1],ard+cpt[seeds=3]' --dry-run
  linearard study --lr-sweep 1e-4,3e-4,1e-3 --sweep-tokens 1M --tokens-per-step 32768
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    what = parser.add_argument_group("what to compare")
    what.add_argument("--model", metavar="PATH_OR_NAME",
                      help="the native model every arm starts from (default: the config's, else smollm2-135m)")
    what.add_argument("--rope-type", choices=ROPE_TYPES,
                      help="RoPE scaling of the student (default: linear, or the config's RoPE)")
    what.add_argument("--rope-factor", type=_positive(float), metavar="F",
                      help="RoPE scaling factor (default: 4, or the config's RoPE)")
    what.add_argument("--arms", default=DEFAULT_ARMS, metavar="LIST",
                      help=f"arms and presets, comma-separated (default: {DEFAULT_ARMS}; see below)")
    what.add_argument("--max-tokens", type=_count, metavar="N",
                      help=f"training tokens of an arm without its own @budget (default: {PAPER_TOKENS:,}, the "
                           "paper's budget, unless the config sets max_tokens)")
    what.add_argument("--seeds", type=_positive(int), default=1, metavar="N",
                      help="seeds of every trained arm (seed, seed+1, ...); the report gives mean ± spread "
                           "(default: 1)")
    what.add_argument("--output", default="linearard-study", metavar="DIR",
                      help="the study folder: every run, results.json, report.md, plots (default: linearard-study)")
    train = parser.add_argument_group("training (shared by every trained arm)")
    train.add_argument("--seq-len", type=_count, metavar="N",
                       help="block length of the distillation arms (default: the config's, else 256)")
    train.add_argument("--cpt-seq-len", type=_count, metavar="N",
                       help="block length of next-token training on long blocks (default: the target length)")
    train.add_argument("--cpt-share", type=_share, metavar="F",
                       help="fraction of a +cpt arm's tokens spent on its second stage (default: the config's "
                            f"cpt_tokens / max_tokens, else {PAPER_CPT_SHARE:.4f}, i.e. 2M of 4.25M)")
    train.add_argument("--tokens-per-step", type=_count, metavar="N",
                       help="tokens per optimizer step of every trained arm, whatever its block length (blocks "
                            "per step = N / block length), so equal budgets take equal steps (default: the "
                            "longest block length x the config's batch size x grad accumulation)")
    train.add_argument("--lr-sweep", type=_rates, metavar="LR,LR",
                       help="learning rates each trained arm tries on --sweep-tokens first; its full run takes "
                            "the one whose model agrees best with native (next-token KL on validation text)")
    train.add_argument("--sweep-tokens", type=_count, metavar="N",
                       help="training tokens of each sweep run (default: a quarter of --max-tokens)")
    train.add_argument("--data", nargs="+", metavar="PATH",
                       help="training text (default: the built-in public-domain corpus)")
    train.add_argument("--config", metavar="FILE", help="YAML restore settings, or a packaged config name")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any restore setting for every arm, e.g. --set lr=2e-4 (repeatable)")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="where to train and evaluate (default: CUDA when available)")
    evaluation = parser.add_argument_group("evaluation (the same for every arm)")
    evaluation.add_argument("--tasks", default="all",
                            help="evaluation tasks or groups, as in `linearard eval` (default: all)")
    evaluation.add_argument("--limit", type=_count, metavar="N",
                            help=f"items per benchmark, 0 = all (default: {device_defaults('limit')})")
    evaluation.add_argument("--lengths", type=parse_lengths, metavar="L1,L2",
                            help=f"long-context lengths (default: {device_defaults('lengths')})")
    evaluation.add_argument("--eval-batch-size", type=_positive(int), metavar="N",
                            help="sequences per forward pass on short tasks "
                                 f"(default: {device_defaults('batch_size')})")
    evaluation.add_argument("--eval-set", action="append", default=[], metavar="KEY=VALUE",
                            help="any evaluation setting (linearard.evaluation.EvalSettings), e.g. "
                                 "--eval-set samples=10 --eval-set ppl_lengths=256,1024 (repeatable)")
    jobs = parser.add_argument_group("jobs")
    jobs.add_argument("--devices", type=_devices, metavar="LIST",
                      help="run the study's runs in parallel, one process per entry: CUDA indices (0,1,2,3) or "
                           "cpu,cpu; a GPU listed twice (0,0,1,1) runs two processes that share its memory, "
                           "which pays for small models (default: every visible GPU when there are several)")
    jobs.add_argument("--no-reference", action="store_true",
                      help="leave the native model's evaluation to another job (agreement still compares with "
                           "it); for an arm job whose folder is merged later")
    jobs.add_argument("--merge", nargs="+", metavar="DIR",
                      help="merge finished study folders into one report in --output (training and evaluation "
                           "options are taken from the folders); refuses folders whose settings disagree")
    jobs.add_argument("--only", action="append", default=[], help=argparse.SUPPRESS)  # a worker's run label
    # a worker's share of a GPU that several workers use at once (its memory plans stay inside it)
    jobs.add_argument("--memory-fraction", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--dry-run", action="store_true",
                        help="print every run with its stages and what a rerun would do; train nothing")


def run(args: argparse.Namespace) -> int:
    from linearard.study import run_study
    from linearard.study.runner import Study, describe_plan

    if args.merge:
        from linearard.study.merge import merge_studies

        failures = merge_studies([Path(d) for d in args.merge], Path(args.output), command=command_line(args))
        return 1 if failures else 0
    settings = settings_from_args(args)
    if args.memory_fraction:  # a worker sharing its GPU: the memory plan sees only this share
        import torch

        torch.cuda.set_per_process_memory_fraction(args.memory_fraction)
    if args.dry_run:
        study = Study(settings)
        print(describe_plan(study, study.plan()))
        return 0
    failures = run_study(settings)
    if failures:
        print(f"{len(failures)} run(s) failed; rerun the same command to retry them: "
              + "; ".join(f"{k}: {v}" for k, v in failures.items()), file=sys.stderr)
        return 1
    return 0


def settings_from_args(args: argparse.Namespace) -> StudySettings:
    """`StudySettings` from parsed arguments.

    Raises:
        UserError: bad arms, settings, tasks or evaluation settings.
    """
    import torch

    from linearard.evaluation.settings import EvalSettings
    from linearard.evaluation.tasks import resolve_tasks
    from linearard.study.runner import StudySettings

    arms = parse_arms(args.arms)
    given = _keys_given(args.config, args.set)
    flags: dict[str, Any] = {}
    for name in ("model", "seq_len", "cpt_seq_len", "data"):
        if getattr(args, name) is not None:
            flags[name] = getattr(args, name)
    if args.device != "auto":
        flags["device"] = args.device
    if args.rope_type or args.rope_factor or not given & set(ROPE_KEYS):
        flags["rope_type"] = args.rope_type or DEFAULT_ROPE[0]
        flags["rope_factor"] = args.rope_factor or DEFAULT_ROPE[1]
    if args.max_tokens is not None or "max_tokens" not in given:
        flags["max_tokens"] = PAPER_TOKENS if args.max_tokens is None else args.max_tokens
    cpt_share = args.cpt_share
    if cpt_share is None:
        # A config that splits its budget into two stages (e.g. --config paper) sets the +cpt arms' split.
        configured = build_config(yaml_source=args.config, sets=args.set)
        split = "cpt_tokens" in given and configured.cpt_tokens > 0
        cpt_share = configured.cpt_tokens / configured.max_tokens if split else PAPER_CPT_SHARE
    flags["cpt_tokens"] = 0  # each arm sets its own (arm_config)
    base = build_config(yaml_source=args.config, sets=args.set, flags=flags)

    cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    overrides = eval_overrides(args.eval_set)
    if args.limit is not None:
        overrides["limit"] = args.limit or None
    if args.lengths:
        overrides["lengths"] = tuple(args.lengths)
    if args.eval_batch_size:
        overrides["batch_size"] = args.eval_batch_size
    eval_settings = EvalSettings.for_device("cuda" if cuda else "cpu", **overrides)
    lr_sweep = tuple(args.lr_sweep or ())
    sweep_tokens = args.sweep_tokens or (max(1, base.max_tokens // 4) if lr_sweep else None)
    tasks = resolve_tasks(args.tasks)
    if "agreement" not in tasks:
        tasks.append("agreement")  # the headline: perplexity alone can reward domain fit over restoration
    return StudySettings(
        base=base,
        arms=arms,
        seeds=args.seeds,
        cpt_share=cpt_share,
        output=Path(args.output),
        tasks=tasks,
        eval_settings=eval_settings,
        eval_device=None if args.device == "auto" else args.device,
        command=command_line(args),
        argv=sys.argv[1:] if sys.argv[1:2] == ["study"] else None,
        tokens_per_step=args.tokens_per_step,
        lr_sweep=lr_sweep,
        sweep_tokens=sweep_tokens,
        reference=not args.no_reference,
        only=tuple(args.only),
        devices=tuple(args.devices or ()),
    )


def eval_overrides(items: list[str]) -> dict[str, Any]:
    """``["samples=10", "ppl_lengths=256,1024"]`` -> ``{"samples": 10, "ppl_lengths": (256, 1024)}``.

    Raises:
        UserError: an unknown setting or a value of the wrong kind.
    """
    import dataclasses

    import yaml

    from linearard.evaluation.settings import EvalSettings

    fields = {f.name: f for f in dataclasses.fields(EvalSettings)}
    defaults = EvalSettings()
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = (p.strip() for p in item.partition("="))
        name = key.replace("-", "_")
        if not sep or name not in fields:
            raise UserError(f"--eval-set expects KEY=VALUE with KEY one of {', '.join(fields)}; got {item!r}")
        default = getattr(defaults, name)
        try:
            if isinstance(default, tuple):
                out[name] = _tuple_value(raw, type(default[0]))
            else:
                out[name] = _whole_number(raw, optional=default is None)
        except (TypeError, ValueError, yaml.YAMLError) as err:
            raise UserError(f"--eval-set {item!r}: {err}") from None
    return out


def _tuple_value(raw: str, kind: type) -> tuple:
    items = [v.strip() for v in raw.strip("[]() ").split(",") if v.strip()]
    if not items:
        raise ValueError("expected a comma-separated list")
    return tuple(parse_count(v) if kind is int else float(v) for v in items)


def _whole_number(raw: str, *, optional: bool) -> int | None:
    import yaml

    value = yaml.safe_load(raw) if raw else None
    if value is None and optional:
        return None
    return parse_count(value)


def command_line(args: argparse.Namespace) -> str:
    """The ``linearard study`` command that reproduces `args`, every option spelled out."""
    parts = ["linearard", "study"]
    if getattr(args, "merge", None):
        return shlex.join([*parts, "--merge", *args.merge, "--output", args.output])
    for name in ("model", "rope_type", "rope_factor", "arms", "max_tokens", "seeds", "output", "seq_len",
                 "cpt_seq_len", "cpt_share", "tokens_per_step", "sweep_tokens", "config",
                 "device", "tasks", "limit", "eval_batch_size"):
        value = getattr(args, name, None)
        if value is not None:
            parts += [f"--{name.replace('_', '-')}", str(value)]  # str(float) reads back exactly
    for name in ("lengths", "lr_sweep"):
        if getattr(args, name, None):
            parts += [f"--{name.replace('_', '-')}", ",".join(map(str, getattr(args, name)))]
    if getattr(args, "no_reference", False):
        parts.append("--no-reference")
    if getattr(args, "data", None):
        parts += ["--data", *args.data]
    for item in getattr(args, "set", []):
        parts += ["--set", item]
    for item in getattr(args, "eval_set", []):
        parts += ["--eval-set", item]
    return shlex.join(parts)


def _keys_given(config: str | None, sets: list[str]) -> set[str]:
    """The restore settings the config file and the --set items set (they decide a few defaults)."""
    keys = set(load_yaml(config)) if config else set()
    keys |= {item.partition("=")[0].strip().replace("-", "_") for item in sets}
    return keys


def _count(text: str) -> int:
    try:
        value = parse_count(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive(kind: type) -> Any:
    def convert(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
        return value

    convert.__name__ = kind.__name__
    return convert


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text!r}")
    return value




def _rates(text: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated learning rates such as 1e-4,3e-4, got {text!r}"
                                         ) from None
    if not values or not all(math.isfinite(v) and v > 0 for v in values) or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"expected distinct positive learning rates, got {text!r}")
    return values


def _devices(text: str) -> list[str]:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if not items or not all(x == "cpu" or x.isdigit() for x in items):
        raise argparse.ArgumentTypeError(f"expected CUDA indices such as 0,1 or cpu,cpu, got {text!r}")
    return items
