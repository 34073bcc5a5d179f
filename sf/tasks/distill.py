"""task=distill: self-forcing DMD (or SiD) distillation of the frozen teacher into a causal few-step generator.

Per iteration: `generator_step` every `task.gen_update_every` iterations (a rollout with grad at the exit step,
DMD through the guided teacher and the frozen critic), then `critic_step` (a fresh no-grad rollout, flow matching
of the critic on it). Every random draw comes from per-sample seeded streams (`sf.rng`).

`task.context` says what each chunk is generated from, i.e. what the KV cache holds:

    self_forcing       the student's own earlier outputs, exactly as at inference (data: prompts)
    teacher_forcing    the real clean earlier chunks (data: latent shards, the real videos of the captions)
    diffusion_forcing  the real earlier chunks, each noised independently to a random denoising step's level

The last two are the baselines the self-forcing paper compares against, trained by the same loop on equal
iterations and batch; only the rollout's context differs. Every `task.health.every` steps the job also checks
the student on fixed prompts (`sf.distill.health`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import ClassVar

import torch

from sf import distributed
from sf.diffusion.flow import dmd_timestep
from sf.distill.health import HealthConfig, critic_gap, latent_signals
from sf.distill.losses import critic_loss, dmd_loss, sid_loss, x0_predictor
from sf.distill.rollout import (
    RolloutConfig,
    diffusion_forcing_rollout,
    generate,
    self_forcing_rollout,
    teacher_forcing_rollout,
)
from sf.distributed import OptimizerConfig
from sf.logging import log
from sf.rng import SampleNoise, seed_for
from sf.schema import above, at_least, between, one_of
from sf.tasks.base import (
    EmaConfig,
    Job,
    accumulate,
    build_net,
    build_text_encoder,
    in_dtype,
    video_decoder,
)

CONTEXTS = ("self_forcing", "teacher_forcing", "diffusion_forcing")


@dataclass
class DistillOptim:
    """One AdamW per trained role (the Self-Forcing Wan-1.3B learning rates)."""

    generator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))
    critic: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=4e-7))


@dataclass
class DistillTask:
    """The objective, its schedule, the student's rollout and the optimizers of generator and critic."""

    needs_teacher: ClassVar[bool] = True
    name: str = "distill"
    objective: str = field(default="dmd", metadata=one_of("dmd", "sid"))
    # what the cache holds while a chunk is generated (module docstring); the forcing baselines read latent shards
    context: str = field(default="self_forcing", metadata=one_of(*CONTEXTS))
    cfg_scale: float = field(default=3.0, metadata=at_least(0))  # real = cond + cfg_scale * (cond - uncond)
    timestep_shift: float = field(default=5.0, metadata=above(0))
    min_timestep_ratio: float = field(default=0.02, metadata=between(0, 1))
    max_timestep_ratio: float = field(default=0.98, metadata=between(0, 1))
    timestep_from_exit: bool = False  # draw t only within the exit step's noise interval (reference's ts_schedule)
    gen_update_every: int = field(default=5, metadata=at_least(1))
    sid_alpha: float = 1.2
    latent_height: int = field(default=4, metadata=at_least(1))
    latent_width: int = field(default=4, metadata=at_least(1))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(decay=0.99, start_step=200))
    optim: DistillOptim = field(default_factory=DistillOptim)
    health: HealthConfig = field(default_factory=HealthConfig)


def build_networks(cfg, dtype: torch.dtype = torch.float32):
    """Teacher (frozen), generator and critic in `dtype`; the latter two start as the teacher (its weights and
    therefore its architecture, whatever `model.flavor` says) unless they have checkpoints of their own."""
    teacher = build_net(cfg.teacher, cfg.seed, dtype)
    generator = (build_net(cfg.model, cfg.seed + 1, dtype) if cfg.model.checkpoint
                 else build_net(cfg.teacher, cfg.seed, dtype))
    critic = build_net(cfg.teacher if cfg.critic.init_from_teacher else cfg.critic,
                       cfg.seed if cfg.critic.init_from_teacher else cfg.seed + 2, dtype)
    return teacher, generator, critic


