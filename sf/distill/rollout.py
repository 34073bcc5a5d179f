"""Autoregressive rollouts of the causal student over its KV cache: self-forcing training and streaming inference.

Every rollout runs the same per-chunk loop (`sf.diffusion.sample.sample_few_step` up to the chunk's exit step):

  x = this chunk's noise
  for step in 0 .. exit_step:                     # steps before the exit run under no_grad
      x0 = x - sigma_step * net(x, t_step, context, cache=cache)
      if step < exit_step: x = add_noise(x0, fresh noise, sigma_{step + 1})    # re-noise, not an ODE step
  output = x0                                     # the exit step carries gradient (inside the window)
  net(context_input, t_ctx, context, cache=cache, update_cache=True)          # write the chunk's K/V

The rollouts differ only in what is written into the cache: the student's own clean output (self forcing,
inference), the real clean chunk (teacher forcing) or an independently noised real chunk (diffusion forcing).

Conventions: ``net(x, t, context, *, cache=..., update_cache=...)`` predicts the flow ``v = noise - x0`` for
latents (B, f, C, H, W) at per-frame timesteps (B, f) in [0, 1000]; ``context`` is passed positionally as the
third argument (the text features (B, L, D) of a VideoDiT); ``new_cache(causal, keep_grad=...)`` returns an
empty KV cache (``model.new_cache`` of the unwrapped module, while ``net`` may be a wrapping engine).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor

from sf.diffusion.flow import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    t_to_sigma,
    warp_steps,
)
from sf.diffusion.sample import sample_few_step
from sf.models.attention import CausalConfig, KVCache
from sf.rng import Randomness, SampleNoise, randint_per_sample, randn_like

FlowNet = Callable[..., Tensor]
NewCache = Callable[..., KVCache]
Sync = Callable[[Tensor], Tensor]
# (start, end, output) -> (latents, per-frame t) written into the cache after the chunk
ContextFn = Callable[[int, int, Tensor], tuple[Tensor, Tensor]]


def identity(x: Tensor) -> Tensor:
    """Default `sync`: a single process needs no broadcast."""
    return x


@dataclass
class RolloutConfig:
    """How the student rolls out a video: step list, chunking, cache window, exit-step and gradient options."""

    denoising_steps: list = field(default_factory=lambda: [1000, 750, 500, 250])
    warp_denoising_steps: bool = True  # map the steps through the shifted 1000-entry table
    shift: float = DEFAULT_SHIFT
    num_frames: int = 21  # latent frames per training rollout
    frames_per_block: int = 3
    local_attn_frames: Optional[int] = None  # rolling window (None: attend to everything before)
    sink_frames: int = 0
    context_noise: float = 0.0  # timestep at which the clean output is re-run to fill the cache
    same_exit_across_blocks: bool = True
    last_step_only: bool = False
    grad_window_frames: Optional[int] = 21  # chunks starting in the last N frames get gradient; None: all
    context_grad: bool = False  # study option: keep gradient through the cache to earlier chunks

    def __post_init__(self) -> None:
        """Validate the fields (user mistakes raise ValueError)."""
        steps = list(self.denoising_steps)
        if not steps:
            raise ValueError("denoising_steps must not be empty")
        if any(s != int(s) or not 0 < s <= NUM_TRAIN_TIMESTEPS for s in steps):
            raise ValueError(f"denoising_steps must be integers in (0, {NUM_TRAIN_TIMESTEPS}], got {steps}")
        if any(b >= a for a, b in zip(steps, steps[1:])):
            raise ValueError(f"denoising_steps must be strictly decreasing, got {steps}")
        if self.num_frames < 1:
            raise ValueError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 0.0 <= self.context_noise < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"context_noise must lie in [0, {NUM_TRAIN_TIMESTEPS}), got {self.context_noise}")
        if self.grad_window_frames is not None and self.grad_window_frames < 1:
            raise ValueError(f"grad_window_frames must be >= 1 or None, got {self.grad_window_frames}")
        self.causal  # noqa: B018  (CausalConfig validates frames_per_block, the window and the sink)

    @property
    def num_steps(self) -> int:
        """Number of denoising steps of a full (inference) chunk."""
        return len(self.denoising_steps)

    @property
    def causal(self) -> CausalConfig:
        """The student's attention structure."""
        return CausalConfig(self.frames_per_block, self.local_attn_frames, self.sink_frames)

    def timesteps(self, device: torch.device | str | None = None) -> Tensor:
        """Network t of each denoising step (num_steps,) fp32, warped when `warp_denoising_steps`."""
        if self.warp_denoising_steps:
            t = warp_steps(self.denoising_steps, self.shift)
        else:
            t = torch.tensor(self.denoising_steps, dtype=torch.float32)
        return t.to(device)


