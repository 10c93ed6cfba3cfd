"""`linearard eval`: evaluate one or more models side by side and write a report."""

from __future__ import annotations

import argparse

from linearard.config import parse_lengths
from linearard.errors import UserError
from linearard.evaluation.settings import EvalSettings, device_defaults
from linearard.evaluation.tasks import LONG_TASKS, SHORT_TASKS, TASK_GROUPS

EPILOG = f"""\
tasks (comma-separated; default: all):
  short text   {", ".join(SHORT_TASKS)}
  long context {", ".join(LONG_TASKS)}
  groups       {", ".join(TASK_GROUPS)}
  lm_eval:<task>  any lm-evaluation-harness task, in-process (needs: pip install 'lm_eval>=0.4')

models: smollm2-135m (embedded), smollm2-135m@linear:4 (the same with a RoPE scaling, untrained),
  a Hugging Face model folder or a .gguf file; NAME=SPEC names a model in the tables. The first
  model is the reference (the original) unless --reference says otherwise.

examples:
  linearard eval --model smollm2-135m --model smollm2-135m@linear:4 --output runs/eval
  linearard eval --model orig=smollm2-135m --model restored=runs/pi4/export --tasks short --limit 300
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("--model", action="append", required=True, metavar="SPEC",
                        help="model to evaluate (repeat for several): a name, folder or .gguf, optionally "
                             "NAME=SPEC")
    parser.add_argument("--tasks", default="all", help="tasks or groups, comma-separated (default: all)")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="items per benchmark, a fixed random subset; 0 = all "
                             f"(default: {device_defaults('limit')})")
    parser.add_argument("--lengths", type=parse_lengths, default=None, metavar="L1,L2",
                        help=f"long-context lengths (default: {device_defaults('lengths')})")
    parser.add_argument("--ppl-lengths", type=parse_lengths, default=None, metavar="L1,L2",
                        help=f"window lengths of the held-out perplexity (default: {device_defaults('ppl_lengths')})")
    parser.add_argument("--samples", type=int, default=None, metavar="N",
                        help="prompts per passkey cell and per RULER-style length "
                             f"(default: {device_defaults('samples')})")
    parser.add_argument("--lm-eval-include", default=None, metavar="DIR",
                        help="folder of extra lm-evaluation-harness task YAMLs for lm_eval:<task>")
    parser.add_argument("--reference", default=None, metavar="NAME",
                        help="the original model that recovery, agreement and chat compare with (default: "
                             "the first --model)")
    parser.add_argument("--output", default="runs/eval", metavar="DIR",
                        help="where results.json, report.md and the plots go (default: runs/eval)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights dtype (default: float32 on CPU, bfloat16 on GPU)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="N",
                        help=f"sequences per forward pass on short tasks (default: {device_defaults('batch_size')})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of subsets and synthetic prompts (default: 0)")


def run(args: argparse.Namespace) -> int:
    import torch

    from linearard.evaluation.report import summary_tables
    from linearard.evaluation.suite import evaluate

    models = _named_models(args.model)
    device = torch.device(args.device) if args.device else torch.device(
        "cuda" if torch.cuda.is_available() else "cpu")
    overrides = {}
    if args.ppl_lengths:
        overrides["ppl_lengths"] = tuple(args.ppl_lengths)
    if args.lm_eval_include:
        overrides["lm_eval_include"] = args.lm_eval_include
    if args.samples is not None:
        if args.samples < 1:
            raise UserError("--samples must be at least 1")
        overrides["samples"] = args.samples
    if args.limit is not None and args.limit < 0:
        raise UserError("--limit must be 0 (all) or a positive number")
    if args.batch_size is not None and args.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    results = evaluate(
        models,
        args.tasks,
        limit=args.limit,
        lengths=args.lengths,
        device=args.device,
        dtype=args.dtype,
        batch_size=args.batch_size,
        seed=args.seed,
        output_dir=args.output,
        reference=args.reference,
        settings=EvalSettings.for_device(device.type, **overrides),
    )
    print(summary_tables(results))
    return 0


def _named_models(specs: list[str]) -> dict[str, str]:
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        if not (sep and name and rest and "/" not in name):  # an '=' inside a path names nothing
            name, rest = spec, spec
        if name in models:
            raise UserError(f"two --model arguments are named {name!r}; name them NAME=SPEC")
        models[name] = rest
    return models
