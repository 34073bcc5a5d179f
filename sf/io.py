"""Files in and out, where a user's mistake becomes a one-line error naming the path.

Every weights file sf writes (exports, codecs, the world classifier) is safetensors with string metadata naming
what it holds; loaders check that metadata and refuse foreign files with messages that name the path. The
commands check what they read (`existing_file`) and where they write (`writable_dir`) before any heavy work, and
`one_line_errors` turns a user error into ``error: ...`` and exit status 1 (SF_TRACEBACK=1: the traceback).
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file


def read_safetensors(
    path: str | Path, error: type[Exception] = ValueError,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; `error` (a ValueError by default) naming the path if the file
    is missing or unreadable. Nothing is unpickled."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        return load_file(str(path)), metadata
    except (SafetensorError, OSError) as exn:
        raise error(f"{path}: not a readable safetensors file ({exn})") from None


def exit_with_error(error: BaseException, code: int = 1) -> None:
    """Print `error` as one line, ``error: <first line>``, and exit with `code` (SF_TRACEBACK=1: raise it)."""
    if os.environ.get("SF_TRACEBACK"):
        raise error
    message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def one_line_errors(main):
    """Run a command's main; a user error (a ValueError or an OSError and their kin) ends it in one line, exit 1."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except (ValueError, OSError) as e:
            exit_with_error(e)

    return wrapped


def writable_dir(path: Path, what: str = "--out") -> Path:
    """Create `path` (a folder) now, so that a bad output location fails before the work, naming it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".sf-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise OSError(f"{what} {path} is not a writable folder ({e.strerror or e})") from None
    return path


def existing_file(path: Path, what: str) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"{what} {path} does not exist")
    return path
