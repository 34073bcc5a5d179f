"""Small datasets held in memory and served in an order that depends only on the training step.

Teacher, ODE-init and VAE training on the embedded world read a few hundred samples (tens of MB): they are
decoded once from their webdataset shards (corrupt samples counted and skipped) and kept in memory. The sample at
global position p = ((step * accum + micro) * world_size + rank) * batch_size + b is entry p mod N of epoch
p // N's permutation, seeded by (seed, epoch). So ranks never overlap, accumulation 2 x 1 reads what 1 x 2 reads,
and a resumed run reads exactly what the uninterrupted run read, with no data state beyond the step itself.

Datasets too large for memory stream through `sf.data.prompts.PromptStream` instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np

from sf.data.shards import (
    CorruptSample,
    SkipCounter,
    decode_or_skip,
    decode_pixels,
    decode_text,
    iter_samples,
    list_shards,
)
from sf.rng import seed_for


class SampleBank:
    """Every decodable sample of some shards, in memory; `batch` picks a step's samples deterministically."""

    def __init__(self, shards: str, decode: Callable[[dict[str, Any]], dict[str, Any]], what: str = "samples"):
        skipped = SkipCounter()
        self.samples = list(decode_or_skip(iter_samples(list_shards(shards)), decode, skipped))
        self.num_skipped = skipped.count
        if not self.samples:
            raise ValueError(f"no usable {what} in {shards!r} ({skipped.count} corrupt samples skipped)")

    def __len__(self) -> int:
        return len(self.samples)

    def positions(self, step: int, micro: int, accum: int, rank: int, world_size: int, batch_size: int) -> list[int]:
        """Global sample positions of one micro-batch of one rank."""
        first = ((step * accum + micro) * world_size + rank) * batch_size
        return list(range(first, first + batch_size))

    def batch(self, seed: int, step: int, micro: int, accum: int, rank: int, world_size: int,
              batch_size: int) -> list[dict[str, Any]]:
        """The samples of one rank's micro-batch (see the module docstring for the order)."""
        out = []
        for p in self.positions(step, micro, accum, rank, world_size, batch_size):
            epoch, i = divmod(p, len(self.samples))
            out.append(self.samples[self._permutation(seed, epoch)[i]])
        return out

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm", None)
        if cache is None or cache[0] != (seed, epoch):
            perm = np.random.default_rng(seed_for(seed, "bank", epoch)).permutation(len(self.samples))
            self._perm = cache = ((seed, epoch), perm)
        return cache[1]


# ----------------------------------------------------------------------------------------------------- decoders


def decode_pixel_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A pixel sample (``npy`` or ``mp4``, ``txt``, ``json``) -> {"key", "prompt", "frames" uint8 (T, H, W, 3), "meta"}
    (frames kept as uint8: 4x smaller than float)."""
    frames = decode_pixels(raw)
    try:
        meta = json.loads(bytes(raw["json"])) if "json" in raw else {}
    except ValueError as exn:  # bad json or utf-8
        raise CorruptSample(f"bad json in {raw.get('__key__')!r} ({exn})") from exn
    return {"key": raw["__key__"], "prompt": decode_text(raw).strip(), "frames": frames, "meta": meta}
