"""Atomic outputs: every file or folder the commands write appears complete or not at all.

Write under a temporary name in the same folder (same file system, so the rename is atomic), then rename over the
target; on any failure, including Ctrl-C, the temporary is removed and the target is left as it was.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP = ".tmp"


def temporary(path: Path) -> Path:
    return path.with_name(path.name + TMP)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary sibling of `path` to write (a file, or a folder the caller creates); renamed over `path` when
    the block ends normally, removed when it raises. A folder target must not exist (os.replace refuses a
    non-empty one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary(path)
    _remove(tmp)  # left over from a run killed mid-write
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8")
        else:
            tmp.write_bytes(data)


def replace_together(folder: Path, files: dict[str, str]) -> None:
    """Several text files of one result (predictions beside their metrics): every one is written under its
    temporary name before any is renamed, so an interrupted write leaves the previous set as it was."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    try:
        for name, text in files.items():
            temporary(folder / name).write_text(text, encoding="utf-8")
            written.append(name)
    except BaseException:
        for name in written:
            temporary(folder / name).unlink(missing_ok=True)
        raise
    for name in files:
        os.replace(temporary(folder / name), folder / name)
