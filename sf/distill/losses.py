"""Distillation objectives: DMD and SiD generator losses, the critic's flow matching, ODE regression.

Score callables are x0 predictors ``score(x_t, t) -> x0`` on latents (B, F, C, H, W) with t of shape (B,)
or (B, F) in [0, 1000]; `x0_predictor` builds one from a flow network ``net(x, t, context)`` (with optional
classifier-free guidance). Flow callables ``flow(x_t, t) -> v`` predict ``v = noise - x0``. The caller
draws t (e.g. `sf.diffusion.dmd_timestep`) and the noise, so the losses themselves are deterministic.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sf.diffusion.flow import add_noise, flow_from_x0_noise, sigma_to_t, t_to_sigma, x0_from_flow
from sf.diffusion.sample import guided_net
from sf.models.attention import CausalConfig

Score = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> x0
Flow = Callable[[Tensor, Tensor], Tensor]  # (x_t, t) -> v
FlowNet = Callable[..., Tensor]  # (x, t, context, **kwargs) -> v


def x0_predictor(
    net: FlowNet,
    context: Any,
    cfg_scale: float | None = None,
    uncond_context: Any = None,
    *,
    batched: bool = False,
) -> Score:
    """Wrap a flow network into ``score(x_t, t) -> x0``; with `cfg_scale` g the flow is cond + g * (cond - uncond).

    CFG on the flow equals CFG on x0 (x0 = x_t - sigma * v is affine in v). `batched` runs both branches as
    one forward of batch 2B (stateless networks only).
    """
    if cfg_scale is None:
        flow = lambda x_t, t: net(x_t, t, context)  # noqa: E731
    else:
        if uncond_context is None:
            raise ValueError("classifier-free guidance needs uncond_context (e.g. the negative-prompt features)")
        positional = lambda x_t, t, context: net(x_t, t, context)  # noqa: E731  (guided_net binds by keyword)
        flow = guided_net(positional, {"context": context}, {"context": uncond_context}, cfg_scale, batched=batched)

    def score(x_t: Tensor, t: Tensor) -> Tensor:
        """Clean estimate at x_t."""
        return x0_from_flow(x_t, flow(x_t, t), t_to_sigma(t))

    return score


# ----------------------------------------------------------------------------------------------- generator


def dmd_loss(
    video: Tensor,
    real_score: Score,
    fake_score: Score,
    t: Tensor,
    noise: Tensor,
    *,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Distribution-matching loss of a generated video x (B, F, C, H, W) at timesteps t (B,).

    With x_t = add_noise(x, noise, t / 1000) and, under no_grad, r = real_score(x_t, t), f = fake_score(x_t, t):
        grad = (f - r) / mean_{F,C,H,W} |x - r|          (per-sample normaliser)
        loss = 0.5 * mean((x - stopgrad(x - grad))^2)      so  dloss/dx = grad / x.numel()
    computed in `compute_dtype` (fp64 as the reference; the subtraction loses digits in fp32 when |grad| is
    small next to |x|). Returns the loss (fp32, or fp64 for fp64 input) and detached stats.
    """
    _check_pair(video, noise)
    with torch.no_grad():
        x_t = add_noise(video.detach(), noise, t_to_sigma(t))
        real_x0 = real_score(x_t, t).to(compute_dtype)
        fake_x0 = fake_score(x_t, t).to(compute_dtype)
        normaliser = _normaliser(video.detach().to(compute_dtype), real_x0)  # (B, 1, 1, 1, 1)
        grad = (fake_x0 - real_x0) / normaliser
    x = video.to(compute_dtype)
    loss = 0.5 * F.mse_loss(x, (x - grad).detach())
    stats = {
        "dmd_loss": loss.detach().float(),
        "dmd_grad_abs_mean": grad.abs().mean().float(),
        "dmd_grad_norm": grad.flatten(1).norm(dim=1).mean().float(),  # per-sample L2 norm, batch mean
        "dmd_normaliser": normaliser.mean().float(),
    }
    return loss.to(_loss_dtype(video)), stats