def prepare_prompt_shards(spec: str, run_dir, rank: int) -> str:
    """A .txt prompt list becomes shards in run_dir/data/prompts (rank 0), recorded with what they were made from
    (`DONE`: the file's path, size and sha256); shard specs pass through.

    A rerun finds them made from the same file and reuses them. If the file changed since: before the run's first
    checkpoint the shards are rebuilt (a warning says so); after it, the run refuses to go on, because its saved
    data position refers to the old prompts. Every error names the user's file.
    """
    import json
    import shutil

    from sf.checkpoint import latest_checkpoint
    from sf.data.prompts import file_record, read_prompt_file, write_prompt_shards

    if not spec.endswith(".txt"):
        return spec
    out = Path(run_dir) / "data" / "prompts"
    problem = None
    if rank == 0:
        try:
            record = file_record(spec) if Path(spec).is_file() else None
            done = out / "DONE"
            made_from = _json_or_none(done.read_text()) if done.exists() else None
            resumed = latest_checkpoint(run_dir) is not None
            if made_from is not None and record is not None and made_from.get("sha256") == record["sha256"]:
                pass  # the shards of this very file
            elif done.exists() and made_from is None and resumed:
                pass  # made by an older sf, which kept no record: nothing to compare
            elif done.exists() and resumed:
                what = "changed" if record is not None else "is gone"
                raise ValueError(f"data.shards: {spec} {what} since this run made its prompt shards from it (see "
                                 f"{done}); restore it, or start a new run dir")
            else:
                if done.exists():
                    log.warning(f"warning: {spec} changed since its prompt shards were made: rebuilding them")
                prompts = read_prompt_file(spec)
                shutil.rmtree(out, ignore_errors=True)
                write_prompt_shards(prompts, str(out), samples_per_shard=max(1, len(prompts) // 8))
                (out / "DONE").write_text(json.dumps({**file_record(spec), "prompts": len(prompts)}) + "\n")
        except (ValueError, OSError) as e:
            problem = f"data.shards: {e}" if not str(e).startswith("data.shards") else str(e)
    problem = distributed.broadcast_object(problem)
    if problem:
        raise ValueError(problem)
    return str(out)


def _json_or_none(text: str):
    import json

    try:
        return json.loads(text)
    except ValueError:
        return None  # a marker written by an older sf: not a record


def exits_agree(exit_steps: torch.Tensor) -> float:
    """1.0 when every rank drew the same exit steps (they must: ZeRO and all-reduces need equal forwards)."""
    drawn = distributed.all_gather_object(exit_steps.tolist())
    return float(all(d == drawn[0] for d in drawn))


class DistillJob(Job):
    """Generator + critic roles against a frozen (possibly ZeRO-3 sharded) teacher; EMA of the generator."""

    networks, trained_sections, data_kind = ("teacher", "model", "critic"), ("model", "critic"), "prompts"

    @classmethod
    def data_for(cls, task) -> str:
        """Self forcing needs prompts only; the forcing baselines the real videos' latents."""
        return "prompts" if task.context == "self_forcing" else "latents"

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        task = self.task
        teacher, generator, critic = build_networks(cfg, self.dtype)
        self.generator = self.train_role(generator, "generator", cfg.model.gradient_checkpointing)
        self.critic = self.train_role(critic, "critic", cfg.critic.gradient_checkpointing)
        self.teacher = distributed.build_frozen(teacher, cfg.deepspeed, runtime.ds_config, self.device, self.dtype)
        self.frozen = {"teacher": self.teacher}
        self.make_ema(self.generator, task.ema)
        self.latent = (task.rollout.num_frames, generator.cfg.in_channels, task.latent_height, task.latent_width)

        self.stream = self.batches = None
        if task.context == "self_forcing":
            from sf.data.prompts import PromptDataConfig, PromptStream

            data_cfg = PromptDataConfig(**{**asdict(cfg.data), "seed": cfg.data.seed + cfg.seed,
                                           "shards": prepare_prompt_shards(cfg.data.shards, runtime.run_dir,
                                                                           self.dist.rank)})
            self.stream = PromptStream(data_cfg, self.dist.rank, self.dist.world_size)
        else:
            from sf.data.bank import SampleBank
            from sf.data.latents import decode_latent_sample

            self.bank = SampleBank(cfg.data.shards, decode_latent_sample, "latent samples")
            shapes = {tuple(sample["latents"].shape) for sample in self.bank.samples}  # preflight read one
            if shapes != {self.latent}:
                raise ValueError(f"data.shards: latents of {cfg.data.shards} are {sorted(shapes)}, the "
                                 f"{task.context} rollout needs {self.latent}")
        self.text = build_text_encoder(cfg, self.device, self.dtype)
        # what sample videos show: the prompt table's sample prompts (sf-embed), else the first prompt seen
        self.sample_prompts: list[str] = list(self.text.sample_prompts)
        self.health_prompts: dict | None = None  # the health check's batch, built at its first use

    @property
    def num_skipped(self):
        return self.stream.num_skipped if self.stream is not None else self.bank.num_skipped

    def state_dict(self):
        return {"data": self.stream.state_dict()} if self.stream is not None else {}  # a bank's order is the step's

    def load_state_dict(self, state):
        if self.stream is not None:
            self.stream.load_state_dict(state["data"])

    def next_batch(self, step: int, micro: int, role: str) -> dict:
        """The next prompts (self forcing: the stream's), or the real latents and captions of `role`'s micro-batch
        of `step` (the forcing baselines: a function of the step, so resume needs no data state)."""
        if self.stream is not None:
            if self.batches is None:
                self.batches = iter(self.stream)
            return next(self.batches)
        cfg, d = self.cfg, self.dist
        samples = self.bank.batch(seed_for(cfg.seed, "distill", role), step, micro, cfg.trainer.grad_accum_steps,
                                  d.rank, d.world_size, cfg.data.batch_size)
        return {"prompt": [s["prompt"] for s in samples], "latents": torch.stack([s["latents"] for s in samples])}

    def text_features(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Text features of a batch (`cond`) and of the negative prompt, encoded once (`uncond`), in the compute
        dtype."""
        from sf.data.prompts import prompt_features
        from sf.models.text import encode_negative_prompt

        if not self.sample_prompts:
            self.sample_prompts.append(batch["prompt"][0])
        cond, _ = prompt_features(self.text, batch)
        uncond, _ = encode_negative_prompt(self.text, self.cfg.text.negative_prompt, cond.shape[0])
        return cond.to(self.device, self.dtype), uncond.to(self.device, self.dtype)

    def roll_out(self, step: int, micro: int, role: str, cond: torch.Tensor, real: torch.Tensor | None = None):
        """A training rollout (`task.context`; `real`: the batch's latents for the forcing baselines) plus the
        DMD/critic timestep and noise, all from per-sample seeded streams.

        A sample's randomness depends on (seed, role, step, rank, its index in the step), not on how samples
        are grouped into micro-batches; exit steps come from one generator per (role, step), drawn on rank 0
        and broadcast so every rank runs the same forwards.
        """
        cfg, task, d = self.cfg, self.task, self.dist
        first = micro * cond.shape[0]
        noise = SampleNoise([seed_for(cfg.seed, role, step, d.rank, first + b) for b in range(cond.shape[0])],
                            device=self.device)
        exits = torch.Generator().manual_seed(seed_for(cfg.seed, role + "/exit", step))
        student, new_cache = self.generator, self.generator.module.new_cache
        options = {"rng": noise, "sync": distributed.broadcast_from_main, "exit_rng": exits}
        initial = noise.randn(self.latent, self.dtype)
        if task.context == "self_forcing":
            rollout = self_forcing_rollout(student, new_cache, initial, cond, task.rollout, **options)
        else:
            forcing = teacher_forcing_rollout if task.context == "teacher_forcing" else diffusion_forcing_rollout
            rollout = forcing(student, new_cache, real.to(self.device, self.dtype), initial, cond, task.rollout,
                              **options)
        span = (0.0, 1.0)
        if task.timestep_from_exit:  # only noise levels the exit step itself denoised (reference's ts_schedule)
            span = (rollout.denoised_to / 1000, rollout.denoised_from / 1000)
        t = dmd_timestep(noise.rand(), task.timestep_shift, task.min_timestep_ratio, task.max_timestep_ratio, *span)
        return rollout, t, noise.randn(self.latent, torch.float32)

    def step(self, step: int) -> dict:
        out = {}
        if step % self.task.gen_update_every == 0:
            out.update(self.generator_step(step))
        out.update(self.critic_step(step))
        return out

    def generator_step(self, step: int) -> dict:
        """A rollout with grad at the exit step, DMD (or SiD) loss through teacher and frozen critic."""
        cfg, task, out = self.cfg, self.task, {}
        for micro in range(cfg.trainer.grad_accum_steps):
            batch = self.next_batch(step, micro, "generator")
            cond, uncond = self.text_features(batch)
            rollout, t, eps = self.roll_out(step, micro, "generator", cond, batch.get("latents"))
            video = rollout.video.float()  # (B, F, C, H, W)
            real = x0_predictor(in_dtype(self.teacher, self.dtype), cond, task.cfg_scale, uncond)
            with self.critic.frozen() as critic:
                fake = x0_predictor(in_dtype(critic, self.dtype), cond)
                if task.objective == "sid":
                    loss, stats = sid_loss(video, real, fake, t, eps, alpha=task.sid_alpha)
                else:
                    loss, stats = dmd_loss(video, real, fake, t, eps)
            self.optimise(self.generator, loss, "generator", step)
            accumulate(out, {"loss/generator": loss.item(), **{f"dmd/{k}": float(v) for k, v in stats.items()},
                             "rollout/exit_step": float(rollout.exit_steps.float().mean()),
                             "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                       cfg.trainer.grad_accum_steps)
        return self.finish_update(out, self.generator, step)

    def critic_step(self, step: int) -> dict:
        """A fresh no-grad rollout; the critic learns the generator's distribution by flow matching."""
        cfg, out = self.cfg, {}
        for micro in range(cfg.trainer.grad_accum_steps):
            batch = self.next_batch(step, micro, "critic")
            cond, _ = self.text_features(batch)
            with torch.no_grad():
                rollout, t, eps = self.roll_out(step, micro, "critic", cond, batch.get("latents"))
            loss = critic_loss(lambda x, tt: in_dtype(self.critic, self.dtype)(x, tt, cond), rollout.video.float(),
                               t, eps)
            self.optimise(self.critic, loss, "critic", step)
            accumulate(out, {"loss/critic": loss.item(), "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                       cfg.trainer.grad_accum_steps)
        return self.finish_update(out, self.critic, step)

    def stream_videos(self, batch: dict, rollout: RolloutConfig, seed: int) -> torch.Tensor:
        """Latents (B, F, C, h, w) the current generator streams for a batch of prompts (with their cached
        features, if any) over its cache, all steps, from noise seeded by `seed` (every rank runs it: ZeRO-3
        forwards are collective)."""
        cond, _ = self.text_features(batch)
        noise = torch.stack([torch.randn((rollout.num_frames, *self.latent[1:]),
                                         generator=torch.Generator().manual_seed(seed_for(seed, "noise", i)))
                             for i in range(cond.shape[0])])
        student = self.generator.module
        return generate(student, student.new_cache, noise.to(self.device, self.dtype), cond, rollout,
                        rng=torch.Generator(device=self.device).manual_seed(seed_for(seed, "renoise")))

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """Stream a video of each sample prompt with the current generator."""
        if not self.sample_prompts:
            return
        for i, prompt in enumerate(self.sample_prompts):
            video = self.stream_videos({"prompt": [prompt]}, self.task.rollout, self.cfg.seed + i)
            if self.dist.is_main:
                logger.log_video(step, "sample" if i == 0 else f"sample_{i}", self.decode()(video[0]), caption=prompt)

    def decode(self):
        """latents (F, C, h, w) -> a video to look at (`video_decoder`), built once, on rank 0 only, without
        touching the global RNG (which every rank checkpoints: building a codec initialises layers from it)."""
        if not hasattr(self, "_decode"):
            with torch.random.fork_rng(devices=[]):
                self._decode = video_decoder(self.cfg, self.device)
        return self._decode

    @torch.no_grad()
    def periodic(self, step: int) -> dict:
        """Every `task.health.every` steps: the student's health on fixed prompts (`sf.distill.health`), the same
        on every rank."""
        health, task, cfg = self.task.health, self.task, self.cfg
        if not health.every or step % health.every:
            return {}
        batch = self._health_batch()
        long = replace(task.rollout, num_frames=task.rollout.num_frames * health.horizon_factor,
                       local_attn_frames=task.rollout.local_attn_frames or task.rollout.num_frames)
        latents = self.stream_videos(batch, long, seed_for(cfg.seed, "health"))  # (K, F', C, h, w)
        out = latent_signals(latents, task.rollout.num_frames, task.rollout.frames_per_block, health.static_threshold)
        cond, uncond = self.text_features(batch)
        with self.critic.frozen() as critic:
            out.update(critic_gap(x0_predictor(in_dtype(self.teacher, self.dtype), cond, task.cfg_scale, uncond),
                                  x0_predictor(in_dtype(critic, self.dtype), cond),
                                  latents[:, :task.rollout.num_frames].to(self.dtype), health.noise_levels,
                                  seed=seed_for(cfg.seed, "health/gap")))
        if health.world:
            out.update(self._world_terms(latents, batch["prompt"]))
        return {f"health/{k}": v for k, v in out.items()}

    def _health_batch(self) -> dict:
        """The fixed prompts of the health check, as a batch: the world's val captions; else the prompt table's
        sample prompts topped up by the data's first prompts (with their cached features). Every rank builds the
        same, and a resumed run the same as the uninterrupted one."""
        if self.health_prompts is None:
            count = self.task.health.num_prompts
            if self.task.health.world:
                from sf.world.health import health_captions

                self.health_prompts = {"prompt": health_captions(count)}
            else:
                from sf.data.prompts import prompt_features

                table = {"prompt": list(self.text.sample_prompts[:count])}
                parts = [b for b in (table, self._first_prompts(count - len(table["prompt"]))) if b["prompt"]]
                encoded = []
                for part in parts:  # the table's from the table, the data's from its own cache (or the encoder)
                    features, mask = prompt_features(self.text, part)
                    encoded.append({"prompt": part["prompt"], "features": features.cpu(), "mask": mask.cpu()})
                self.health_prompts = _concat_batches(encoded)
        return self.health_prompts

    def _first_prompts(self, count: int) -> dict:
        """The first `count` prompts of the data in its own order (with their cached features), read without
        moving the training stream (whose position is checkpointed); fewer when the data holds fewer."""
        if count <= 0:
            return {"prompt": []}
        if self.bank is not None:
            return {"prompt": [s["prompt"] for s in self.bank.samples[:count]]}
        from itertools import islice

        from sf.data.prompts import PromptStream

        batches, seen = [], 0
        for batch in islice(PromptStream(replace(self.stream.cfg, num_workers=0), rank=0, world_size=1), count):
            batches.append(batch)  # at least one prompt each
            seen += len(batch["prompt"])
            if seen >= count:
                break
        return _slice_batch(_concat_batches(batches), count)

    def _world_terms(self, latents: torch.Tensor, prompts: list[str]) -> dict:
        """The oracle's terms of the decoded health videos (rank 0 scores them, every rank gets the result)."""
        terms = None
        if self.dist.is_main:
            import numpy as np

            from sf.video import to_uint8
            from sf.world.health import oracle_terms

            videos = np.stack([to_uint8(self.decode()(video)) for video in latents])  # (K, T, H, W, 3)
            per_latent = (videos.shape[1] - 1) // (latents.shape[1] - 1)  # the codec's temporal compression
            terms = oracle_terms(videos, prompts, 1 + per_latent * (self.task.rollout.num_frames - 1))
        return distributed.broadcast_object(terms)


def _concat_batches(batches: list[dict]) -> dict:
    """Prompt batches joined; features kept only when every batch has them (of one length: fitted)."""
    out = {"prompt": [p for b in batches for p in b["prompt"]]}
    if batches and all("features" in b for b in batches):
        out["features"] = torch.cat([b["features"] for b in batches])
        out["mask"] = torch.cat([b["mask"] for b in batches])
    return out


def _slice_batch(batch: dict, count: int) -> dict:
    return {k: v[:count] for k, v in batch.items() if k in ("prompt", "features", "mask")}