@dataclass
class RolloutOutput:
    """A rolled-out video and what the loss / logging needs to know about the rollout."""

    video: Tensor  # (B, F, C, H, W); requires grad when a chunk was inside the gradient window
    exit_steps: Tensor  # (num_chunks,) long, the synchronised exit step of each chunk
    exit_timesteps: Tensor  # (num_chunks,) fp32, network t of each chunk's exit step
    num_forwards: int  # network calls made, cache writes included
    # Unshifted t range [to, from] in [0, 1000] that the (first chunk's) exit step denoised; the reference
    # restricts the DMD timestep to it before shifting (its `ts_schedule` option).
    denoised_from: float
    denoised_to: float


def draw_exit_steps(cfg: RolloutConfig, num_chunks: int, rng: torch.Generator | None = None) -> Tensor:
    """Exit step index in [0, num_steps) per chunk (num_chunks,) long, on the rng's device."""
    if num_chunks < 1:
        raise ValueError(f"num_chunks must be >= 1, got {num_chunks}")
    device = _gen_device(rng)
    if cfg.last_step_only:
        return torch.full((num_chunks,), cfg.num_steps - 1, dtype=torch.long, device=device)
    exit_steps = torch.randint(0, cfg.num_steps, (num_chunks,), generator=rng, device=device)
    return exit_steps[:1].expand(num_chunks).clone() if cfg.same_exit_across_blocks else exit_steps


# ----------------------------------------------------------------------------------------------- training


def self_forcing_rollout(
    net: FlowNet,
    new_cache: NewCache,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    *,
    rng: Randomness = None,
    sync: Sync = identity,
    exit_rng: torch.Generator | None = None,
) -> RolloutOutput:
    """Training rollout: each chunk is generated from the student's own earlier clean outputs in the cache.

    `noise` (B, F, C, H, W) with F = cfg.num_frames. The exit steps are drawn once, passed through `sync`
    (the trainer broadcasts them from rank 0 so every rank runs the same number of forwards) and used as
    returned. Gradient reaches the rng only through each chunk's exit-step forward (chunks starting in
    the last `grad_window_frames` frames); the cache is written under no_grad unless `cfg.context_grad`.
    Under an enclosing torch.no_grad (the critic's rollout) nothing records gradient.
    """
    return _training_rollout(net, new_cache, noise, context, cfg, rng, exit_rng, sync, _own_output(cfg, rng))


def teacher_forcing_rollout(
    net: FlowNet,
    new_cache: NewCache,
    real_latents: Tensor,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    *,
    rng: Randomness = None,
    sync: Sync = identity,
    exit_rng: torch.Generator | None = None,
) -> RolloutOutput:
    """Baseline: each chunk is generated as in self forcing, but the cache holds the real clean chunks."""
    _check_same_shape(real_latents, noise)
    return _training_rollout(net, new_cache, noise, context, cfg, rng, exit_rng, sync,
                             _real_context(cfg, real_latents, rng, noised=False))


def diffusion_forcing_rollout(
    net: FlowNet,
    new_cache: NewCache,
    real_latents: Tensor,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    *,
    rng: Randomness = None,
    sync: Sync = identity,
    exit_rng: torch.Generator | None = None,
) -> RolloutOutput:
    """Baseline: the cache holds real chunks noised independently, each (per sample) to a random step's t."""
    _check_same_shape(real_latents, noise)
    return _training_rollout(net, new_cache, noise, context, cfg, rng, exit_rng, sync,
                             _real_context(cfg, real_latents, rng, noised=True))


