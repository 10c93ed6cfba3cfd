"""`linearard restore`: the command-line face of `linearard.training.loop.restore`.

Every `RestoreConfig` field is a flag (``lora_rank`` -> ``--lora-rank``) with the field's help text;
``--config FILE`` and ``--set KEY=VALUE`` fill in the rest (see `linearard.config`).
"""

from __future__ import annotations

import argparse
from typing import Any

from linearard.config import GROUPS, RestoreConfig, build_config, coerce, field_type, fields_in_group

_EPILOG = """\
examples:
  linearard restore                                  # the demo: SmolLM2-135M, linear x4 (8K -> 32K), CPU-sized
  linearard restore --max-tokens 4.25M --seq-len 4096  # the paper's budget, on a GPU
  linearard restore --model path/to/model --target-length 32768 --data corpus/ --output runs/x
  linearard restore --config paper --dry-run         # a packaged config; print the plan only
  torchrun --nproc_per_node 2 -m linearard restore --strategy fsdp --model path/to/model ...
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per config field, grouped as in `linearard.config.GROUPS`, plus --config and --set."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = _EPILOG
    parser.add_argument(
        "--config", metavar="FILE", help="YAML file of settings, or a packaged config name (default, paper)"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="override any setting by its name, e.g. --set lora_dropout=0.05 (repeatable)",
    )
    defaults = RestoreConfig()
    for group in GROUPS:
        section = parser.add_argument_group(group)
        for f in fields_in_group(group):
            _add_flag(section, f.name, f.metadata, getattr(defaults, f.name))


def _add_flag(section: Any, name: str, meta: dict[str, Any], default: Any) -> None:
    flag = "--" + name.replace("_", "-")
    kind = field_type(name)
    shown = "" if default in (None, [], {}) else f" (default: {_show(default)})"
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": meta["help"] + shown}
    if kind is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    else:
        kwargs["metavar"] = meta.get("metavar", "{" + ",".join(meta["choices"]) + "}" if "choices" in meta else None)
        if kind in (list, dict):
            kwargs["nargs"] = "+"
        kwargs["type"] = _typed(name)
    section.add_argument(flag, **kwargs)


def _typed(name: str) -> Any:
    """An argparse ``type`` that reports a bad value as argparse does (usage line, exit 2)."""
    from linearard.errors import UserError

    kind = field_type(name)

    def convert(text: str) -> Any:
        if kind in (list, dict):
            return text  # the whole list is converted once argparse has collected it
        try:
            return coerce(name, text, origin="the command line")
        except UserError as err:
            raise argparse.ArgumentTypeError(str(err).split(": ", 1)[-1]) from None

    convert.__name__ = kind.__name__
    return convert


def _show(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def config_from_args(args: argparse.Namespace) -> RestoreConfig:
    """The run's config from parsed arguments: defaults < --config < --set < flags."""
    flags = {name: value for name, value in vars(args).items() if name in RestoreConfig.__dataclass_fields__}
    return build_config(yaml_source=args.config, sets=args.set, flags=flags)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if config.dry_run:
        from linearard.training.loop import check_run_folder
        from linearard.training.plan import dry_run_plan

        plan = dry_run_plan(config)
        check_run_folder(config)
        print(plan.describe())
        print("dry run: nothing was trained or written")
        return 0
    from linearard.training.loop import restore

    result = restore(config)
    if result.main_process:
        rate = result.tokens / max(result.seconds, 1e-9)
        print(
            f"done: {result.steps} steps, {result.tokens} tokens in {result.seconds:.0f} s ({rate:.0f} tokens/s); "
            f"output in {result.output}"
        )
    return 0
