"""task=ode: the causal student's initialisation by regression onto teacher ODE trajectories.

1. Pairs: unless `task.shards` names existing ones, rank 0 samples the guided teacher (`task.num_steps` steps,
   shift `task.shift`, CFG `task.cfg_scale`) on the first `task.num_pairs` captions of `data.shards` (a .txt file,
   or any shards with ``txt``) and keeps its latents at the student's sigmas (`task.rollout.denoising_steps`) in
   run_dir/data/ode (`sf.distill.ode_pairs`). A rerun finds them complete and skips this.
2. Regression: every chunk of every sample gets a random step of its trajectory; one block-causal forward of the
   student predicts x0 of all chunks; MSE to the trajectory's clean end (`ode_regression_loss`).
The student starts from the teacher's weights unless `model.checkpoint` is given. Exports ``generator`` and
``generator_ema``: the init that `task=distill` starts from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional

import torch

from sf import distributed
from sf.data.bank import SampleBank
from sf.data.prompts import collate_prompts, decode_prompt, prompt_features, read_prompt_file
from sf.data.shards import CorruptSample, iter_samples, list_shards
from sf.distill.losses import ode_regression_loss
from sf.distill.ode_pairs import decode_ode_sample, student_sigmas, write_ode_pairs
from sf.distill.rollout import RolloutConfig, generate
from sf.distributed import OptimizerConfig
from sf.models.text import CachedTextEncoder
from sf.rng import seed_for
from sf.schema import above, at_least
from sf.tasks.base import EmaConfig, Job, accumulate, build_net, build_text_encoder, in_dtype, video_decoder


@dataclass
class OdeOptim:
    """The AdamW of the one trained role."""

    generator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))


@dataclass
class OdeTask:
    """Teacher trajectories at the student's sigmas (how many, how sampled), then causal regression onto them."""

    needs_teacher: ClassVar[bool] = True
    name: str = "ode"
    # prompts (the first of data.shards) sampled by the teacher into run_dir/data/ode
    num_pairs: int = field(default=256, metadata=at_least(1))
    num_steps: int = field(default=48, metadata=at_least(1))
    shift: float = field(default=8.0, metadata=above(0))
    cfg_scale: float = field(default=3.0, metadata=at_least(0))
    batch_size: int = field(default=16, metadata=at_least(1))  # prompts per teacher sampling batch
    shards: Optional[str] = None  # existing ode.safetensors shards: skip the sampling
    latent_height: int = field(default=4, metadata=at_least(1))
    latent_width: int = field(default=4, metadata=at_least(1))
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    ema: EmaConfig = field(default_factory=lambda: EmaConfig(decay=0.99))
    optim: OdeOptim = field(default_factory=OdeOptim)


def read_captions(spec: str, limit: int) -> list[dict]:
    """The first `limit` captions of a .txt file (one per line) or of shards with a ``txt`` member, as
    {"prompt"[, "features", "mask"]}: shards written by sf-embed carry their cached text features."""
    if spec.endswith(".txt"):
        captions = [{"prompt": prompt} for prompt in read_prompt_file(spec)]
    else:
        captions = []
        for raw in iter_samples(list_shards(spec)):
            try:
                caption = decode_prompt(raw)
            except CorruptSample:  # no caption, not utf-8 or bad features: not a pair to sample
                continue
            caption["prompt"] = caption["prompt"].strip()
            captions.append(caption)
            if len(captions) >= limit:
                break
    if not captions:
        raise ValueError(f"no captions in {spec!r}")
    return captions[:limit]


