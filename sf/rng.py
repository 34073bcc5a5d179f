"""Deterministic randomness for training: seeds derived from (seed, role, step, rank, sample).

Every random draw of a training step comes from generators seeded by what it is for, never from global RNG
state. Two consequences the tests rely on: a resumed run draws exactly what the uninterrupted run drew, and a
sample's noise does not depend on how samples are grouped into micro-batches (accumulation 2 x 1 equals 1 x 2).
"""

from __future__ import annotations

import hashlib

import torch

from sf.diffusion.flow import NUM_TRAIN_TIMESTEPS, shift_sigma


def seed_for(*parts) -> int:
    """A 63-bit seed from any tuple of ints/strings (stable across processes and Python versions)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class SampleNoise:
    """One generator per sample of a batch; draws are stacked along the batch dimension."""

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

    def dmd_timestep(self, shift: float, min_ratio: float, max_ratio: float,
                     low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """One DMD/critic timestep per sample (B,): uniform in [low, high] (unshifted σ), shifted, clamped.

        [low, high] = [0, 1] is the usual draw; the exit step's own noise interval restricts it (`ts_schedule`).
        """
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"need 0 <= low <= high <= 1, got {low} and {high}")
        u = torch.cat([torch.rand(1, generator=g, device=self.device) for g in self.generators])  # (B,)
        return shift_sigma(low + (high - low) * u, shift).clamp(min_ratio, max_ratio) * NUM_TRAIN_TIMESTEPS

    def randint(self, high: int) -> torch.Tensor:
        """One integer in [0, high) per sample (B,)."""
        return torch.cat([torch.randint(0, high, (1,), generator=g, device=self.device) for g in self.generators])


Randomness = torch.Generator | SampleNoise | None


def randn_like(x: torch.Tensor, generator: torch.Generator | SampleNoise | None) -> torch.Tensor:
    """Standard normal noise shaped like x from a torch.Generator, per-sample streams, or the global RNG."""
    if isinstance(generator, SampleNoise):
        return generator.randn_like(x)
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def randint_per_sample(high: int, batch: int, generator: torch.Generator | SampleNoise | None, device) -> torch.Tensor:
    """(batch,) integers in [0, high)."""
    if isinstance(generator, SampleNoise):
        return generator.randint(high).to(device)
    gen_device = generator.device if generator is not None else device
    return torch.randint(0, high, (batch,), generator=generator, device=gen_device).to(device)
