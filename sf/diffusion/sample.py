"""Classifier-free guidance and samplers over rectified flow.

Networks follow ``net(x_t, t, **cond) -> flow`` with ``x_t`` of shape ``(B, F, C, H, W)`` and ``t`` an
fp32 tensor of shape ``(B, F)`` in [0, 1000]. Samplers never evaluate the network at sigma = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from sf.diffusion.flow import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma, t_to_sigma, x0_from_flow
from sf.rng import Randomness, randn_like

FlowNet = Callable[..., Tensor]
DEFAULT_CFG_SCALE = 3.0  # real = cond + 3 * (cond - uncond), i.e. the usual guidance weight 4

# ----------------------------------------------------------------------------------------------- guidance


def cfg_combine(cond: Tensor, uncond: Tensor, scale: float = DEFAULT_CFG_SCALE) -> Tensor:
    """Guided prediction cond + scale * (cond - uncond)."""
    if cond.shape != uncond.shape:
        raise ValueError(f"cond and uncond must have the same shape, got {tuple(cond.shape)} and {tuple(uncond.shape)}")
    return cond + scale * (cond - uncond)


def guided_net(
    net: FlowNet,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    scale: float = DEFAULT_CFG_SCALE,
    *,
    batched: bool = False,
) -> FlowNet:
    """Wrap ``net`` so one call returns the CFG-combined flow.

    The returned callable is ``guided(x_t, t, **shared)``: ``shared`` goes to both branches, ``cond`` /
    ``uncond`` (e.g. the prompt and a negative-prompt embedding computed once) to their own branch.
    With ``batched=True`` both branches run as one forward of batch 2B: every tensor argument is
    concatenated along dim 0 (a leading dim of 1 is first expanded to B), non-tensor arguments must be
    equal in both branches and are passed once. Batching suits stateless networks only (no KV cache).
    ``scale == 0`` skips the unconditional forward.
    """
    if batched and set(cond) != set(uncond):
        raise ValueError(f"batched guidance needs the same keys in cond and uncond: {sorted(cond)} vs {sorted(uncond)}")

    def guided(x_t: Tensor, t: Tensor, **shared: Any) -> Tensor:
        """CFG-combined flow prediction."""
        clash = set(shared) & (set(cond) | set(uncond))
        if clash:
            raise ValueError(f"call arguments {sorted(clash)} are already bound in cond/uncond")
        if scale == 0:
            return net(x_t, t, **cond, **shared)
        if batched:
            return _batched_forward(net, x_t, t, cond, uncond, shared, scale)
        return cfg_combine(net(x_t, t, **cond, **shared), net(x_t, t, **uncond, **shared), scale)

    return guided


def _batched_forward(
    net: FlowNet,
    x_t: Tensor,
    t: Tensor,
    cond: Mapping[str, Any],
    uncond: Mapping[str, Any],
    shared: Mapping[str, Any],
    scale: float,
) -> Tensor:
    """Run cond and uncond as one forward of batch 2B and combine."""
    batch = x_t.shape[0]
    kwargs = {k: _pair(k, cond[k], uncond[k], batch) for k in cond}
    kwargs.update({k: _pair(k, v, v, batch) for k, v in shared.items()})
    out = net(torch.cat([x_t, x_t]), torch.cat([t, t]), **kwargs)  # (2B, F, C, H, W)
    assert out.shape[0] == 2 * batch, f"network returned batch {out.shape[0]}, expected {2 * batch}"
    out_cond, out_uncond = out.chunk(2)
    return cfg_combine(out_cond, out_uncond, scale)


def _pair(key: str, a: Any, b: Any, batch: int) -> Any:
    """Concatenate a cond/uncond argument pair along batch, or pass an equal non-tensor value once."""
    if isinstance(a, Tensor) and isinstance(b, Tensor) and a.ndim > 0 and b.ndim > 0:
        return torch.cat([_to_batch(key, a, batch), _to_batch(key, b, batch)])
    if not _same(a, b):
        raise ValueError(f"batched guidance cannot merge differing non-batch values for {key!r}")
    return a


def _to_batch(key: str, value: Tensor, batch: int) -> Tensor:
    """Expand a leading dim of 1 to the batch size; reject any other mismatch."""
    if value.shape[0] == batch:
        return value
    if value.shape[0] == 1:
        return value.expand(batch, *value.shape[1:])
    raise ValueError(f"argument {key!r} has batch {value.shape[0]}, expected 1 or {batch}")


def _same(a: Any, b: Any) -> bool:
    """Whether two non-batch arguments are interchangeable."""
    if a is b:
        return True
    if isinstance(a, Tensor) and isinstance(b, Tensor):
        return a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # objects whose == is not a plain truth value
        return False


# ----------------------------------------------------------------------------------------------- helpers


def _check_latent(noise: Tensor) -> None:
    """Samplers work on (B, F, C, H, W) latents."""
    if noise.ndim != 5:
        raise ValueError(f"expected latents of shape (B, F, C, H, W), got {tuple(noise.shape)}")


def _t_like(x: Tensor, sigma: float, num_train_timesteps: int) -> Tensor:
    """Per-frame network timestep filled with 1000 * sigma."""
    return torch.full(x.shape[:2], sigma * num_train_timesteps, dtype=torch.float32, device=x.device)  # (B, F)


def _predict_x0(net: FlowNet, x: Tensor, sigma: float, cond: Mapping[str, Any], num_train_timesteps: int) -> Tensor:
    """One network call at a uniform sigma, converted to a clean estimate."""
    flow = net(x, _t_like(x, sigma, num_train_timesteps), **cond)
    return x0_from_flow(x, flow, sigma)


# ----------------------------------------------------------------------------------------------- student


def sample_few_step(
    net: FlowNet,
    noise: Tensor,
    timesteps: Sequence[float] | Tensor,
    *,
    rng: Randomness = None,
    grad_last: bool = False,
) -> Tensor:
    """DMD backward simulation: predict x0 at each t, re-noise it with fresh noise to the next t; returns the last x0.

    ``net(x_t, t) -> flow`` with t per frame (B, F); ``timesteps`` are network t values (e.g. ``warp_steps([1000,
    750, 500, 250], 5)``), strictly decreasing in (0, 1000]; the network is called exactly once per entry. Every
    forward runs under no_grad except, with `grad_last`, the last one (the self-forcing exit step), so gradient
    reaches the network through that forward alone. Fresh noise comes from `rng` (a torch.Generator or per-sample
    streams). The self-forcing rollout runs this loop for every chunk, stopping at the chunk's exit step.
    """
    _check_latent(noise)
    t_values = [float(t) for t in torch.as_tensor(timesteps, dtype=torch.float64).flatten()]
    _student_sigmas(t_values, NUM_TRAIN_TIMESTEPS)  # validates the list
    x = noise  # (B, F, C, H, W)
    for i, t in enumerate(t_values):
        last = i + 1 == len(t_values)
        t_frames = torch.full(x.shape[:2], t, dtype=torch.float32, device=x.device)  # (B, F)
        with torch.set_grad_enabled(grad_last and last and torch.is_grad_enabled()):
            x0 = x0_from_flow(x, net(x, t_frames), t_to_sigma(t))
        if not last:
            x = add_noise(x0, randn_like(x, rng), t_to_sigma(t_values[i + 1]))
    return x0


def _student_sigmas(timesteps: Sequence[float] | Tensor, num_train_timesteps: int) -> list[float]:
    """Validate a student t list and convert it to sigmas."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("timesteps must not be empty")
    if t.min() <= 0 or t.max() > num_train_timesteps:
        raise ValueError(f"timesteps must lie in (0, {num_train_timesteps}], got {t.tolist()}")
    if t.numel() > 1 and not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"timesteps must be strictly decreasing, got {t.tolist()}")
    return (t / num_train_timesteps).tolist()


