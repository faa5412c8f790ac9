"""Atomic file writes: results, traces and predictors are never left half-written."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from .errors import OutputError


def check_writable(path: str | Path, force: bool, flag: str) -> Path:
    """Refuse an output this run must not or cannot write, before any work: a model load or a
    measurement takes minutes, and finding out at the end loses them (or, with a silent replace,
    loses the previous result). ``flag`` is the option that gave ``path``, so the error names it."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{flag} {path} is a folder; give a file path to {flag}")
    folder = next((p for p in path.parents if p.exists()), None)  # the nearest ancestor that exists
    if folder is not None and not folder.is_dir():
        raise OutputError(f"{flag} {path} lies under {folder}, which is a file; choose another {flag}")
    if path.exists() and not force:
        raise OutputError(f"{path} exists; choose another {flag} or pass --force to replace it")
    return path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, fsync, then rename over it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")
