"""Output directories of the exports: ``check_out_dir`` (absent, empty, or a previous export to
overwrite) and ``staged_directory`` (written aside, then swapped in whole, or not at all)."""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from stepdistill.errors import StepdistillError

#: marks a directory written by ``export_diffusers`` (and so safe to replace with overwrite=True)
MARKER = "stepdistill_export.json"


def check_out_dir(out: str | Path, overwrite: bool, marker: str = MARKER) -> Path:
    """``out`` if it is absent or empty, or (with ``overwrite``) holds ``marker``; else a one-line error."""
    if not out:
        raise StepdistillError("out=DIR is required")
    path = Path(str(out)).expanduser()
    if path.exists() and not path.is_dir():
        raise StepdistillError(f"out {str(path)!r} is a file; pass a directory")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise StepdistillError(f"out directory {str(path)!r} already exists and is not empty; choose "
                                   "another out= or pass overwrite=true")
        if not (path / marker).is_file():
            raise StepdistillError(f"out directory {str(path)!r} holds files stepdistill did not write (no "
                                   f"{marker}); refusing to overwrite it: choose another out=")
    return path


def _replace_dir(tmp: Path, out: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


@contextlib.contextmanager
def staged_directory(out: Path) -> Iterator[Path]:
    """A fresh temporary directory next to ``out`` that replaces ``out`` when the block succeeds and
    is deleted when it fails (an earlier ``out`` is then left as it was)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
