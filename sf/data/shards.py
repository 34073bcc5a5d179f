"""Generic webdataset helpers: write shards, (de)serialise tensors, list shards, read samples without crashing.

A sample is a dict keyed by ``__key__`` whose other entries are the tar members of that key (``txt``,
``json``, ``emb.safetensors``, ...), as raw bytes. Reading never raises on bad data: a shard that cannot be
opened or is truncated becomes one *error marker* in the stream (a sample with an ``__error__`` entry) at the
place it happened, so a later decode step counts it like any corrupt sample and the stream stays deterministic.
"""

from __future__ import annotations

import glob
import io
import json
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import webdataset as wds
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from tqdm import tqdm
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import base_plus_ext

log = logging.getLogger(__name__)

ERROR = "__error__"  # entry of an error marker: the reason the reader could not produce samples
_REMOTE = re.compile(r"^(pipe:|[a-z0-9+]+://)")
_GLOB_CHARS = re.compile(r"[*?\[]")


class CorruptSample(ValueError):
    """A sample that cannot be decoded; readers count and skip it."""


# ----------------------------------------------------------------------------------------------------------- tensors


def encode_tensors(tensors: dict[str, torch.Tensor]) -> bytes:
    """Serialise a dict of tensors into safetensors bytes (the payload of a ``*.safetensors`` member)."""
    if not tensors:
        raise ValueError("encode_tensors needs at least one tensor")
    return safetensors_save({name: t.detach().cpu().contiguous() for name, t in tensors.items()})


def decode_tensors(data: bytes) -> dict[str, torch.Tensor]:
    """Inverse of `encode_tensors`; raises CorruptSample on truncated or garbage bytes."""
    try:
        return safetensors_load(bytes(data))
    except Exception as exn:  # safetensors raises its own error types (and sometimes plain exceptions)
        raise CorruptSample(f"bad safetensors payload ({exn})") from exn


def encode_npy(array: np.ndarray) -> bytes:
    """Raw .npy bytes of an array (the payload of an ``npy`` member: exact pixels)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_text(sample: dict[str, Any], member: str = "txt") -> str:
    """A sample's utf-8 text member (the caption or prompt); CorruptSample when it is missing or not utf-8."""
    if member not in sample:
        raise CorruptSample(f"sample {sample.get('__key__')!r} has no {member} member")
    try:
        return bytes(sample[member]).decode("utf-8")
    except UnicodeDecodeError as exn:
        raise CorruptSample(f"{member} of {sample.get('__key__')!r} is not utf-8 ({exn})") from exn


