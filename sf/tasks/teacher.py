"""task=teacher: train a bidirectional DiT by flow matching on cached latents, with caption dropout for CFG.

Data: latent shards (`sf.data.latents.cache_latents`: ``latent.safetensors`` + ``txt``) held in memory
(`sf.data.bank`). Per sample: t = shift(u) * 1000 with u uniform (`flow.timestep_shift`), x_t = (1 - σ) x0 + σ ε,
target ε - x0; with probability `flow.caption_dropout` the caption is replaced by the negative prompt, which is
what the unconditional branch of classifier-free guidance sees at sampling time. Exports ``teacher`` and its EMA
``teacher_ema`` (the weights to sample from).
"""

from __future__ import annotations

import torch

from sf import distributed
from sf.data.bank import SampleBank, decode_latent_sample
from sf.distill.losses import flow_matching_loss
from sf.rng import SampleNoise, seed_for
from sf.tasks.base import Job, accumulate, build_net, build_text_encoder, in_dtype, video_decoder


class TeacherJob(Job):
    """One engine (`teacher`) trained bidirectionally; EMA exported as `teacher_ema`."""

    ema_name = "teacher_ema"

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        net = build_net(cfg.model, cfg.seed)
        self.net_cfg = net.cfg
        self.engine = distributed.build_engine(net, cfg.optim.generator, ctx.ds_config)
        self.engines = {"teacher": self.engine}
        self.ema = distributed.EMA(self.engine.module, cfg.flow.ema_decay) if cfg.flow.ema_decay > 0 else None
        self.bank = SampleBank(cfg.data.shards, decode_latent_sample, "latent samples")
        self.num_skipped = self.bank.num_skipped
        self.text = build_text_encoder(cfg, self.device)
        latents = self.bank.samples[0]["latents"]
        if latents.shape[1] != net.cfg.in_channels:
            raise ValueError(f"latents of {cfg.data.shards} have {latents.shape[1]} channels, the model takes "
                             f"{net.cfg.in_channels} (set model.overrides.in_channels)")

    def base_lr(self, name):
        return self.cfg.optim.generator.lr

    def model_config(self, name):
        return self.net_cfg

    def step(self, step: int) -> dict:
        cfg, out, accum = self.cfg, {}, self.cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, positions = self.micro_batch(step, micro)
            noise = SampleNoise([seed_for(cfg.seed, "flow", p) for p in positions], device=self.device)
            drop = [torch.rand(1, generator=g).item() < cfg.flow.caption_dropout for g in noise.generators]
            prompts = [cfg.text.negative_prompt if dropped else s["prompt"] for s, dropped in zip(samples, drop)]
            context, _ = self.text(prompts)
            x0 = torch.stack([s["latents"] for s in samples]).to(self.device)  # (B, F, C, h, w)
            t = noise.dmd_timestep(cfg.flow.timestep_shift, 0.0, 1.0)  # (B,) in [0, 1000]
            loss = flow_matching_loss(in_dtype(self.engine, self.dtype), x0, t, noise.randn_like(x0),
                                      context.to(self.device, self.dtype))
            self.optimise(self.engine, loss, "teacher flow-matching", step)
            accumulate(out, {"loss/flow": loss.item(), "data/caption_dropout": sum(drop) / len(drop)}, accum)
        return self.finish_step(out, "teacher", step)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """The guided many-step sampler on the first training caption, with the current weights."""
        from sf.diffusion.sample import guided_net, sample_teacher
        from sf.models.text import encode_negative_prompt

        cfg = self.cfg
        sample = self.bank.samples[0]
        context, _ = self.text([sample["prompt"]])
        negative, _ = encode_negative_prompt(self.text, cfg.text.negative_prompt, 1)
        net = self.engine.module
        guided = guided_net(in_dtype(net, self.dtype), {"context": context.to(self.device, self.dtype)},
                            {"context": negative.to(self.device, self.dtype)}, cfg.distill.cfg_scale)
        noise = torch.randn((1, *sample["latents"].shape), generator=torch.Generator().manual_seed(cfg.seed))
        video = sample_teacher(guided, noise.to(self.device), num_steps=cfg.flow.sample_steps,
                               shift=cfg.flow.sample_shift).x0
        if self.dist.is_main:
            if not hasattr(self, "_decode"):
                self._decode = video_decoder(cfg, self.device)
            logger.log_video(step, "sample", self._decode(video[0]), caption=sample["prompt"])
