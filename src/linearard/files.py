"""Writing files and folders so that a crash or a concurrent writer never leaves half of one.

Everything is written beside its target under a hidden temporary name and renamed into place: a
rename within one folder is atomic, so readers see the old target, or none, or the whole new one.

Example:
    >>> write_atomic(tmp / "record.json", '{"done": true}\\n')  # doctest: +SKIP
    >>> with staged_folder(tmp / "model") as folder:  # doctest: +SKIP
    ...     model.save_pretrained(folder)
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` (creating its folder) through a temporary file renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staged_folder(target: Path, *, replace: bool = False) -> Iterator[Path]:
    """An empty folder beside `target` to fill inside the block; renamed to `target` when the block
    ends without an error, deleted when it raises.

    Args:
        target: the folder to create.
        replace: delete an existing `target` first. Otherwise an existing `target` is kept and the
            staged folder dropped: another process made the same folder first (a cache, an export of
            the same text).
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        yield staging
        staging.chmod(0o755)  # mkdtemp makes it private to this user
        if replace and target.exists():
            shutil.rmtree(target)
        try:
            os.replace(staging, target)
        except OSError:
            if replace or not target.is_dir():
                raise
            shutil.rmtree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
