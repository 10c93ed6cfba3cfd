"""`linearard export`: fold a restore checkpoint's adapters into a model that plain transformers loads.

The output folder holds the merged model (safetensors, in the dtype asked for, by default the
model's own; each adapted weight is merged in fp32), its config with the student's RoPE scaling and
``max_position_embeddings`` = the target length, written in both config dialects (transformers 5
``rope_parameters``; 4.x ``rope_scaling`` + top-level ``rope_theta``), the tokenizer, and the adapters
alone in ``adapter/`` (a peft adapter folder for LoRA, ``adapters.safetensors`` otherwise, and the
run's ``config.yaml``), and a ``README.md`` model card (`linearard.model_card`).

The merge builds a copy on the CPU, tensor by tensor (`linearard.models.adapters.merged_state_dict`):
the model exported keeps its adapters, device and dtype and may go on being used, and the memory
taken is one copy of the model in the saved dtype on the CPU, none on the accelerator.

The output folder must be new, empty, or an earlier export (replaced only with ``overwrite``); it may
not hold or lie inside the checkpoint or the base model (see `linearard.outputs`).

RoPE types whose frequencies transformers recomputes from the input length are written in a static
form that gives the frequencies the student was trained with, at every length:

- dynamic NTK -> the plain RoPE base that dynamic NTK computes at the target length;
- LongRoPE -> the long factors for short inputs too (``short_factor = long_factor``).

Example:
    >>> export_checkpoint("runs/smol/checkpoints/step-00000150", "runs/smol/model")  # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained("runs/smol/model")  # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from linearard.errors import UserError
from linearard.models.adapters import adapter_state_dict, merged_state_dict, transformers_model, unwrap
from linearard.models.rope import SCALED_LAYER_TYPE, RopeScaling, legacy_rope_fields, rotary_dim, scaled_config
from linearard.outputs import check_output, clear_own, describe_os_error, mark

ADAPTER_DIR = "adapter"
DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def export_model(
    model: torch.nn.Module,
    tokenizer: Any,
    scaling: RopeScaling,
    output: str | Path,
    *,
    dtype: torch.dtype | None = None,
    config: Any = None,
    card: dict[str, Any] | None = None,
    overwrite: bool = False,
    inputs: Sequence[str | Path] = (),
) -> Path:
    """Write `model` (with adapters) as a merged, RoPE-scaled transformers model into `output`.

    The merged weights are built on the CPU (see the module docstring); `model` is not changed. The
    folder is assembled beside `output` and moved into place when complete.

    Args:
        model: the restored model, adapters on (a peft LoRA model or one with dense deltas), possibly
            inside a data-parallel or ``torch.compile`` wrapper; not sharded (for FSDP export a checkpoint).
        tokenizer: saved beside the weights.
        scaling: the student's RoPE scaling.
        output: the folder to create.
        dtype: dtype of the saved weights (default: the dtype of the model's frozen weights).
        config: the run's `RestoreConfig`, saved as ``adapter/config.yaml`` when given.
        card: the run's numbers for the model card (``heldout``, ``tokens_trained``; see `linearard.model_card`).
        overwrite: replace an earlier export in `output` (never anything else).
        inputs: paths that must stay untouched (checkpoint, base model): `output` may not hold them.

    Returns:
        `output` as a Path.

    Raises:
        UserError: `output` may not be written (see `linearard.outputs.check_output`), or the
            writing failed (a full disk); what was there before is unchanged.
    """
    output = check_output(output, "export", overwrite=overwrite, inputs=inputs)
    model = unwrap(model)
    where = output.resolve()
    tmp = None
    try:
        where.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{where.name}-", dir=where.parent))
        _write_adapters(model, tmp / ADAPTER_DIR, config)
        base_config = model.config
        merged = _merged_model(model, exported_config(base_config, scaling), dtype)
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        _add_legacy_rope(tmp / "config.json", merged.config)
        from linearard.model_card import write_model_card

        base_model = config.model if config is not None else getattr(base_config, "name_or_path", "") or "model"
        write_model_card(tmp, base_model, scaling, config=config, architecture=type(merged).__name__, **(card or {}))
        mark(tmp, "export", entries=os.listdir(tmp))
        _move_into_place(tmp, where)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise UserError(f"could not write the exported model to {output}: {describe_os_error(err)}") from None
        raise
    return output


def _merged_model(model: torch.nn.Module, config: Any, dtype: torch.dtype | None) -> Any:
    """The plain transformers model of `config` holding `model`'s merged weights on the CPU. It is built
    on the meta device and takes the merged tensors as they are, so its weights take no memory of their
    own; its non-persistent buffers (rotary frequencies) stay unmaterialised: it is for saving."""
    state = merged_state_dict(model, dtype)
    config.dtype = dtype or next(t.dtype for t in state.values() if t.is_floating_point())
    inner = transformers_model(model)
    with torch.device("meta"):
        merged = type(inner)(config)
    merged.load_state_dict(state, assign=True)
    merged.tie_weights()  # one tensor under both names already; this makes it one parameter too
    if getattr(inner, "generation_config", None) is not None:  # the base model's sampling defaults
        merged.generation_config = copy.deepcopy(inner.generation_config)
    return merged


def _move_into_place(tmp: Path, output: Path) -> None:
    """Rename the finished folder to `output`; an existing (empty, or earlier-export) `output` keeps its
    inode (it may be the current folder) and receives the entries one by one."""
    if not output.exists():
        os.replace(tmp, output)
        return
    clear_own(output)
    for entry in os.listdir(tmp):
        os.replace(tmp / entry, output / entry)
    tmp.rmdir()


def exported_config(config: Any, scaling: RopeScaling) -> Any:
    """A copy of the native `config` set up for the scaled student, in a form plain transformers
    reproduces exactly at every length (see the module docstring)."""
    new = scaled_config(config, scaling)
    params = copy.deepcopy(new.rope_parameters)
    per_type = all(isinstance(v, dict) for v in params.values())
    entry = params[SCALED_LAYER_TYPE] if per_type else params
    if entry.get("rope_type") == "dynamic":
        dim = rotary_dim(new, entry)
        factor = entry["factor"]
        # The base dynamic NTK uses at the target length (same expression as transformers').
        base = entry["rope_theta"] * (
            (factor * scaling.target_length / new.max_position_embeddings) - (factor - 1)
        ) ** (dim / (dim - 2))
        entry = {k: v for k, v in entry.items() if k in ("partial_rotary_factor",)}
        entry.update(rope_type="default", rope_theta=base)
    elif entry.get("rope_type") == "longrope":
        entry = dict(entry, short_factor=list(entry["long_factor"]))
    if per_type:
        params[SCALED_LAYER_TYPE] = entry
    else:
        params = entry
    new.rope_parameters = params
    new.max_position_embeddings = scaling.target_length
    return new


def check_exportable(config: Any, scaling: RopeScaling) -> None:
    """Raise `UserError` when the architecture's config cannot hold this RoPE scaling (e.g. Phi-3
    accepts only LongRoPE), so that a run fails before training rather than at export."""
    candidate = exported_config(config, scaling)
    validate = getattr(candidate, "validate", None)
    if validate is None:
        return
    try:
        validate()
    except Exception as err:  # transformers' strict-dataclass validation error wraps the ValueError
        cause = str(err).strip().splitlines()[-1].strip()
        raise UserError(
            f"{type(config).__name__} cannot hold a {scaling.rope_type} RoPE scaling ({cause}); "
            "choose another --rope-type"
        ) from None


def export_checkpoint(
    checkpoint: str | Path,
    output: str | Path,
    *,
    model: str | None = None,
    dtype: torch.dtype | None = None,
    card: dict[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] = print,
) -> Path:
    """Rebuild a run's model from a checkpoint folder (or a run folder: its newest checkpoint) and export it.

    Args:
        checkpoint: ``OUTPUT/checkpoints/step-N`` or the run's OUTPUT folder.
        output: the folder to create.
        model: the base model, when it moved since the run (default: the run's ``--model``).
        dtype: dtype of the saved weights (default: the dtype the base model declares).
        card: the run's numbers for the model card, as for `export_model`.
        overwrite: replace an earlier export in `output` (never anything else).
        log: where to report a damaged newer checkpoint passed over.
    """
    from linearard.config import build_config
    from linearard.models.adapters import add_adapters, load_adapter_state_dict
    from linearard.models.load import load_model, local_model_path
    from linearard.training.checkpoint import newest_valid_checkpoint, read_adapters, verify_checkpoint
    from linearard.training.plan import read_model_meta, resolve_scaling

    folder = Path(checkpoint)
    if not folder.is_dir():
        raise UserError(f"checkpoint {str(folder)!r} not found")
    if not (folder / "adapters.safetensors").exists():
        newest, skipped = newest_valid_checkpoint(folder)
        if newest is None:
            if skipped:
                raise UserError(f"{folder} holds no intact checkpoint ({skipped[0][0].name}: {skipped[0][1]})")
            raise UserError(f"{folder} is neither a checkpoint nor a run folder with checkpoints")
        for path, problem in skipped:
            log(f"skipping checkpoint {path}: {problem}")
        folder = newest
    else:
        problem = verify_checkpoint(folder)
        if problem:
            raise UserError(f"checkpoint {folder} is damaged: {problem}")
    config = build_config(yaml_source=folder / "config.yaml")
    if model is not None:
        config.model = model
    inputs = [folder, *(p for p in (local_model_path(config.model),) if p is not None)]
    check_output(output, "export", overwrite=overwrite, inputs=inputs)  # before the slow part
    base, tokenizer = load_model(config.model, device="cpu", dtype=torch.float32)
    scaling = resolve_scaling(config, base.config)
    base = add_adapters(base, config.adapter, rank=config.lora_rank, alpha=config.lora_alpha, dropout=0.0)
    load_adapter_state_dict(base, {k: v.float() for k, v in read_adapters(folder).items()})
    if dtype is None:
        dtype = read_model_meta(config.model)[2]
    trainer = folder / "trainer.json"  # the tokens trained up to this checkpoint, for the model card
    card = {"tokens_trained": json.loads(trainer.read_text())["tokens"], **(card or {})} if trainer.exists() else card
    return export_model(base, tokenizer, scaling, output, dtype=dtype, config=config, card=card, overwrite=overwrite,
                        inputs=inputs)


def _write_adapters(model: torch.nn.Module, folder: Path, config: Any) -> None:
    folder.mkdir(parents=True)
    if hasattr(model, "peft_config"):
        model.save_pretrained(folder)  # adapter_config.json + adapter_model.safetensors
    else:
        tensors = {k: v.detach().contiguous().cpu() for k, v in adapter_state_dict(model).items()}
        save_file(tensors, folder / "adapters.safetensors")
    if config is not None:
        (folder / "config.yaml").write_text(config.to_yaml())


def _add_legacy_rope(path: Path, config: Any) -> None:
    """Add the 4.x spelling (``rope_theta`` + ``rope_scaling``) beside transformers 5's ``rope_parameters``."""
    data = json.loads(path.read_text())
    for key, value in legacy_rope_fields(config).items():
        if data.get(key) is None:  # transformers 5 writes some 4.x names as null (Gemma 3's rope_local_base_freq)
            data[key] = value
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


# -- command line ----------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, metavar="DIR",
        help="a checkpoint folder (OUTPUT/checkpoints/step-N) or a restore run's OUTPUT folder (newest checkpoint)",
    )
    parser.add_argument(
        "--output", required=True, metavar="DIR",
        help="folder for the merged model: new, empty, or an earlier export (with --overwrite)",
    )
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an earlier export in --output (a folder holding anything else is never touched)",
    )
    parser.add_argument(
        "--model", metavar="PATH_OR_NAME", help="the base model, if it moved since the run (default: the run's)"
    )
    parser.add_argument(
        "--dtype", choices=tuple(DTYPES), default="auto",
        help="dtype of the saved weights (auto = the dtype the base model declares)",
    )


def run(args: argparse.Namespace) -> int:
    target = export_checkpoint(
        args.checkpoint, args.output, model=args.model, dtype=DTYPES[args.dtype], overwrite=args.overwrite
    )
    print(f"exported {target} (adapters in {target / ADAPTER_DIR})")
    return 0
