"""Reading safetensors files with their metadata: the one place that turns a bad file into a one-line error.

Every weights file sf writes (exports, codecs, the world classifier) is safetensors with string metadata naming
what it holds; loaders check that metadata and refuse foreign files with messages that name the path.
"""

from __future__ import annotations

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
