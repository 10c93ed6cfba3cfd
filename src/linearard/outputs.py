"""Output folders that never cost the user data: what `restore` and `export` may write, and where.

Both commands write only into a folder that is new, empty, or one of their own earlier outputs,
recognised by a small marker file (`MARKER`) that records which command wrote it and what it holds.
A folder holding anything else is refused, ``--overwrite`` or not; an earlier output of the same
command is replaced only with ``--overwrite`` (`restore` also continues one with ``--resume``). The
inputs (the model, the checkpoint) are never inside the output folder, nor the output inside them.

Example:
    >>> check_output("merged", "export", overwrite=False, inputs=["run/checkpoints/step-00000100"])  # doctest: +SKIP
    PosixPath('merged')
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

from linearard.errors import UserError

MARKER = ".linearard-output.json"
# What a restore run writes into its folder (the exported model's temporary folder starts with ".model-").
# what `linearard restore` writes at the top of its folder (objective.yaml: each stage's resolved objective)
RESTORE_ENTRIES = frozenset(
    {MARKER, "config.yaml", "objective.yaml", "checkpoints", "metrics.jsonl", "tensorboard", "model"}
)


def written_by(folder: str | Path) -> dict | None:
    """The marker of an earlier linearard output in `folder` (None when there is none).

    A run folder of linearard 0.1, which wrote no marker, is recognised by its checkpoints.
    """
    folder = Path(folder)
    try:
        return json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        pass
    if (folder / "checkpoints").is_dir() and (folder / "config.yaml").is_file():
        return {"command": "restore"}
    return None


def mark(folder: str | Path, command: str, entries: Iterable[str] = ()) -> None:
    """Mark `folder` as written by `command`, listing its top-level `entries` (export) for a later overwrite."""
    record = {"command": command, "entries": sorted(entries)}
    (Path(folder) / MARKER).write_text(json.dumps(record, indent=1) + "\n")


def check_output(
    output: str | Path,
    command: str,
    *,
    overwrite: bool,
    inputs: Iterable[str | Path] = (),
    resume: bool = False,
) -> Path:
    """Raise `UserError` unless `command` (``restore`` or ``export``) may write into `output`.

    Args:
        output: the ``--output`` folder (it may not exist yet; nothing is created here).
        overwrite: ``--overwrite`` was given: an earlier output of the same command may be replaced.
        inputs: paths the command reads (model, checkpoint); none may lie inside `output` or around it.
        resume: ``--resume`` was given (`restore`): an earlier run folder is continued, not replaced.

    Returns:
        `output` as a Path.
    """
    output = Path(output)
    flag = "--output"
    if output.exists() and not output.is_dir():
        raise UserError(f"{flag} {output} is a file; give a folder")
    target = output.resolve()
    for item in inputs:
        source = Path(item).expanduser().resolve()
        if source == target or target in source.parents:
            raise UserError(f"{flag} {output} holds the input {item}; choose an output folder elsewhere")
        if source in target.parents:
            raise UserError(f"{flag} {output} lies inside the input {item}; choose an output folder elsewhere")
    _check_writable(output)
    entries = _entries(output)
    if not entries:
        return output
    marker = written_by(output)
    if marker is None:
        raise UserError(
            f"{flag} {output} is not empty and was not written by linearard {command}; "
            "choose a new or empty folder (nothing was changed)"
        )
    if marker.get("command") != command:
        raise UserError(
            f"{flag} {output} holds the output of linearard {marker.get('command')}; "
            f"choose a new or empty folder for {command} (nothing was changed)"
        )
    foreign = sorted(set(entries) - set(own_entries(output, marker)))
    if foreign and not resume:
        raise UserError(
            f"{flag} {output} holds {foreign[0]!r}, which linearard {command} did not write; "
            "move it away or choose another folder (nothing was changed)"
        )
    if command == "export" and not overwrite:
        raise UserError(f"{flag} {output} holds an earlier export; pass --overwrite to replace it")
    return output


def own_entries(folder: Path, marker: dict) -> list[str]:
    """The top-level entries of `folder` that its linearard command wrote."""
    if marker.get("command") == "restore":
        return [e for e in _entries(folder) if e in RESTORE_ENTRIES or e.startswith(".model-")]
    return [MARKER, *marker.get("entries", [])]


def clear_own(folder: str | Path) -> None:
    """Delete what linearard wrote into `folder` (checked by `check_output` first); keeps the folder."""
    folder = Path(folder)
    marker = written_by(folder)
    if marker is None:
        return
    for name in own_entries(folder, marker):
        path = folder / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def describe_os_error(err: OSError) -> str:
    """A short reason for a failed write: "the disk is full" rather than errno 28."""
    return {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
            errno.EDQUOT: "the disk quota is exceeded", errno.EACCES: "permission denied"}.get(
        err.errno, err.strerror or str(err))


def _entries(folder: Path) -> list[str]:
    try:
        return sorted(os.listdir(folder))
    except FileNotFoundError:
        return []
    except OSError as err:
        raise UserError(f"cannot read --output {folder}: {describe_os_error(err)}") from None


def _check_writable(output: Path) -> None:
    """The folder itself, or the nearest existing folder above it, must accept new files."""
    existing = output.absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"cannot create --output {output}: {existing} is a file")
    if not os.access(existing, os.W_OK | os.X_OK):
        reason = "the file system is read-only" if _read_only(existing) else "permission denied"
        raise UserError(f"cannot write --output {output}: {reason} ({existing})")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False
