"""Checkpoints that a crash cannot corrupt, and everything needed to resume a run exactly.

A checkpoint is a folder ``OUTPUT/checkpoints/step-00000050/`` holding:

- ``adapters.safetensors`` — the trainable tensors (full, not sharded), by parameter name;
- ``optimizer.pt`` — the optimizer state keyed by parameter name;
- ``trainer.json`` — stage, step and token counters, scheduler state, world size;
- ``rank-00000.pt`` … — per process: its data position and its RNG states;
- ``config.yaml`` — the resolved run configuration;
- ``manifest.json`` — the size and SHA-256 of every other file, written last.

Each is first written into a hidden temporary folder that is renamed into place only when complete, so
a crash leaves either a whole ``step-*`` folder or a temporary one, which the next save removes. The
manifest catches what the rename cannot: a file truncated or damaged later (a full disk during a
copy, a bad sector); resume takes the newest checkpoint that verifies (`newest_valid_checkpoint`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from linearard.errors import UserError
from linearard.outputs import describe_os_error

_STEP_DIR = re.compile(r"^step-(\d{8})$")
_TMP_PREFIX = ".tmp-"
MANIFEST = "manifest.json"


@dataclass
class TrainerState:
    """Counters of a run, saved in ``trainer.json``.

    ``stage`` indexes the run's stages (restore, then next-token); ``step`` counts optimizer steps
    within that stage and ``tokens`` training tokens over the whole run.
    """

    stage: int = 0
    step: int = 0
    tokens: int = 0
    world_size: int = 1
    scheduler: dict[str, Any] = field(default_factory=dict)


def rng_state() -> dict[str, Any]:
    """Every random generator the loop may draw from (torch CPU/CUDA, Python, NumPy)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": _tuples_to_lists(random.getstate()),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(_lists_to_tuples(state["python"]))
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def list_checkpoints(output: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(output: str | Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1] if found else None


def newest_valid_checkpoint(output: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run that verifies, and the newer ones passed over with the reason.

    Example:
        >>> found, skipped = newest_valid_checkpoint("runs/smol")  # doctest: +SKIP
        >>> skipped  # doctest: +SKIP
        [(PosixPath('runs/smol/checkpoints/step-00000100'), 'optimizer.pt is 4096 bytes, not 81920')]
    """
    skipped = []
    for path in reversed(list_checkpoints(output)):
        problem = verify_checkpoint(path)
        if problem is None:
            return path, skipped
        skipped.append((path, problem))
    return None, skipped


def verify_checkpoint(path: str | Path) -> str | None:
    """None when every file listed in the checkpoint's manifest is there with its size and checksum,
    else what is wrong. A checkpoint without a manifest (written by linearard 0.1) is checked for its
    files only."""
    path = Path(path)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
    except FileNotFoundError:
        missing = [name for name in ("adapters.safetensors", "optimizer.pt", "trainer.json", "config.yaml")
                   if not (path / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"its {MANIFEST} is unreadable ({err})"
    for name, expected in files.items():
        file = path / name
        try:
            size = file.stat().st_size
        except OSError:
            return f"{name} is missing"
        if size != expected["size"]:
            return f"{name} is {size} bytes, not {expected['size']}"
        if _sha256(file) != expected["sha256"]:
            return f"{name} does not match its checksum"
    return None


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (e.g. the disk is full); the older checkpoints are intact."""


def write_checkpoint(
    output: str | Path,
    global_step: int,
    *,
    adapters: dict[str, torch.Tensor],
    optimizer: dict[str, Any],
    trainer: TrainerState,
    ranks: list[dict[str, Any]],
    config_yaml: str,
    keep: int,
) -> Path:
    """Write one checkpoint atomically and delete all but the newest `keep`; returns its folder.

    Args:
        global_step: optimizer steps over the whole run (names the folder).
        adapters: full trainable tensors by parameter name.
        optimizer: the optimizer state dict (parameter-name keyed).
        ranks: one ``{"data": ..., "rng": ...}`` dict per process, in rank order.
    """
    parent = checkpoint_dir(output)
    parent.mkdir(parents=True, exist_ok=True)
    for stale in parent.glob(_TMP_PREFIX + "*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = parent / f"step-{global_step:08d}"
    tmp = None
    try:
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=parent))
        save_file({k: v.detach().contiguous().cpu() for k, v in adapters.items()}, tmp / "adapters.safetensors")
        torch.save(optimizer, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps(trainer.__dict__, indent=1))
        for rank, state in enumerate(ranks):
            torch.save(state, tmp / f"rank-{rank:05d}.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        _write_manifest(tmp)
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException as err:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):
            raise CheckpointWriteError(_write_failure(final, err, latest_checkpoint(output))) from None
        raise
    for old in list_checkpoints(output)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


@dataclass
class Checkpoint:
    """A checkpoint read back from disk (see `read_checkpoint`)."""

    path: Path
    adapters: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    trainer: TrainerState
    rank_state: dict[str, Any]


def read_checkpoint(path: str | Path, *, rank: int = 0, world_size: int = 1) -> Checkpoint:
    """Load a checkpoint for process `rank`; the world size must match the one that wrote it."""
    path = Path(path)
    try:
        trainer = TrainerState(**json.loads((path / "trainer.json").read_text()))
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"{path} is not a readable linearard checkpoint ({err})") from None
    if trainer.world_size != world_size:
        raise UserError(
            f"{path} was written by {trainer.world_size} process(es) but this run has {world_size}; "
            f"resume with the same number of processes (torchrun --nproc_per_node {trainer.world_size})"
        )
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        rank_state = torch.load(path / f"rank-{rank:05d}.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a damaged pickle raises anything from EOFError to RuntimeError
        raise UserError(f"{path} is damaged: {_first_line(err)}") from None
    return Checkpoint(path=path, adapters=read_adapters(path), optimizer=optimizer, trainer=trainer,
                      rank_state=rank_state)


def read_adapters(path: str | Path) -> dict[str, torch.Tensor]:
    file = Path(path) / "adapters.safetensors"
    if not file.is_file():
        raise UserError(f"{path} is not a linearard checkpoint (no adapters.safetensors)")
    try:
        return load_file(file)
    except Exception as err:  # safetensors reports a truncated file as its own error type
        raise UserError(f"{file} is damaged: {_first_line(err)}") from None


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_config_yaml(path: str | Path) -> str:
    file = Path(path) / "config.yaml"
    try:
        return file.read_text()
    except OSError:
        raise UserError(f"{path} is not a linearard checkpoint (no config.yaml)") from None


def _write_failure(target: Path, err: OSError, previous: Path | None) -> str:
    what = describe_os_error(err)
    kept = f"the newest checkpoint is still {previous}" if previous else "no earlier checkpoint exists"
    return f"could not write checkpoint {target}: {what}; {kept}"


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "sha256": _sha256(p)} for p in sorted(folder.iterdir())}
    (folder / MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with open(file, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync_tree(folder: Path) -> None:
    # Data must reach the disk before the rename makes the folder visible as a checkpoint.
    for item in folder.iterdir():
        with open(item, "rb") as handle:
            os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _plain(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _tuples_to_lists(value: Any) -> Any:
    return [_tuples_to_lists(v) for v in value] if isinstance(value, tuple) else value


def _lists_to_tuples(value: Any) -> Any:
    return tuple(_lists_to_tuples(v) for v in value) if isinstance(value, list) else value