class OdeJob(Job):
    """One role (`generator`), causal, regressed onto teacher trajectories; EMA exported as `generator_ema`."""

    networks, trained_sections, data_kind = ("teacher", "model"), ("model",), "captions"

    def __init__(self, cfg, runtime):
        super().__init__(cfg, runtime)
        task = self.task
        self.text = build_text_encoder(cfg, self.device, self.dtype)
        # the student starts as the teacher (its weights and architecture) unless it has a checkpoint of its own
        student = (build_net(cfg.model, cfg.seed + 1, self.dtype) if cfg.model.checkpoint
                   else build_net(cfg.teacher, cfg.seed, self.dtype))
        teacher = build_net(cfg.teacher, cfg.seed, self.dtype) if not task.shards else None
        shards = task.shards or self._write_pairs(teacher)
        del teacher
        self.student = self.train_role(student, "generator", cfg.model.gradient_checkpointing)
        self.make_ema(self.student, task.ema)
        self.bank = SampleBank(shards, decode_ode_sample, "ODE pairs")
        expected = [round(float(s), 6) for s in student_sigmas(task.rollout.timesteps())]
        found = [round(float(s), 6) for s in self.bank.samples[0]["sigmas"]]
        if found != expected:
            raise ValueError(f"ODE pairs in {shards} hold sigmas {found}, the student's steps give {expected}")

    def _write_pairs(self, teacher) -> str:
        """Sample the teacher's trajectories into run_dir/data/ode once, every rank its share of the prompts
        (prompt i on rank i mod world size: the pairs do not depend on the split); every rank returns the path."""
        import shutil

        cfg, task, d = self.cfg, self.task, self.dist
        out = self.runtime.run_dir / "data" / "ode"
        if (out / "DONE").exists():
            return str(out)
        if d.is_main and out.exists():
            shutil.rmtree(out)  # shards of an unfinished sampling (maybe with another world size)
        distributed.barrier()
        captions = read_captions(cfg.data.shards, task.num_pairs)
        mine = list(range(d.rank, len(captions), d.world_size))
        shape = (task.rollout.num_frames, teacher.cfg.in_channels, task.latent_height, task.latent_width)
        if d.is_main:
            print(f"[sf] sampling {len(captions)} teacher trajectories ({task.num_steps} steps) into {out} "
                  f"on {d.world_size} rank(s)", flush=True)
        cached = {c["prompt"]: (c["features"], c["mask"]) for c in captions if "features" in c}
        text = CachedTextEncoder({**self.text.table, **cached}, fallback=self.text, max_length=self.text.max_length)
        if mine:
            write_ode_pairs(teacher.to(self.device).eval(), text, [captions[i]["prompt"] for i in mine], str(out),
                            latent_shape=shape, student_timesteps=task.rollout.timesteps(), num_steps=task.num_steps,
                            shift=task.shift, cfg_scale=task.cfg_scale, negative_prompt=cfg.text.negative_prompt,
                            batch_size=task.batch_size, seed=cfg.seed, device=self.device, prefix=f"ode-r{d.rank:03d}",
                            indices=mine, progress=d.is_main)
        distributed.barrier()
        if d.is_main:
            (out / "DONE").write_text(f"{len(captions)}\n")
        distributed.barrier()
        return str(out)

    def step(self, step: int) -> dict:
        cfg, d, out = self.cfg, self.dist, {}
        accum = cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, _ = self.micro_batch(step, micro)
            context, _ = prompt_features(self.text, collate_prompts(samples))  # the pairs' cached features
            trajectory = torch.stack([s["trajectory"] for s in samples]).to(self.device)  # (B, K, F, C, h, w)
            clean = torch.stack([s["clean"] for s in samples]).to(self.device)
            rng = torch.Generator().manual_seed(seed_for(cfg.seed, "ode", step, d.rank, micro))
            loss = ode_regression_loss(in_dtype(self.student, self.dtype), trajectory, samples[0]["sigmas"], clean,
                                       context.to(self.device, self.dtype), self.task.rollout.causal, rng=rng)
            self.optimise(self.student, loss, "ODE regression", step)
            accumulate(out, {"loss/ode": loss.item()}, accum)
        return self.finish_update(out, self.student, step)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """The student streaming the first pair's caption chunk by chunk."""
        cfg = self.cfg
        sample = self.bank.samples[0]
        context, _ = prompt_features(self.text, collate_prompts([sample]))
        noise = torch.randn((1, *sample["clean"].shape), generator=torch.Generator().manual_seed(cfg.seed))
        net = self.student.module
        video = generate(net, net.new_cache, noise.to(self.device, self.dtype), context.to(self.device, self.dtype),
                         self.task.rollout, rng=torch.Generator(device=self.device).manual_seed(cfg.seed))
        if self.dist.is_main:
            if not hasattr(self, "_decode"):
                self._decode = video_decoder(cfg, self.device)
            logger.log_video(step, "sample", self._decode(video[0]), caption=sample["prompt"])