def _training_rollout(
    net: FlowNet,
    new_cache: NewCache,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    rng: Randomness,
    exit_rng: Randomness,
    sync: Sync,
    context_of: ContextFn,
) -> RolloutOutput:
    """Draw and sync the exit steps, run the chunk loop, collect the video."""
    _check_latent(noise)
    num_frames = noise.shape[1]
    if num_frames != cfg.num_frames:
        raise ValueError(f"noise has {num_frames} frames, the rollout config expects num_frames={cfg.num_frames}")
    bounds = cfg.causal.chunk_bounds(num_frames)
    if exit_rng is None and isinstance(rng, SampleNoise):
        raise ValueError("per-sample noise needs an exit_rng: the exit steps are drawn once per rollout")
    drawn = draw_exit_steps(cfg, len(bounds), exit_rng if exit_rng is not None else rng)
    exit_steps = sync(drawn.to(noise.device)).to(noise.device)
    if exit_steps.shape != (len(bounds),):
        raise ValueError(f"sync returned exit steps of shape {tuple(exit_steps.shape)}, expected ({len(bounds)},)")
    exits = exit_steps.tolist()  # one host sync per rollout
    if min(exits) < 0 or max(exits) >= cfg.num_steps:
        raise ValueError(f"exit steps must lie in [0, {cfg.num_steps}), got {exits}")

    window_start = 0 if cfg.grad_window_frames is None else num_frames - cfg.grad_window_frames
    with_grad = [torch.is_grad_enabled() and start >= window_start for start, _ in bounds]
    counted = _Counted(net)
    cache = new_cache(cfg.causal, keep_grad=cfg.context_grad)
    chunks = _chunk_loop(counted, cache, noise, context, cfg, exits, with_grad, context_of, rng)
    video = torch.cat(list(chunks), dim=1)  # (B, F, C, H, W)

    timesteps = cfg.timesteps(noise.device)
    denoised_from, denoised_to = _denoised_range(cfg, timesteps, exits[0])
    return RolloutOutput(video, exit_steps, timesteps[exit_steps.long()], counted.calls, denoised_from, denoised_to)


# ----------------------------------------------------------------------------------------------- inference


def stream_chunks(
    net: FlowNet,
    new_cache: NewCache,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    *,
    rng: Randomness = None,
) -> Iterator[Tensor]:
    """Streaming inference: yield each chunk's clean latents (B, f, C, H, W) as soon as it is denoised.

    All steps run for every chunk, under no_grad. `noise` may have any number of frames (with a rolling
    window, far more than training saw); the chunk's cache write runs when the next chunk is requested, and
    the last chunk's, which nothing would read, not at all.
    """
    _check_latent(noise)
    num_chunks = len(cfg.causal.chunk_bounds(noise.shape[1]))
    exits = [cfg.num_steps - 1] * num_chunks
    cache = new_cache(cfg.causal, keep_grad=False)
    yield from _chunk_loop(net, cache, noise, context, cfg, exits, [False] * num_chunks,
                           _own_output(cfg, rng), rng, write_last=False)


def generate(
    net: FlowNet,
    new_cache: NewCache,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    *,
    rng: Randomness = None,
) -> Tensor:
    """Inference: the whole video (B, F, C, H, W) from noise, chunk by chunk over the cache, all steps."""
    return torch.cat(list(stream_chunks(net, new_cache, noise, context, cfg, rng=rng)), dim=1)


# ----------------------------------------------------------------------------------------------- the loop


def _chunk_loop(
    net: FlowNet,
    cache: KVCache,
    noise: Tensor,
    context: Any,
    cfg: RolloutConfig,
    exit_steps: list[int],
    with_grad: list[bool],
    context_of: ContextFn,
    rng: Randomness,
    write_last: bool = True,
) -> Iterator[Tensor]:
    """Denoise chunk after chunk, yield each output, then write what `context_of` gives into the cache (after the
    last chunk too unless `write_last` is False: training keeps that forward, so its counts and draws stay put).

    Grad mode is set around each forward only (never across a yield), so a consumer of this Python generator
    never runs in a grad mode it did not choose.
    """
    timesteps = cfg.timesteps(noise.device).tolist()
    bounds = cfg.causal.chunk_bounds(noise.shape[1])
    for chunk, (start, end) in enumerate(bounds):
        exit_step = exit_steps[chunk]
        student = lambda x, t: net(x, t, context, cache=cache)  # noqa: E731  (this chunk over the cache)
        x0 = sample_few_step(student, noise[:, start:end], timesteps[:exit_step + 1], rng=rng,
                             grad_last=with_grad[chunk])  # (B, f, C, H, W)
        yield x0
        if chunk == len(bounds) - 1 and not write_last:
            return
        x_ctx, t_ctx = context_of(start, end, x0)
        with torch.set_grad_enabled(with_grad[chunk] and cfg.context_grad):
            net(x_ctx, t_ctx, context, cache=cache, update_cache=True)


