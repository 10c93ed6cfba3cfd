"""`linearard` command line: one entry point, one sub-command per job.

Each sub-command lives in its own module, which provides ``add_arguments(parser)`` and
``run(args) -> int``; this file only wires them together and turns `UserError` (and a failed write, and an
interrupted run) into one line.
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from linearard.errors import Interrupted, UserError
from linearard.outputs import describe_os_error

# name -> (module, one-line help)
COMMANDS = {
    "restore": (
        "linearard.training.command",
        "extend a model's context by RoPE scaling and restore its short-text skill",
    ),
    "export": ("linearard.export", "merge a checkpoint's adapters into a full model that plain transformers loads"),
    "eval": (
        "linearard.evaluation.command",
        "short-text and long-context evaluation of one or more models, with a report",
    ),
    "study": ("linearard.study", "train and evaluate LinearARD against its baselines from one starting point"),
    "bench": ("linearard.bench", "speed and memory benchmarks (the relation-KL kernel, a restore step)"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="linearard",
        description=(
            "Give context-extended language models their short-text skills back.\n\n"
            "A RoPE-scaled student is distilled from the same model with native RoPE (the teacher)\n"
            "by matching the row-wise softmax of the Q·Qᵀ, K·Kᵀ and V·Vᵀ relations of every layer and\n"
            "head, with an exact linear-memory kernel. Run `linearard COMMAND --help` for each command."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(_module=module)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        return importlib.import_module(args._module).run(args) or 0
    except UserError as err:
        print(f"linearard {args.command}: error: {err}", file=sys.stderr)
        return 2
    except Interrupted as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, said once
            print(f"linearard {args.command}: {err}; continue with: {resume_command(argv)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"linearard {args.command}: interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine, not the code: a full disk, a read-only or vanished folder
        where = f"{err.filename}: " if err.filename else ""
        print(f"linearard {args.command}: error: {where}{describe_os_error(err)}", file=sys.stderr)
        return 2


def resume_command(argv: list[str]) -> str:
    """The command line that continues an interrupted run: the same arguments, with ``--resume``
    for `restore` (a study resumes its unfinished arms by itself), under torchrun when this ran there."""
    args = list(argv)
    if args[:1] == ["restore"] and "--resume" not in args:
        args.append("--resume")
    prefix = "linearard"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        nodes = f"--nnodes {world // per_node} ... " if world > per_node else ""
        prefix = f"torchrun {nodes}--nproc_per_node {per_node} -m linearard"
    return " ".join([prefix, *map(shlex.quote, args)])


if __name__ == "__main__":
    sys.exit(main())
