"""Is the run healthy? Signals of a causal student read off its own rollouts on fixed prompts, for any model.

Distillation losses do not say whether the student is getting better: the DMD loss of a collapsed generator can
be as small as a good one's. What goes wrong in practice shows in the videos: they freeze (a static image after
the first chunks), drift (statistics that wander as the rollout goes on, worst past the training length) or the
critic stops tracking the generator. Every `task.health.every` steps the distill job streams one video per fixed
prompt to `horizon_factor` x the training length (rolling cache of the training length) and logs, as `health/*`:

  chunk_change_early / _late   mean |x_f - x_{f-1}| / std(x) of the chunks in the first / last training-length
                               window: the dynamics; a freeze takes them towards 0
  chunk_change_min             the smallest chunk's change (averaged over videos): one frozen chunk shows here
  motion_ratio                 chunk_change_late / chunk_change_early: ~1 keeps moving, -> 0 freezes late
  std_ratio, mean_shift        late window's latent std over the early one's, and how far the per-channel means
                               moved (in early stds): a drift proxy that needs no ground truth
  static_fraction              share of videos whose mean relative frame change is below `static_threshold`
  critic_gap                   mean |critic x0 - guided teacher x0| / mean |x - teacher x0| on the early window,
                               noised to fixed levels (`noise_levels`) with fixed noise: the DMD gradient's size on a
                               fixed input; bounded while the critic tracks the student, up by several times when
                               the critic diverges (docs/health.md has both measured)

On the embedded world (`health.world`) the prompts are the world's `val` captions and the decoded videos are also
scored by the exact oracle: `health/video_score` (the geometric mean of the three per-video components, which
are logged too; sf-eval's `oracle_score` also has the set's fidelity) on the training length, and
`health/video_score_early` / `_late` on the first and the last whole 16-frame window of the long rollout.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from sf.diffusion.flow import add_noise, t_to_sigma
from sf.models.attention import CausalConfig
from sf.schema import at_least


# what a health plot shows (`sf.logging.plot_runs`): the world's scores where logged, then the model-agnostic signals
PLOT_KEYS = ["health/video_score", "health/video_score_late", "health/chunk_change_early", "health/motion_ratio",
             "health/std_ratio", "health/static_fraction", "health/critic_gap", "loss/critic"]


@dataclass
class HealthConfig:
    """Periodic checks of the student on fixed prompts, logged as `health/*` (docs/health.md)."""

    every: int = field(default=0, metadata=at_least(0))  # steps between checks; 0: never
    num_prompts: int = field(default=4, metadata=at_least(1))
    horizon_factor: int = field(default=2, metadata=at_least(2))  # rollouts this many times the training length
    static_threshold: float = field(default=0.02, metadata=at_least(0))  # relative frame change of a static video
    noise_levels: list = field(default_factory=lambda: [250, 500, 750])  # t where critic and teacher are compared
    world: bool = False  # prompts from the world's val split, and the oracle's terms


def latent_signals(latents: Tensor, train_frames: int, frames_per_block: int,
                   static_threshold: float = 0.02) -> dict[str, float]:
    """The model-agnostic dynamics and drift signals of rollouts (K, F, C, h, w) whose first `train_frames` frames
    are the training length (see the module docstring)."""
    if latents.ndim != 5 or latents.shape[1] < 2:
        raise ValueError(f"expected rollouts (K, F >= 2, C, h, w), got {tuple(latents.shape)}")
    x = latents.detach().double()
    frames = x.shape[1]
    train_frames = min(train_frames, frames)
    scale = x.std(dim=(1, 2, 3, 4)).clamp_min(1e-12)  # (K,) each video's own scale
    change = (x[:, 1:] - x[:, :-1]).abs().mean(dim=(2, 3, 4)) / scale[:, None]  # (K, F - 1): entering frame f + 1
    per_chunk = []  # (start, K) mean change of the frames each chunk adds (its first frame against the one before)
    for start, end in CausalConfig(frames_per_block).chunk_bounds(frames):
        first = max(start - 1, 0)
        if end - 1 > first:
            per_chunk.append((start, change[:, first:end - 1].mean(dim=1)))
    early = torch.stack([c for s, c in per_chunk if s < train_frames]).mean()
    late = torch.stack([c for s, c in per_chunk if s >= frames - train_frames]).mean()
    head, tail = x[:, :train_frames], x[:, frames - train_frames:]
    head_std = head.std().clamp_min(1e-12)
    shift = (tail.mean(dim=(0, 1, 3, 4)) - head.mean(dim=(0, 1, 3, 4))).abs().mean() / head_std
    return {
        "chunk_change_early": float(early),
        "chunk_change_late": float(late),
        "chunk_change_min": float(torch.stack([c.mean() for _, c in per_chunk]).min()),
        "motion_ratio": float(late / early.clamp_min(1e-12)),
        "std_ratio": float(tail.std() / head_std),
        "mean_shift": float(shift),
        "static_fraction": float((change.mean(dim=1) < static_threshold).double().mean()),
    }


@torch.no_grad()
def critic_gap(teacher_x0, critic_x0, video: Tensor, levels: list, seed: int = 0) -> dict[str, float]:
    """mean |critic - teacher| / mean |video - teacher| of the two x0 predictors `(x_t, t) -> x0` on `video`
    (B, F, C, h, w) noised to each level t in `levels` with noise fixed by `seed`; per level and their mean."""
    video = video.float()
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(seed)).to(video)
    out = {}
    for level in levels:
        t = torch.full((video.shape[0],), float(level), device=video.device)
        x_t = add_noise(video, noise, t_to_sigma(t))
        real, fake = teacher_x0(x_t, t).float(), critic_x0(x_t, t).float()
        out[f"critic_gap_t{int(level)}"] = float((fake - real).abs().mean() / (video - real).abs().mean().clamp_min(1e-12))
    out["critic_gap"] = sum(out.values()) / len(levels)
    return out
