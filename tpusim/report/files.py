"""Atomic file output: a failed run never leaves a half-written file behind.

Files are written under a temporary name in the target folder and renamed; they get the mode a
plain ``open(path, "w")`` would give (0666 less the umask), not ``mkstemp``'s 0600. Output places are
checked before any work (:func:`check_output_dir`, :func:`check_output_file`), and a write that still
fails is one :class:`~tpusim.errors.OutputError` line naming the file.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tpusim.errors import OutputError

_UMASK_LOCK = threading.Lock()


def _umask() -> int:
    """The process umask (reading it means setting it, so briefly, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def _nearest_existing(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(path: str | Path, flag: str = "--out") -> Path:
    """Fail now, as one line, if ``path`` cannot become a folder of outputs: it is a file, lies under
    a file, or its nearest existing folder cannot be written. Creates nothing."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: is a file, not a folder")
    _check_writable_folder(path, _nearest_existing(path), flag)
    return path


def _check_writable_folder(path: Path, base: Path, flag: str) -> None:
    if not base.is_dir():
        raise OutputError(f"{flag} {path}: {base} is a file, not a folder")
    try:
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise OutputError(f"{flag} {path}: cannot write in {base}: {_reason(exc)}") from None


def check_output_file(path: str | Path, flag: str = "-o") -> Path:
    """Fail now, as one line, if ``path`` cannot be written as a file (a folder, under a file, unwritable)."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path}: is a folder, not a file")
    _check_writable_folder(path, _nearest_existing(path.parent), flag)
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise OutputError(f"{path}: cannot write: {_reason(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), 0o666 & ~_umask())
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{path}: cannot write: {_reason(exc)}") from None
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, data: Any) -> Path:
    return atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def atomic_write_csv(path: str | Path, columns: Sequence[str], rows: Iterable[dict[str, Any]]) -> Path:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return atomic_write_text(path, buffer.getvalue())


@contextmanager
def file_set(out_dir: str | Path) -> Iterator[Path]:
    """Write a set of files as one: the block writes into the staging folder it is given (inside
    ``out_dir``); when it ends without error every staged file is renamed into ``out_dir``, so an
    interrupted or failed run leaves no partial set, only the previous run's files, if any. Files of
    ``out_dir`` that the set does not name are left alone."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".tpusim-staging-", dir=out_dir))
    except OSError as exc:
        raise OutputError(f"{out_dir}: cannot write: {_reason(exc)}") from None
    try:
        yield staging
        for staged in sorted(staging.iterdir()):
            os.replace(staged, out_dir / staged.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
