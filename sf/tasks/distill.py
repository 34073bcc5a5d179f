"""task=distill: self-forcing DMD (or SiD) distillation of the frozen teacher into a causal few-step generator.

Per iteration: `generator_step` every `distill.gen_update_every` iterations (a self-forcing rollout with grad at
the exit step, DMD through the guided teacher and the frozen critic), then `critic_step` (a fresh no-grad rollout,
flow matching of the critic on it). Every random draw comes from per-sample seeded streams (`sf.rng`).
"""

from __future__ import annotations

from dataclasses import asdict

import torch

from sf import distributed
from sf.distill.losses import critic_loss, dmd_loss, sid_loss, x0_predictor
from sf.distill.rollout import generate, self_forcing_rollout
from sf.rng import SampleNoise, seed_for
from sf.tasks.base import Job, accumulate, build_net, build_text_encoder, copy_weights, in_dtype, video_decoder


def build_networks(cfg):
    """Teacher (frozen), generator and critic; the latter two start from the teacher unless told otherwise."""
    teacher = build_net(cfg.teacher, cfg.seed)
    generator = build_net(cfg.model, cfg.seed + 1)
    if not cfg.model.checkpoint:
        copy_weights(generator, teacher, "the generator")
    critic = build_net(cfg.critic if not cfg.critic.init_from_teacher else cfg.teacher, cfg.seed + 2)
    if cfg.critic.init_from_teacher:
        copy_weights(critic, teacher, "the critic")
    critic.gradient_checkpointing = cfg.critic.gradient_checkpointing
    return teacher, generator, critic


