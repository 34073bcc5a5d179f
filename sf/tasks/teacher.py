"""task=teacher: train a bidirectional DiT by flow matching on cached latents, with caption dropout for CFG.

Data: latent shards (`sf.data.latents.cache_latents`: ``latent.safetensors`` + ``txt``) held in memory
(`sf.data.bank`). Per sample: t = shift(u) * 1000 with u uniform (`task.timestep_shift`), x_t = (1 - σ) x0 + σ ε,
target ε - x0; with probability `task.caption_dropout` the caption is replaced by the negative prompt, which is
what the unconditional branch of classifier-free guidance sees at sampling time. Exports ``teacher`` and its EMA
``teacher_ema`` (the weights to sample from).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from sf.data.bank import SampleBank
from sf.data.latents import decode_latent_sample
from sf.diffusion.flow import dmd_timestep
from sf.distill.losses import flow_matching_loss
from sf.distributed import OptimizerConfig
from sf.rng import SampleNoise, seed_for
from sf.schema import above, at_least, between
from sf.tasks.base import EmaConfig, Job, accumulate, build_net, build_text_encoder, in_dtype, video_decoder


@dataclass
class TeacherOptim:
    """The AdamW of the one trained role."""

    teacher: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))


@dataclass
class TeacherTask:
    """Flow matching with caption dropout; the sampler of the logged sample videos."""

    needs_teacher: ClassVar[bool] = False
    name: str = "teacher"
    # share of samples trained on the negative prompt (the unconditional branch)
    caption_dropout: float = field(default=0.1, metadata=between(0, 1))
    # t = shift(u), u uniform: more steps at high noise, where layout is decided
    timestep_shift: float = field(default=3.0, metadata=above(0))
    sample_steps: int = field(default=32, metadata=at_least(1))  # teacher sampler steps for the sample videos
    sample_shift: float = field(default=5.0, metadata=above(0))
    sample_cfg_scale: float = field(default=3.0, metadata=at_least(0))
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(decay=0.999))
    optim: TeacherOptim = field(default_factory=TeacherOptim)


class TeacherJob(Job):
    """One role (`teacher`) trained bidirectionally; EMA exported as `teacher_ema`."""

    networks, trained_sections, data_kind = ("model",), ("model",), "latents"

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        net = build_net(cfg.model, cfg.seed, self.dtype)
        self.net = self.train_role(net, "teacher", cfg.model.gradient_checkpointing)
        self.make_ema(self.net, self.task.ema)
        self.bank = SampleBank(cfg.data.shards, decode_latent_sample, "latent samples")
        self.text = build_text_encoder(cfg, self.device, self.dtype)
        latents = self.bank.samples[0]["latents"]
        if latents.shape[1] != net.cfg.in_channels:
            raise ValueError(f"latents of {cfg.data.shards} have {latents.shape[1]} channels, the model takes "
                             f"{net.cfg.in_channels} (set model.overrides.in_channels)")

    def step(self, step: int) -> dict:
        cfg, task, out, accum = self.cfg, self.task, {}, self.cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, positions = self.micro_batch(step, micro)
            noise = SampleNoise([seed_for(cfg.seed, "flow", p) for p in positions], device=self.device)
            drop = [torch.rand(1, generator=g).item() < task.caption_dropout for g in noise.generators]
            prompts = [cfg.text.negative_prompt if dropped else s["prompt"] for s, dropped in zip(samples, drop)]
            context, _ = self.text(prompts)
            x0 = torch.stack([s["latents"] for s in samples]).to(self.device)  # (B, F, C, h, w)
            t = dmd_timestep(noise.rand(), task.timestep_shift, 0.0, 1.0)  # (B,) in [0, 1000]
            loss = flow_matching_loss(in_dtype(self.net, self.dtype), x0, t, noise.randn_like(x0),
                                      context.to(self.device, self.dtype))
            self.optimise(self.net, loss, "teacher flow-matching", step)
            accumulate(out, {"loss/flow": loss.item(), "data/caption_dropout": sum(drop) / len(drop)}, accum)
        return self.finish_update(out, self.net, step)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """The guided many-step sampler on the first training caption, with the current weights."""
        from sf.diffusion.sample import guided_net, sample_teacher
        from sf.models.text import encode_negative_prompt

        cfg, task = self.cfg, self.task
        sample = self.bank.samples[0]
        cond, _ = self.text([sample["prompt"]])
        uncond, _ = encode_negative_prompt(self.text, cfg.text.negative_prompt, 1)
        guided = guided_net(in_dtype(self.net.module, self.dtype), {"context": cond.to(self.device, self.dtype)},
                            {"context": uncond.to(self.device, self.dtype)}, task.sample_cfg_scale)
        noise = torch.randn((1, *sample["latents"].shape), generator=torch.Generator().manual_seed(cfg.seed))
        video = sample_teacher(guided, noise.to(self.device), num_steps=task.sample_steps,
                               shift=task.sample_shift).x0
        if self.dist.is_main:
            if not hasattr(self, "_decode"):
                self._decode = video_decoder(cfg, self.device)
            logger.log_video(step, "sample", self._decode(video[0]), caption=sample["prompt"])
