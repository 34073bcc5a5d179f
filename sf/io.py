"""Files in and out, where a user's mistake becomes a one-line error naming the path.

Every weights file sf writes (exports, codecs, the world classifier) is safetensors with string metadata naming
what it holds; loaders check that metadata and refuse foreign files with messages that name the path. The
commands check what they read (`existing_file`) and where they write (`writable_dir`) before any heavy work, and
`one_line_errors` turns a user error into ``error: ...`` and exit status 1 (SF_TRACEBACK=1: the traceback).
"""

from __future__ import annotations

import functools
import json
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


def read_json_object(path: str | Path, error: type[Exception] = ValueError) -> dict:
    """A JSON file that must hold an object (a model's config.json); `error` naming the path otherwise."""
    try:
        raw = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise error(f"{path}: not a readable JSON config ({e})") from None
    if not isinstance(raw, dict):
        raise error(f"{path}: expected a JSON object, found {type(raw).__name__}")
    return raw


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def mapped_safetensors(
    path: str | Path, error: type[Exception] = ValueError,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Like `read_safetensors`, but the tensors are views of a private memory map of the file: nothing is read
    until used, and ranks on one node that load the same weights share the page cache instead of each holding
    a copy. Writing to a tensor copies only the pages it touches; the file is never changed."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + header_len > size:
                raise ValueError(f"a header of {header_len} bytes in a file of {size}")
            header = json.loads(f.read(header_len))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
    except (OSError, ValueError, UnicodeDecodeError) as exn:
        raise error(f"{path}: not a readable safetensors file ({exn})") from None
    metadata = header.pop("__metadata__", None) or {}
    storage = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, (start, end) = _SAFETENSORS_DTYPES[info["dtype"]], info["data_offsets"]
            shape = info["shape"]
        except (KeyError, TypeError, ValueError) as exn:
            raise error(f"{path}: not a readable safetensors file (entry {name!r}: {exn})") from None
        offset = 8 + header_len + start
        if not 8 + header_len <= offset <= 8 + header_len + end <= size:
            raise error(f"{path}: not a readable safetensors file (entry {name!r} lies outside the file)")
        raw = torch.empty(0, dtype=torch.uint8).set_(storage, offset, (end - start,))
        if offset % dtype.itemsize:  # not aligned for a view: this one tensor is copied
            raw = raw.clone()
        tensors[name] = raw.view(dtype).view(shape)
    return tensors, metadata


def first_line(error: BaseException) -> str:
    """The first line of an exception's message, or its type's name when it has none."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def exit_with_error(error: BaseException, code: int = 1) -> None:
    """Print `error` as one line, ``error: <first line>``, and exit with `code` (SF_TRACEBACK=1: raise it)."""
    if os.environ.get("SF_TRACEBACK"):
        raise error
    print(f"error: {first_line(error)}", file=sys.stderr, flush=True)
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