def prepare_prompt_shards(spec: str, run_dir, rank: int) -> str:
    """A .txt prompt list becomes shards in run_dir/data/prompts once (rank 0); shard specs pass through."""
    from pathlib import Path

    from sf.data.prompts import write_prompt_shards

    if not spec.endswith(".txt"):
        return spec
    out = Path(run_dir) / "data" / "prompts"
    if rank == 0 and not (out / "DONE").exists():
        if not Path(spec).is_file():
            raise FileNotFoundError(f"data.shards: prompt file {spec} does not exist")
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        write_prompt_shards(prompts, str(out), samples_per_shard=max(1, len(prompts) // 8))
        (out / "DONE").write_text("")
    distributed.barrier()
    return str(out)


def exits_agree(exit_steps: torch.Tensor) -> float:
    """1.0 when every rank drew the same exit steps (they must: ZeRO and all-reduces need equal forwards)."""
    drawn = distributed.all_gather_object(exit_steps.tolist())
    return float(all(d == drawn[0] for d in drawn))


class DistillJob(Job):
    """Generator + critic engines against a frozen (possibly ZeRO-3 sharded) teacher; EMA of the generator."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        from sf.data.prompts import PromptDataConfig, PromptStream

        teacher, generator, critic = build_networks(cfg)
        self.configs = {"generator": generator.cfg, "critic": critic.cfg}
        self.gen = distributed.build_engine(generator, cfg.optim.generator, ctx.ds_config)
        self.critic = distributed.build_engine(critic, cfg.optim.critic, ctx.ds_config)
        self.engines = {"generator": self.gen, "critic": self.critic}
        self.teacher = distributed.build_frozen(teacher, cfg.deepspeed, ctx.ds_config, self.device, self.dtype)
        self.frozen = {"teacher": self.teacher}
        self.ema = distributed.EMA(self.gen.module, cfg.distill.ema_decay) if cfg.distill.ema_decay > 0 else None

        data_cfg = PromptDataConfig(**{**asdict(cfg.data), "seed": cfg.data.seed + cfg.seed,
                                       "shards": prepare_prompt_shards(cfg.data.shards, ctx.run_dir, self.dist.rank)})
        self.stream = PromptStream(data_cfg, self.dist.rank, self.dist.world_size)
        self.batches = None
        self.text = build_text_encoder(cfg, self.device)
        self.sample_prompts: list[str] = []  # the first prompt seen: what sample videos show
        self.latent = (cfg.rollout.num_frames, generator.cfg.in_channels, cfg.distill.latent_height,
                       cfg.distill.latent_width)

    def base_lr(self, name):
        return getattr(self.cfg.optim, name).lr

    def model_config(self, name):
        return self.configs["generator" if name == "generator_ema" else name]

    @property
    def num_skipped(self):
        return self.stream.num_skipped

    def state_dict(self):
        return {"data": self.stream.state_dict()}

    def load_state_dict(self, state):
        self.stream.load_state_dict(state["data"])

    def next_batch(self):
        if self.batches is None:
            self.batches = iter(self.stream)
        return next(self.batches)

    def context_for(self, batch):
        """Text features of a batch and of the negative prompt (encoded once), in the compute dtype."""
        from sf.models.text import encode_negative_prompt

        if not self.sample_prompts:
            self.sample_prompts.append(batch["prompt"][0])
        features, _ = self.text.encode_batch(batch)
        negative, _ = encode_negative_prompt(self.text, self.cfg.text.negative_prompt, features.shape[0])
        return features.to(self.device, self.dtype), negative.to(self.device, self.dtype)

    def roll_out(self, step: int, micro: int, role: str, ctx: torch.Tensor):
        """A self-forcing rollout plus the DMD/critic timestep and noise, all from per-sample seeded streams.

        A sample's randomness depends on (seed, role, step, rank, its index in the step), not on how samples
        are grouped into micro-batches; exit steps come from one generator per (role, step), drawn on rank 0
        and broadcast so every rank runs the same forwards.
        """
        cfg, d = self.cfg, self.dist
        first = micro * ctx.shape[0]
        noise = SampleNoise([seed_for(cfg.seed, role, step, d.rank, first + b) for b in range(ctx.shape[0])],
                            device=self.device)
        exits = torch.Generator().manual_seed(seed_for(cfg.seed, role + "/exit", step))
        rollout = self_forcing_rollout(
            self.gen, self.gen.module.new_cache, noise.randn(self.latent, self.dtype), ctx, cfg.rollout,
            generator=noise, sync=distributed.broadcast_from_main, exit_generator=exits,
        )
        span = (0.0, 1.0)
        if cfg.distill.timestep_from_exit:  # only noise levels the exit step itself denoised (reference's ts_schedule)
            span = (rollout.denoised_to / 1000, rollout.denoised_from / 1000)
        t = noise.dmd_timestep(cfg.distill.timestep_shift, cfg.distill.min_timestep_ratio,
                               cfg.distill.max_timestep_ratio, *span)
        return rollout, t, noise.randn(self.latent, torch.float32)

    def step(self, step: int) -> dict:
        out = {}
        if step % self.cfg.distill.gen_update_every == 0:
            out.update(self.generator_step(step))
            if self.ema is not None and step >= self.cfg.distill.ema_start_step:
                self.ema.update(0.0 if step == self.cfg.distill.ema_start_step else None)  # start = copy
        out.update(self.critic_step(step))
        return out

    def generator_step(self, step: int) -> dict:
        """Self-forcing rollout with grad at the exit step, DMD (or SiD) loss through teacher and frozen critic."""
        cfg, out = self.cfg, {}
        for micro in range(cfg.trainer.grad_accum_steps):
            ctx, neg = self.context_for(self.next_batch())
            rollout, t, eps = self.roll_out(step, micro, "generator", ctx)
            video = rollout.video.float()  # (B, F, C, H, W)
            real = x0_predictor(in_dtype(self.teacher, self.dtype), ctx, cfg.distill.cfg_scale, neg)
            with distributed.frozen(self.critic.module):
                fake = x0_predictor(in_dtype(self.critic.module, self.dtype), ctx)
                if cfg.distill.objective == "sid":
                    loss, stats = sid_loss(video, real, fake, t, eps, alpha=cfg.distill.sid_alpha)
                else:
                    loss, stats = dmd_loss(video, real, fake, t, eps)
            self.optimise(self.gen, loss, "generator", step)
            accumulate(out, {"loss/generator": loss.item(), **{f"dmd/{k}": float(v) for k, v in stats.items()},
                             "rollout/exit_step": float(rollout.exit_steps.float().mean()),
                             "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                       cfg.trainer.grad_accum_steps)
        out["grad_norm/generator"] = float(self.gen.get_global_grad_norm() or 0.0)
        return out

    def critic_step(self, step: int) -> dict:
        """A fresh no-grad rollout; the critic learns the generator's distribution by flow matching."""
        cfg, out = self.cfg, {}
        for micro in range(cfg.trainer.grad_accum_steps):
            ctx, _ = self.context_for(self.next_batch())
            with torch.no_grad():
                rollout, t, eps = self.roll_out(step, micro, "critic", ctx)
            loss = critic_loss(lambda x, tt: in_dtype(self.critic, self.dtype)(x, tt, ctx), rollout.video.float(),
                               t, eps)
            self.optimise(self.critic, loss, "critic", step)
            accumulate(out, {"loss/critic": loss.item(), "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                       cfg.trainer.grad_accum_steps)
        out["grad_norm/critic"] = float(self.critic.get_global_grad_norm() or 0.0)
        return out

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """Stream one video with the current generator (all ranks run it: ZeRO-3 forwards are collective)."""
        if not self.sample_prompts:
            return
        cfg = self.cfg
        prompt = self.sample_prompts[0]
        ctx, _ = self.context_for({"prompt": [prompt]})
        noise = torch.randn((1, *self.latent), generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float32)
        video = generate(self.gen.module, self.gen.module.new_cache, noise.to(self.device, self.dtype), ctx,
                         cfg.rollout, generator=torch.Generator(device=self.device).manual_seed(cfg.seed))
        if self.dist.is_main:
            if not hasattr(self, "_decode"):
                self._decode = video_decoder(cfg, self.device)
            logger.log_video(step, "sample", self._decode(video[0]), caption=prompt)