def _own_output(cfg: RolloutConfig, rng: Randomness) -> ContextFn:
    """Self forcing / inference: the chunk's own clean output, noised to `context_noise` when it is > 0."""

    def context_of(start: int, end: int, output: Tensor) -> tuple[Tensor, Tensor]:
        """Cache input for the chunk [start, end)."""
        t = _frame_t(cfg.context_noise, output.shape[0], end - start, output.device)
        if cfg.context_noise > 0:
            fresh = randn_like(output, rng)
            output = add_noise(output, fresh, t_to_sigma(cfg.context_noise))
        return output, t

    return context_of


def _real_context(cfg: RolloutConfig, real: Tensor, rng: Randomness, noised: bool) -> ContextFn:
    """Teacher forcing (real chunk as the own output would be) or diffusion forcing (real chunk at a random step)."""
    if not noised:
        own = _own_output(cfg, rng)
        return lambda start, end, output: own(start, end, real[:, start:end])
    step_t = cfg.timesteps(real.device)

    def context_of(start: int, end: int, output: Tensor) -> tuple[Tensor, Tensor]:
        """The real chunk noised per sample to the t of a uniformly drawn denoising step."""
        chunk = real[:, start:end]
        step = randint_per_sample(cfg.num_steps, chunk.shape[0], rng, real.device)
        t = step_t[step.to(real.device)]  # (B,)
        fresh = randn_like(chunk, rng)
        return add_noise(chunk, fresh, t_to_sigma(t)), t[:, None].expand(-1, end - start).contiguous()

    return context_of


# ----------------------------------------------------------------------------------------------- helpers


class _Counted:
    """Call-counting wrapper of a network (the rollout reports how many forwards it made)."""

    def __init__(self, net: FlowNet):
        self.net = net
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Tensor:
        """Forward and count."""
        self.calls += 1
        return self.net(*args, **kwargs)


def _frame_t(t: float, batch: int, frames: int, device: torch.device) -> Tensor:
    """Per-frame network timestep (B, f) fp32 filled with t."""
    return torch.full((batch, frames), float(t), dtype=torch.float32, device=device)


def _denoised_range(cfg: RolloutConfig, timesteps: Tensor, exit_step: int) -> tuple[float, float]:
    """Unshifted t interval [to, from] covered by the exit step: its own t down to the next step's (or 0)."""

    def unshifted(t: float) -> float:
        sigma = t_to_sigma(t)  # inverse of shift_sigma: sigma = s' / (s - (s - 1) s')
        return NUM_TRAIN_TIMESTEPS * sigma / (cfg.shift - (cfg.shift - 1) * sigma)

    to = unshifted(float(timesteps[exit_step + 1])) if exit_step + 1 < cfg.num_steps else 0.0
    return round(unshifted(float(timesteps[exit_step])), 3), round(to, 3)  # fp32 table: ~1e-5 off the steps


def _gen_device(rng: torch.Generator | None) -> torch.device | None:
    """Device random draws must be made on to use `rng`."""
    return rng.device if rng is not None else None


def _check_latent(x: Tensor) -> None:
    """Rollouts work on (B, F, C, H, W) latents."""
    if x.ndim != 5:
        raise ValueError(f"expected latents of shape (B, F, C, H, W), got {tuple(x.shape)}")


def _check_same_shape(real: Tensor, noise: Tensor) -> None:
    """Real latents and noise describe the same video."""
    if real.shape != noise.shape:
        raise ValueError(f"real latents {tuple(real.shape)} and noise {tuple(noise.shape)} must have the same shape")