def sid_loss(
    video: Tensor,
    real_score: Score,
    fake_score: Score,
    t: Tensor,
    noise: Tensor,
    *,
    alpha: float = 1.2,
    through_scores: bool = True,
    compute_dtype: torch.dtype = torch.float64,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Score identity Distillation generator loss (Zhou et al., 2024) in x0 space.

    With x_g the video, x_t = add_noise(x_g, noise, t / 1000), r = real_score(x_t, t), f = fake_score(x_t, t):
        loss = mean( ((1 - alpha) * (r - f)^2 + (r - f) * (f - x_g)) / mean_{F,C,H,W} |x_g - r| )
    (the normaliser is per sample and carries no gradient). With `through_scores` (SiD as published) the
    scores run with grad, so the gradient reaches x_g both directly and through x_t into the (frozen) score
    networks: a backward through teacher and critic, and their activations kept. Without it the scores run
    under no_grad and the gradient is exactly the DMD gradient (f - r) / normaliser / numel.
    The score networks' parameters must be frozen by the caller (requires_grad False).
    """
    _check_pair(video, noise)
    with torch.set_grad_enabled(through_scores and torch.is_grad_enabled()):
        x_t = add_noise(video, noise, t_to_sigma(t))
        real_x0 = real_score(x_t, t).to(compute_dtype)
        fake_x0 = fake_score(x_t, t).to(compute_dtype)
    x = video.to(compute_dtype)
    with torch.no_grad():
        normaliser = _normaliser(x, real_x0)  # (B, 1, 1, 1, 1)
    gap = real_x0 - fake_x0
    loss = (((1 - alpha) * gap.square() + gap * (fake_x0 - x)) / normaliser).mean()
    stats = {
        "sid_loss": loss.detach().float(),
        "sid_score_gap_abs_mean": gap.detach().abs().mean().float(),
        "sid_normaliser": normaliser.mean().float(),
    }
    return loss.to(_loss_dtype(video)), stats


def _normaliser(x: Tensor, real_x0: Tensor) -> Tensor:
    """Per-sample mean |x - real_x0| over (F, C, H, W), shaped (B, 1, 1, 1, 1).

    A sample the real score reproduces exactly (normaliser 0) gets an infinite normaliser, i.e. no gradient,
    where the reference's nan_to_num would turn 1/0 into the largest float and the loss into inf.
    """
    normaliser = (x - real_x0).abs().mean(dim=tuple(range(1, x.ndim)), keepdim=True)
    return torch.where(normaliser > 0, normaliser, torch.inf)


def _loss_dtype(video: Tensor) -> torch.dtype:
    """Losses are returned in fp32 (fp64 for fp64 inputs)."""
    return torch.promote_types(video.dtype, torch.float32)


# ----------------------------------------------------------------------------------------------- critic


def critic_loss(fake_flow: Flow, video: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """Fake-score (critic) loss: flow matching on the detached generated video, MSE in fp32."""
    return _flow_mse(fake_flow, video.detach(), t, noise)


def flow_matching_loss(net: FlowNet, x0: Tensor, t: Tensor, noise: Tensor, context: Any, **net_kwargs: Any) -> Tensor:
    """Rectified-flow loss MSE(net(x_t, t, context, **net_kwargs), noise - x0); t (B,) or per frame (B, F).

    For teacher training (bidirectional) or diffusion-forcing students (`causal=CausalConfig(...)` and
    independent per-chunk t).
    """
    return _flow_mse(lambda x_t, t_: net(x_t, t_, context, **net_kwargs), x0, t, noise)


def _flow_mse(flow: Flow, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
    """MSE of the flow predicted at x_t = add_noise(x0, noise, t / 1000) to the target noise - x0."""
    _check_pair(x0, noise)
    x_t = add_noise(x0, noise, t_to_sigma(t))
    return F.mse_loss(flow(x_t, t).float(), flow_from_x0_noise(x0, noise).float())


# ----------------------------------------------------------------------------------------------- ODE init


def ode_regression_loss(
    net: FlowNet,
    trajectory: Tensor,
    sigmas: Tensor,
    clean: Tensor,
    context: Any,
    causal: CausalConfig,
    rng: torch.Generator | None = None,
) -> Tensor:
    """Regress the causal student onto teacher ODE pairs.

    `trajectory` (B, K, F, C, H, W) holds the teacher's latents at the K noise levels `sigmas` (K,) of the
    student's step list, `clean` (B, F, C, H, W) the end of the trajectory. Each chunk of each sample gets a
    random step index; one block-causal full-sequence forward predicts the flow at those per-frame t, and
    its x0 is regressed (MSE, fp32) to `clean`. Frames drawn at sigma = 0 carry no signal and are left out.
    """
    if trajectory.ndim != 6 or clean.ndim != 5 or trajectory[:, 0].shape != clean.shape:
        raise ValueError(f"trajectory {tuple(trajectory.shape)} must be (B, K, F, C, H, W) around clean "
                         f"{tuple(clean.shape)} (B, F, C, H, W)")
    batch, num_steps, num_frames = trajectory.shape[:3]
    sigmas = torch.as_tensor(sigmas, dtype=torch.float32, device=trajectory.device).flatten()
    if sigmas.numel() != num_steps:
        raise ValueError(f"got {sigmas.numel()} sigmas for a trajectory of {num_steps} steps")

    chunk_of_frame = torch.arange(num_frames, device=trajectory.device) // causal.frames_per_block  # (F,)
    num_chunks = int(chunk_of_frame[-1]) + 1
    device = rng.device if rng is not None else None
    chunk_step = torch.randint(0, num_steps, (batch, num_chunks), generator=rng, device=device)
    step = chunk_step.to(trajectory.device)[:, chunk_of_frame]  # (B, F): one step index per chunk
    frames = torch.arange(num_frames, device=trajectory.device)
    x = trajectory[torch.arange(batch, device=trajectory.device)[:, None], step, frames[None]]  # (B, F, C, H, W)
    sigma = sigmas[step]  # (B, F)

    x0 = x0_from_flow(x, net(x, sigma_to_t(sigma), context, causal=causal), sigma)
    keep = sigma > 0  # (B, F)
    return F.mse_loss(x0[keep].float(), clean[keep].float())


def _check_pair(x: Tensor, noise: Tensor) -> None:
    """A latent and its noise must match in shape."""
    if x.shape != noise.shape:
        raise ValueError(f"latents {tuple(x.shape)} and noise {tuple(noise.shape)} must have the same shape")