def decode_pixels(sample: dict[str, Any]) -> np.ndarray:
    """The uint8 frames (T, H, W, 3) of a sample's ``npy`` member, else its ``mp4``; CorruptSample otherwise."""
    try:
        if "npy" in sample:
            frames = np.load(io.BytesIO(bytes(sample["npy"])), allow_pickle=False)
        elif "mp4" in sample:
            from sf.video import decode_mp4

            frames = decode_mp4(bytes(sample["mp4"]))
        else:
            raise CorruptSample(f"sample {sample.get('__key__')!r} has no npy or mp4 member")
    except CorruptSample:
        raise
    except Exception as exn:  # truncated npy, undecodable mp4
        raise CorruptSample(f"bad pixels in {sample.get('__key__')!r}: {exn}") from exn
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise CorruptSample(f"pixels must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    return frames


# ----------------------------------------------------------------------------------------------------------- writing


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Turn a sample's values into tar member bytes: str -> utf-8, json -> json, safetensors -> tensors."""
    if "__key__" not in sample:
        raise ValueError(f"a sample needs a __key__, got entries {sorted(sample)}")
    key = str(sample["__key__"])
    if not key or "." in os.path.basename(key):
        raise ValueError(f"sample keys must be non-empty and contain no '.', got {key!r}")
    encoded: dict[str, Any] = {"__key__": key}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        if isinstance(value, (bytes, bytearray, memoryview)):
            encoded[name] = bytes(value)
        elif name.endswith("safetensors") and isinstance(value, dict):
            encoded[name] = encode_tensors(value)
        elif isinstance(value, str):
            encoded[name] = value.encode("utf-8")
        elif name.endswith("json"):
            encoded[name] = json.dumps(value, sort_keys=True).encode("utf-8")
        else:
            raise ValueError(f"sample {key!r}: cannot encode {name!r} of type {type(value).__name__}")
    return encoded


class ShardWriter:
    """Writes samples into ``<prefix>-%06d.tar`` shards of at most `samples_per_shard` samples, with a progress bar."""

    def __init__(
        self,
        out_dir: str,
        prefix: str = "shard",
        samples_per_shard: int = 1000,
        max_shard_bytes: float = 3e9,
        total: int | None = None,
        progress: bool = True,
    ):
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        os.makedirs(out_dir, exist_ok=True)
        self.paths: list[str] = []
        self.num_samples = 0
        pattern = os.path.join(out_dir, f"{prefix}-%06d.tar")
        # mtime fixed so that the same samples give byte-identical shards
        self._writer = wds.ShardWriter(
            pattern, maxcount=samples_per_shard, maxsize=max_shard_bytes, post=self.paths.append,
            verbose=0, encoder=False, mtime=0.0,
        )
        self._bar = tqdm(total=total, unit="sample", desc=f"writing {prefix} shards", disable=not progress)

    def write(self, sample: dict[str, Any]) -> None:
        """Encode and append one sample."""
        self._writer.write(encode_sample(sample))
        self.num_samples += 1
        self._bar.update(1)

    def close(self) -> list[str]:
        """Finish the last shard; returns the paths of all shards written."""
        if self._bar is not None:
            self._writer.close()
            self._bar.close()
            self._bar = None
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# ----------------------------------------------------------------------------------------------------------- listing


def list_shards(spec: str | Iterable[str]) -> list[str]:
    """Shard paths from a directory (its ``*.tar``), a glob, a brace pattern, a ``::``-joined string, or a list.

    Local paths must exist (ValueError naming the spec otherwise); remote urls (``pipe:``, ``s3://``...) are only
    brace-expanded. Directory and glob results are sorted; an explicit list keeps its order.
    """
    if isinstance(spec, str):
        if not spec.strip():
            raise ValueError("empty shards spec: give a directory, a glob, a brace pattern or a list of shards")
        parts = [part for part in spec.split("::") if part]
    else:
        parts = list(spec)
    shards = [path for part in parts for path in _expand_one(str(part))]
    if not shards:
        raise ValueError(f"shards spec {spec!r} matches no shard file")
    return shards


def _expand_one(spec: str) -> list[str]:
    """Expand one spec entry into paths (empty list when nothing matches)."""
    if _REMOTE.match(spec):
        return expand_urls(spec)
    spec = os.path.expanduser(spec)
    if os.path.isdir(spec):
        return sorted(glob.glob(os.path.join(spec, "*.tar")))
    paths = []
    for pattern in expand_urls(spec):
        if _GLOB_CHARS.search(pattern):
            paths.extend(sorted(glob.glob(pattern)))
        elif os.path.isfile(pattern):
            paths.append(pattern)
    return paths


# ----------------------------------------------------------------------------------------------------------- reading


def iter_samples(shards: Iterable[str]) -> Iterator[dict[str, Any]]:
    """Raw samples of the shards in order; an unreadable or truncated shard yields one error marker and moves on."""
    for url in shards:
        yield from _iter_shard(url)


def _iter_shard(url: str) -> Iterator[dict[str, Any]]:
    """Group the members of one tar into samples (consecutive members sharing a key)."""
    current: dict[str, Any] | None = None
    try:
        with gopen(url) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for member in tar:
                key, ext = base_plus_ext(member.name)
                if not member.isreg() or key is None or os.path.basename(key).startswith("__"):
                    continue  # directories, members without extension, webdataset's __meta__ files
                if current is not None and key != current["__key__"]:
                    yield current  # complete before this member's data is read: survives a truncation there
                    current = None
                if current is None:
                    current = {"__key__": key, "__url__": url}
                ext = ext.lower()
                if ext in current:
                    current[ERROR] = f"duplicate member {member.name!r}"
                current[ext] = tar.extractfile(member).read()
                tar.members = []  # stream mode would keep every header otherwise
    except Exception as exn:  # a truncated/garbage tar or an unreachable url: one counted error, next shard
        yield {"__key__": f"{os.path.basename(url)}#broken", "__url__": url, ERROR: f"unreadable shard: {exn}"}
        return  # the sample being read (if any) is dropped with the rest of the shard
    if current is not None:
        yield current


def safe_decode(
    sample: dict[str, Any],
    decode: Callable[[dict[str, Any]], Any],
    on_skip: Callable[[dict[str, Any], Exception], None],
) -> Any | None:
    """`decode(sample)`, or None after calling `on_skip` for an error marker or a CorruptSample."""
    if ERROR in sample:
        on_skip(sample, CorruptSample(sample[ERROR]))
        return None
    try:
        return decode(sample)
    except CorruptSample as exn:
        on_skip(sample, exn)
        return None


def decode_or_skip(
    samples: Iterable[dict[str, Any]],
    decode: Callable[[dict[str, Any]], Any],
    on_skip: Callable[[dict[str, Any], Exception], None],
) -> Iterator[Any]:
    """Yield `decode(sample)` for each sample; error markers and CorruptSample failures go to `on_skip` instead."""
    for sample in samples:
        decoded = safe_decode(sample, decode, on_skip)
        if decoded is not None:
            yield decoded


class SkipCounter:
    """Counts skipped samples and logs the first few of them (an `on_skip` callback for `decode_or_skip`)."""

    def __init__(self, max_logged: int = 10):
        self.count = 0
        self.max_logged = max_logged

    def __call__(self, sample: dict[str, Any], exn: Exception) -> None:
        self.count += 1
        if self.count <= self.max_logged:
            log.warning("skipping corrupt sample %s from %s: %s", sample.get("__key__"), sample.get("__url__"), exn)
