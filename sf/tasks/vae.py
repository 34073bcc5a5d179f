"""task=vae: train the Wan VAE of `codec` (diffusers' AutoencoderKLWan) on the pixels of `data.shards`.

Each sample is a random window of `task.crop_frames` (1 + 4k) frames and a random `task.crop_size` square of a
clip, drawn from its own seeded stream — or, while `task.curriculum` lasts, several shorter windows per clip
(single frames first: the causal VAE's first-frame path learns the scenes' content at a fraction of a window's
cost). The loss is `vae_loss` (L1 of a posterior sample or mean, optionally foreground-weighted, plus an optional
squared error, + KL). Being fully convolutional and causal in time, the VAE then encodes whole 81-frame 64x64
clips. Every export (``vae.safetensors``, a `save_codec` file) first fits the per-channel latent mean/std on
`task.stats_videos` whole clips, so the latents the DiT sees are normalised.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from sf.data.bank import SampleBank, decode_pixel_sample
from sf.distributed import OptimizerConfig
from sf.models.vae import WanVAE, codec_from_config, save_codec, video_from_uint8
from sf.rng import seed_for
from sf.schema import at_least
from sf.tasks.base import Job, accumulate


@dataclass
class VaeOptim:
    """The AdamW of the one trained role."""

    vae: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))


@dataclass
class VaeTask:
    """The VAE loss and how clips are cut into training windows."""

    needs_teacher: ClassVar[bool] = False
    name: str = "vae"
    kl_weight: float = field(default=1.0e-6, metadata=at_least(0))
    sample_posterior: bool = True  # False: decode the posterior mean (trains much faster from scratch)
    # > 0: pixels away from the clip's background weigh 1 + this in the L1
    foreground_weight: float = field(default=0.0, metadata=at_least(0))
    l2_weight: float = field(default=0.0, metadata=at_least(0))  # > 0: add this x the squared error to the L1
    crop_frames: int = field(default=41, metadata=at_least(1))  # random 1 + 4k frame window of each clip
    crop_size: int = field(default=32, metadata=at_least(1))  # random square crop, a multiple of the compression
    # stages [steps, window frames, windows per clip] run first, in order; then crop_frames x 1 window per clip
    curriculum: list = field(default_factory=list)
    stats_videos: int = field(default=32, metadata=at_least(1))  # full clips encoded to fit the per-channel latent mean/std written with every export
    optim: VaeOptim = field(default_factory=VaeOptim)


class VaeJob(Job):
    """One role (`vae`), the codec of `cfg.codec` (a fresh Wan config, or saved weights to fine-tune)."""

    data_kind = "pixels"

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        task = self.task
        if cfg.codec.kind != "wan":
            raise ValueError(f"task=vae trains a Wan VAE (codec.kind=wan), got codec.kind={cfg.codec.kind!r}")
        torch.manual_seed(cfg.seed)
        codec = codec_from_config(cfg.codec)
        self.codec_config = codec.codec_config()
        self.vae = self.train_role(codec, "vae")
        self.bank = SampleBank(cfg.data.shards, decode_pixel_sample, "pixel samples")
        size, t, h, w = task.crop_size, *self.bank.samples[0]["frames"].shape[:3]
        for stage in task.curriculum:
            if len(stage) != 3 or min(stage) < 1:
                raise ValueError(f"task.curriculum stages are [steps, frames, windows per clip], all >= 1; got {stage}")
        for frames in [task.crop_frames, *(stage[1] for stage in task.curriculum)]:
            if (frames - 1) % codec.temporal_compression or size % codec.spatial_compression:
                raise ValueError(f"vae window frames must be 1 + {codec.temporal_compression}k and task.crop_size a "
                                 f"multiple of {codec.spatial_compression}, got {frames} and {size}")
            if frames > t or size > min(h, w):
                raise ValueError(f"crops of {frames} frames x {size} px do not fit clips of {t} x {h} x {w}")

    def stage(self, step: int) -> tuple[int, int]:
        """(window frames, windows per clip) at `step` (from 0): the `task.curriculum` stage it falls in, past the
        curriculum `task.crop_frames` x 1."""
        end = 0
        for steps, frames, windows in self.task.curriculum:
            end += steps
            if step < end:
                return frames, windows
        return self.task.crop_frames, 1

    def crop(self, frames: np.ndarray, position: int, step: int) -> torch.Tensor:
        """Float videos (N, T, 3, H, W) in [-1, 1] cut from one clip by its own seeded stream: N random windows of
        T frames (the stage's, `stage`) inside one random square of side `task.crop_size`."""
        rng = np.random.default_rng(seed_for(self.cfg.seed, "crop", position))
        t, h, w, _ = frames.shape
        length, windows = self.stage(step)
        size = self.task.crop_size
        starts = rng.integers(0, t - length + 1, size=windows)
        y0, x0 = (int(rng.integers(0, n - size + 1)) for n in (h, w))
        return torch.stack([video_from_uint8(frames[s:s + length, y0:y0 + size, x0:x0 + size]) for s in starts])

    def step(self, step: int) -> dict:
        cfg, task, d, out, accum = self.cfg, self.task, self.dist, {}, self.cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, positions = self.micro_batch(step, micro)
            video = torch.cat([self.crop(s["frames"], p, step) for s, p in zip(samples, positions)]).to(self.device)
            rng = torch.Generator(device=self.device).manual_seed(seed_for(cfg.seed, "vae", step, d.rank, micro))
            loss, stats = vae_loss(self.vae.module, video.to(self.dtype), task.kl_weight, rng=rng,
                                   sample=task.sample_posterior, foreground_weight=task.foreground_weight,
                                   l2_weight=task.l2_weight)
            self.optimise(self.vae, loss, "VAE", step)
            accumulate(out, {"loss/vae": loss.item(), **{f"vae/{k[4:]}": float(v) for k, v in stats.items()
                                                         if k != "vae_loss"}}, accum)
        return self.finish_update(out, self.vae, step)

    @torch.no_grad()
    def export(self, name, state, path, step) -> None:
        """A codec file with latent statistics fitted on whole clips."""
        codec = WanVAE(self.codec_config)
        codec.load_state_dict(state)
        codec.to(self.device).eval()
        clips = [video_from_uint8(s["frames"])[None].to(self.device)
                 for s in self.bank.samples[: self.task.stats_videos]]
        codec.fit_latent_stats(clips)
        save_codec(codec.cpu(), path)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """A whole clip and its reconstruction, side by side."""
        if not self.dist.is_main:
            return
        from sf.video import side_by_side

        clip = video_from_uint8(self.bank.samples[0]["frames"])[None].to(self.device)
        codec = self.vae.module
        recon = codec.decode_raw(codec.encode_raw(clip))
        logger.log_video(step, "reconstruction", side_by_side([clip[0].cpu(), recon[0].cpu()], ["data", "vae"]),
                         caption=self.bank.samples[0]["prompt"])


# ---------------------------------------------------------------------------------------------------- the loss


def foreground_mask(video: torch.Tensor, threshold: float = 0.2) -> torch.Tensor:
    """(B, T, 1, H, W) True where a pixel is away from its clip's background, for a video (B, T, 3, H, W) in
    [-1, 1]: the background is the per-channel median of the clip (the colour of most of its pixels), and a
    pixel is foreground when its L1 colour distance to it exceeds `threshold` (0.2 ~ 25/255 over the channels)."""
    b, t, c, h, w = video.shape
    background = video.float().transpose(1, 2).reshape(b, c, -1).median(dim=2).values  # (B, 3)
    return (video.float() - background[:, None, :, None, None]).abs().sum(2, keepdim=True) > threshold


def vae_loss(
    codec: WanVAE, video: torch.Tensor, kl_weight: float = 1e-6, rng: torch.Generator | None = None,
    sample: bool = True, foreground_weight: float = 0.0, l2_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L1 reconstruction of a posterior sample (or, with ``sample=False``, of the posterior mean) plus `kl_weight` x
    KL to N(0, 1), for a video (B, T, 3, H, W).

    ``foreground_weight`` w > 0 weighs each pixel away from its clip's background (`foreground_mask`) 1 + w
    times a background pixel in the L1 mean; ``l2_weight`` adds that many times the (equally weighted) squared
    error, whose gradient grows with the error. As in LDM (whose kl_weight 1e-6 this keeps), both terms are sums
    per video, here divided by the number of pixel values, so the loss reads as a per-pixel L1 error. The decode
    skips diffusers' clamp so that overshooting pixels still get a gradient. Returns the fp32 loss and detached
    stats (``vae_fg_psnr``: the PSNR over foreground pixels alone). Why the world recipe sets these:
    docs/world.md.
    """
    if not isinstance(codec, WanVAE):
        raise TypeError(f"vae_loss trains a WanVAE, got {type(codec).__name__}")
    if foreground_weight < 0 or l2_weight < 0:
        raise ValueError(f"foreground_weight and l2_weight must be >= 0, got {foreground_weight} and {l2_weight}")
    mean, logvar = codec.posterior(video)  # (B, F, C, h, w) each
    mean, logvar = mean.float(), logvar.float()
    noise = torch.randn(mean.shape, generator=rng, device=mean.device, dtype=mean.dtype)
    z = mean + torch.exp(0.5 * logvar) * noise if sample else mean
    recon = codec.decode_raw(z, clamp=False).float()  # (B, T, 3, H, W)
    error = recon - video.float()
    foreground = foreground_mask(video)
    per_value = error.abs() + l2_weight * error.square() if l2_weight > 0 else error.abs()
    if foreground_weight > 0:
        weight = 1.0 + foreground_weight * foreground.float()  # (B, T, 1, H, W), broadcast over channels
        reconstruction = (weight * per_value).sum() / (weight.sum() * video.shape[2])
    else:
        reconstruction = per_value.mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar)  # (B, F, C, h, w)
    loss = reconstruction + kl_weight * kl.sum() / video.numel()
    with torch.no_grad():
        squared = (recon.clamp(-1, 1) - video.float()).square()  # of what `decode` returns
        fg = foreground.expand_as(squared)
        fg_mse = squared[fg].mean() if bool(fg.any()) else squared.new_tensor(float("nan"))
        stats = {
            "vae_loss": loss.detach(),
            "vae_l1": error.abs().mean().detach(),
            "vae_psnr": _psnr(squared.mean()),
            "vae_fg_psnr": _psnr(fg_mse),
            "vae_kl": kl.mean(),  # per latent value
            "vae_latent_std": mean.std(),
        }
    return loss, stats


def _psnr(mse: torch.Tensor) -> torch.Tensor:
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))  # values in [-1, 1]: peak-to-peak range 2
