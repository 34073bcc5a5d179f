"""Deterministic randomness for training: seeds derived from (seed, role, step, rank, sample).

Every random draw of a training step comes from generators seeded by what it is for, never from global RNG
state. Two consequences the tests rely on: a resumed run draws exactly what the uninterrupted run drew, and a
sample's noise does not depend on how samples are grouped into micro-batches (accumulation 2 x 1 equals 1 x 2).
"""

from __future__ import annotations

import hashlib

import torch


def seed_for(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleNoise:
    """One torch.Generator per sample of a batch; draws are stacked along the batch dimension."""

    def __init__(self, seeds: list[int], device="cpu"):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(s) for s in seeds]

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape, dtype=torch.float32) -> torch.Tensor:
        """(B, *shape) standard normal, sample b drawn from generator b (in fp32, then cast)."""
        draws = [torch.randn(tuple(shape), generator=g, device=self.device, dtype=torch.float32) for g in self.generators]
        return torch.stack(draws).to(dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Noise shaped like x (B, ...) with x's dtype, one generator per row."""
        if x.shape[0] != len(self.generators):
            raise ValueError(f"batch of {x.shape[0]} samples but {len(self.generators)} noise generators")
        return self.randn(x.shape[1:], x.dtype).to(x.device)

    def rand(self) -> torch.Tensor:
        """One uniform draw in [0, 1) per sample (B,) (e.g. for `sf.diffusion.flow.dmd_timestep`)."""
        return torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample (B,)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators])


Randomness = torch.Generator | SampleNoise | None


def randn_like(x: torch.Tensor, rng: torch.Generator | SampleNoise | None) -> torch.Tensor:
    """Standard normal noise shaped like x from a torch.Generator, per-sample streams, or the global RNG."""
    if isinstance(rng, SampleNoise):
        return rng.randn_like(x)
    return torch.randn(x.shape, generator=rng, device=x.device, dtype=x.dtype)


def randint_per_sample(high: int, batch: int, rng: torch.Generator | SampleNoise | None, device) -> torch.Tensor:
    """(batch,) integers in [0, high)."""
    if isinstance(rng, SampleNoise):
        return rng.randint(high).to(device)
    gen_device = rng.device if rng is not None else device
    return torch.randint(0, high, (batch,), generator=rng, device=gen_device).to(device)
