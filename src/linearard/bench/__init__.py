"""`linearard bench`: speed and memory benchmarks; one sub-target per thing measured.

- ``kernel``: the relation-KL operator against SDPA flash attention and the materialised version.
- ``restore``: one restore (ARD) training step against a plain LoRA next-token step of the same student.
"""

from __future__ import annotations

import argparse
import importlib

TARGETS = {
    "kernel": ("linearard.bench.kernel", "the relation-KL operator vs SDPA flash attention and the naive path"),
    "restore": ("linearard.bench.restore_step", "a restore step vs a plain LoRA next-token step (memory, time)"),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    for name, (module, help_text) in TARGETS.items():
        target = sub.add_parser(name, help=help_text, description=help_text)
        importlib.import_module(module).add_arguments(target)


def run(args: argparse.Namespace) -> int:
    return importlib.import_module(TARGETS[args.target][0]).run(args)