# ----------------------------------------------------------------------------------------------- teacher


class TeacherSample(NamedTuple):
    """Result of the teacher ODE sampler."""

    x0: Tensor  # (B, F, C, H, W)
    trajectory: Tensor | None  # (B, K, F, C, H, W) latents at the requested sigmas, or None


def ode_sigmas(num_steps: int, shift: float = DEFAULT_SHIFT, include: Sequence[float] | None = None) -> Tensor:
    """Shifted grid from 1 to 0 (num_steps + 1 points, fp64), with ``include`` merged in exactly.

    A requested sigma within 1e-9 of a grid point replaces that point; otherwise it is inserted, adding
    one step. The result is strictly decreasing.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    grid = shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64), shift)  # (N + 1,)
    points = [1.0, *grid[1:-1].tolist(), 0.0]  # endpoints exact whatever the rounding of the shift
    for sigma in _requested(include):
        nearest = min(range(len(points)), key=lambda j: abs(points[j] - sigma))
        if abs(points[nearest] - sigma) < 1e-9:
            points[nearest] = sigma
        else:
            points.append(sigma)
    points = sorted(set(points), reverse=True)
    assert points[0] == 1.0 and points[-1] == 0.0, "grid must span sigma 1 -> 0"
    return torch.tensor(points, dtype=torch.float64)


def _requested(include: Sequence[float] | Tensor | None) -> list[float]:
    """Validate requested sigmas and return them as floats."""
    if include is None:
        return []
    values = torch.as_tensor(include, dtype=torch.float64).flatten().tolist()
    bad = [v for v in values if not 0.0 <= v <= 1.0]
    if bad:
        raise ValueError(f"requested sigmas must lie in [0, 1], got {bad}")
    return values


@torch.no_grad()
def sample_teacher(
    net: FlowNet,
    noise: Tensor,
    *,
    num_steps: int = 48,
    shift: float = DEFAULT_SHIFT,
    record_sigmas: Sequence[float] | Tensor | None = None,
    solver: str = "euler",
    cond: Mapping[str, Any] | None = None,
    num_train_timesteps: int = NUM_TRAIN_TIMESTEPS,
) -> TeacherSample:
    """Integrate the flow ODE from noise (sigma 1) to data (sigma 0) on a shifted grid.

    ``net`` is typically a ``guided_net``. ``record_sigmas`` (e.g. ``warp_steps(...) / 1000``) are merged
    into the grid (see ``ode_sigmas``), so the returned trajectory holds x exactly at each requested sigma,
    in the requested order. ``solver`` is ``"euler"`` or ``"multistep"`` (DPM-Solver++(2M) in x0 space,
    a UniPC-style second-order multistep; first order at the first and last step). Latents stay in
    ``noise.dtype``: pass fp32 noise for an accurate integration.
    """
    _check_latent(noise)
    if solver not in ("euler", "multistep"):
        raise ValueError(f"solver must be 'euler' or 'multistep', got {solver!r}")
    requested = _requested(record_sigmas)
    sigmas = ode_sigmas(num_steps, shift, requested).tolist()
    cond = dict(cond or {})
    x = noise  # (B, F, C, H, W)
    saved = {1.0: x} if 1.0 in requested else {}
    prev: tuple[float, Tensor] | None = None  # (sigma, x0) of the previous step, for the multistep solver
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x0 = _predict_x0(net, x, s, cond, num_train_timesteps)
        x0_step = x0 if solver == "euler" else _second_order_x0(x0, s, s_next, prev)
        x = _flow_step(x, x0_step, s, s_next)
        prev = (s, x0)
        if s_next in requested:
            saved[s_next] = x
    trajectory = torch.stack([saved[s] for s in requested], dim=1) if requested else None
    return TeacherSample(x, trajectory)


def _flow_step(x: Tensor, x0: Tensor, sigma: float, sigma_next: float) -> Tensor:
    """Exact step for a constant x0 estimate; equal to the Euler flow step x + (s' - s) * (x - x0) / s."""
    ratio = sigma_next / sigma
    return ratio * x + (1 - ratio) * x0


def _second_order_x0(x0: Tensor, sigma: float, sigma_next: float, prev: tuple[float, Tensor] | None) -> Tensor:
    """DPM-Solver++(2M) extrapolated x0; falls back to x0 where log-SNR steps are infinite."""
    if prev is None or prev[0] >= 1.0 or sigma_next <= 0.0:
        return x0
    sigma_prev, x0_prev = prev
    h = _lam(sigma_next) - _lam(sigma)
    h_prev = _lam(sigma) - _lam(sigma_prev)
    r = h_prev / h
    return x0 + (x0 - x0_prev) / (2 * r)


def _lam(sigma: float) -> float:
    """Half log-SNR log((1 - sigma) / sigma) for 0 < sigma < 1."""
    assert 0.0 < sigma < 1.0, f"log-SNR is infinite at sigma={sigma}"
    return math.log((1 - sigma) / sigma)
