"""Rectified-flow algebra in the Wan convention.

    x_t = (1 - sigma) * x0 + sigma * eps,   t = 1000 * sigma,   v = eps - x0

so ``x0 = x_t - sigma * v`` and ``eps = x_t + (1 - sigma) * v``. Latents are ``(B, F, C, H, W)``;
``sigma`` may be a Python number, a 0-d tensor, one value per sample ``(B,)`` or one per frame ``(B, F)``.
Mixing happens in the latent's dtype (sigma is cast to it); only ``x0_to_flow`` divides, and it does so
in at least fp32.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0  # Wan-1.3B distillation recipe; ODE-pair generation uses 8

SigmaLike = float | Tensor


# ----------------------------------------------------------------------------------------------- sigma maps


def shift_sigma(sigma: SigmaLike, shift: float) -> SigmaLike:
    """Apply the timestep shift sigma' = s * sigma / (1 + (s - 1) * sigma)."""
    if shift <= 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_to_t(sigma: SigmaLike, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> SigmaLike:
    """Network timestep t = 1000 * sigma."""
    return sigma * num_train_timesteps


def t_to_sigma(t: SigmaLike, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> SigmaLike:
    """Noise level sigma = t / 1000."""
    return t / num_train_timesteps


def timesteps_table(shift: float, num: int = NUM_TRAIN_TIMESTEPS) -> Tensor:
    """Shifted training table: 1000 * shift(linspace(1, 0, num + 1)[:-1]), fp32, from 1000 down."""
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    sigma = torch.linspace(1.0, 0.0, num + 1, dtype=torch.float64)[:-1]  # (num,) 1.0 ... 1/num
    return sigma_to_t(shift_sigma(sigma, shift), num).float()


def warp_steps(
    steps: Sequence[int] | Tensor, shift: float, *, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Tensor:
    """Map a student step list like [1000, 750, 500, 250] through the shifted table; returns fp32 t values."""
    steps = torch.as_tensor(steps, dtype=torch.float64).flatten()
    if steps.numel() == 0:
        raise ValueError("steps must not be empty")
    if not torch.equal(steps, steps.round()):
        raise ValueError(f"steps must be integers, got {steps.tolist()}")
    if steps.min() < 0 or steps.max() > num_train_timesteps:
        raise ValueError(f"steps must lie in [0, {num_train_timesteps}], got {steps.tolist()}")
    table = timesteps_table(shift, num_train_timesteps)
    table = torch.cat([table, table.new_zeros(1)])  # (num + 1,): step 0 maps to t = 0
    return table[num_train_timesteps - steps.long()]


# ---------------------------------------------------------------------------------------- broadcasting


def _sigma_like(sigma: SigmaLike, x: Tensor) -> Tensor:
    """Cast sigma to x's dtype/device and append singleton dims so it broadcasts over x."""
    sigma = torch.as_tensor(sigma, device=x.device).to(x.dtype)
    if sigma.ndim >= x.ndim:
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} has too many dims for x of shape {tuple(x.shape)}")
    lead = x.shape[: sigma.ndim]
    if any(s not in (1, n) for s, n in zip(sigma.shape, lead)):
        raise ValueError(f"sigma of shape {tuple(sigma.shape)} does not match the leading dims of x {tuple(x.shape)}")
    return sigma.reshape(sigma.shape + (1,) * (x.ndim - sigma.ndim))


def _check_same_shape(a: Tensor, b: Tensor, names: str) -> None:
    """Raise if two tensors that are mixed element-wise differ in shape."""
    if a.shape != b.shape:
        raise ValueError(f"{names} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")


# ---------------------------------------------------------------------------------------- conversions


def add_noise(x0: Tensor, noise: Tensor, sigma: SigmaLike) -> Tensor:
    """Forward process x_t = (1 - sigma) * x0 + sigma * noise, in x0's dtype."""
    _check_same_shape(x0, noise, "x0 and noise")
    s = _sigma_like(sigma, x0)
    return (1 - s) * x0 + s * noise.to(x0.dtype)


def x0_from_flow(x_t: Tensor, flow: Tensor, sigma: SigmaLike) -> Tensor:
    """Clean estimate x0 = x_t - sigma * v."""
    _check_same_shape(x_t, flow, "x_t and flow")
    return x_t - _sigma_like(sigma, x_t) * flow.to(x_t.dtype)


def eps_from_flow(x_t: Tensor, flow: Tensor, sigma: SigmaLike) -> Tensor:
    """Noise estimate eps = x_t + (1 - sigma) * v."""
    _check_same_shape(x_t, flow, "x_t and flow")
    return x_t + (1 - _sigma_like(sigma, x_t)) * flow.to(x_t.dtype)


def flow_from_x0_noise(x0: Tensor, noise: Tensor) -> Tensor:
    """Training target v = noise - x0."""
    _check_same_shape(x0, noise, "x0 and noise")
    return noise.to(x0.dtype) - x0


def x0_to_flow(x_t: Tensor, x0: Tensor, sigma: SigmaLike) -> Tensor:
    """Flow that maps x_t to x0: v = (x_t - x0) / sigma (sigma must be > 0); divides in >= fp32."""
    _check_same_shape(x_t, x0, "x_t and x0")
    if isinstance(sigma, (int, float)) and sigma <= 0:
        raise ValueError(f"sigma must be > 0 to recover the flow, got {sigma}")
    wide = torch.promote_types(x_t.dtype, torch.float32)
    x_t_wide = x_t.to(wide)
    return ((x_t_wide - x0.to(wide)) / _sigma_like(sigma, x_t_wide)).to(x_t.dtype)


# ---------------------------------------------------------------------------------------- training t


def dmd_timestep(
    u: Tensor, shift: float, min_ratio: float = 0.02, max_ratio: float = 0.98, low: float = 0.0, high: float = 1.0
) -> Tensor:
    """DMD/critic timesteps from uniform draws u in [0, 1): shift(low + (high - low) * u) clamped to
    [min_ratio, max_ratio], times 1000 (fp32, u's shape). [low, high] = [0, 1] is the usual draw; the exit step's own
    noise interval narrows it (the reference's `ts_schedule`)."""
    if not 0.0 <= min_ratio <= max_ratio <= 1.0:
        raise ValueError(f"need 0 <= min_ratio <= max_ratio <= 1, got {min_ratio} and {max_ratio}")
    if not 0.0 <= low <= high <= 1.0:
        raise ValueError(f"need 0 <= low <= high <= 1, got {low} and {high}")
    sigma = shift_sigma(low + (high - low) * u.float(), shift).clamp(min_ratio, max_ratio)
    return sigma_to_t(sigma)
