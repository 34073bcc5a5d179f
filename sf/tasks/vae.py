"""task=vae: train the Wan VAE of `codec` (diffusers' AutoencoderKLWan) on the pixels of `data.shards`.

Each sample is a random window of `vae.crop_frames` (1 + 4k) frames and a random `vae.crop_size` square of a clip,
drawn from its own seeded stream — or, while `vae.curriculum` lasts, several shorter windows per clip (single
frames first: the causal VAE's first-frame path learns the scenes' content at a fraction of a window's cost).
The loss is `sf.models.vae.vae_loss` (L1 of a posterior sample or mean, optionally foreground-weighted, plus an
optional squared error, + KL). Being fully convolutional and causal in time, the VAE then encodes whole
81-frame 64x64 clips. Every export (``vae.safetensors``, a `save_codec` file) first fits the per-channel latent
mean/std on `vae.stats_videos` whole clips, so the latents the DiT sees are normalised.
"""

from __future__ import annotations

import numpy as np
import torch

from sf import distributed
from sf.data.bank import SampleBank, decode_pixel_sample
from sf.models.vae import WanVAE, codec_from_config, save_codec, vae_loss, video_from_uint8
from sf.rng import seed_for
from sf.tasks.base import Job, accumulate


class VaeJob(Job):
    """One engine (`vae`), the codec of `cfg.codec` (a fresh Wan config, or saved weights to fine-tune)."""

    ema = None

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        if cfg.codec.kind != "wan":
            raise ValueError(f"task=vae trains a Wan VAE (codec.kind=wan), got codec.kind={cfg.codec.kind!r}")
        torch.manual_seed(cfg.seed)
        codec = codec_from_config(cfg.codec)
        self.codec_config = codec.codec_config()
        self.engine = distributed.build_engine(codec, cfg.optim.generator, ctx.ds_config)
        self.engines = {"vae": self.engine}
        self.bank = SampleBank(cfg.data.shards, decode_pixel_sample, "pixel samples")
        self.num_skipped = self.bank.num_skipped
        size, t, h, w = cfg.vae.crop_size, *self.bank.samples[0]["frames"].shape[:3]
        for stage in cfg.vae.curriculum:
            if len(stage) != 3 or min(stage) < 1:
                raise ValueError(f"vae.curriculum stages are [steps, frames, windows per clip], all >= 1; got {stage}")
        for frames in [cfg.vae.crop_frames, *(stage[1] for stage in cfg.vae.curriculum)]:
            if (frames - 1) % codec.temporal_compression or size % codec.spatial_compression:
                raise ValueError(f"vae window frames must be 1 + {codec.temporal_compression}k and vae.crop_size a "
                                 f"multiple of {codec.spatial_compression}, got {frames} and {size}")
            if frames > t or size > min(h, w):
                raise ValueError(f"crops of {frames} frames x {size} px do not fit clips of {t} x {h} x {w}")

    def base_lr(self, name):
        return self.cfg.optim.generator.lr

    def stage(self, step: int) -> tuple[int, int]:
        """(window frames, windows per clip) at `step` (from 0): the `vae.curriculum` stage it falls in, past the
        curriculum `vae.crop_frames` x 1."""
        end = 0
        for steps, frames, windows in self.cfg.vae.curriculum:
            end += steps
            if step < end:
                return frames, windows
        return self.cfg.vae.crop_frames, 1

    def crop(self, frames: np.ndarray, position: int, step: int) -> torch.Tensor:
        """Float videos (N, T, 3, H, W) in [-1, 1] cut from one clip by its own seeded stream: N random windows of
        T frames (the stage's, `stage`) inside one random square of side `vae.crop_size`."""
        rng = np.random.default_rng(seed_for(self.cfg.seed, "crop", position))
        t, h, w, _ = frames.shape
        length, windows = self.stage(step)
        size = self.cfg.vae.crop_size
        starts = rng.integers(0, t - length + 1, size=windows)
        y0, x0 = (int(rng.integers(0, n - size + 1)) for n in (h, w))
        return torch.stack([video_from_uint8(frames[s:s + length, y0:y0 + size, x0:x0 + size]) for s in starts])

    def step(self, step: int) -> dict:
        cfg, d, out, accum = self.cfg, self.dist, {}, self.cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, positions = self.micro_batch(step, micro)
            video = torch.cat([self.crop(s["frames"], p, step) for s, p in zip(samples, positions)]).to(self.device)
            generator = torch.Generator(device=self.device).manual_seed(seed_for(cfg.seed, "vae", step, d.rank, micro))
            loss, stats = vae_loss(self.engine.module, video.to(self.dtype), cfg.vae.kl_weight, generator=generator,
                                  sample=cfg.vae.sample_posterior, foreground_weight=cfg.vae.foreground_weight,
                                  l2_weight=cfg.vae.l2_weight)
            self.optimise(self.engine, loss, "VAE", step)
            accumulate(out, {"loss/vae": loss.item(), **{f"vae/{k[4:]}": float(v) for k, v in stats.items()
                                                         if k != "vae_loss"}}, accum)
        return self.finish_step(out, "vae", step)

    @torch.no_grad()
    def export(self, name, state, path, step) -> None:
        """A codec file with latent statistics fitted on whole clips."""
        codec = WanVAE(self.codec_config)
        codec.load_state_dict(state)
        codec.to(self.device).eval()
        clips = [video_from_uint8(s["frames"])[None].to(self.device)
                 for s in self.bank.samples[: self.cfg.vae.stats_videos]]
        codec.fit_latent_stats(clips)
        save_codec(codec.cpu(), path)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """A whole clip and its reconstruction, side by side."""
        if not self.dist.is_main:
            return
        from sf.video import side_by_side

        clip = video_from_uint8(self.bank.samples[0]["frames"])[None].to(self.device)
        codec = self.engine.module
        recon = codec.decode_raw(codec.encode_raw(clip))
        logger.log_video(step, "reconstruction", side_by_side([clip[0].cpu(), recon[0].cpu()], ["data", "vae"]),
                         caption=self.bank.samples[0]["prompt"])
