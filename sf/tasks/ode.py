"""task=ode: the causal student's initialisation by regression onto teacher ODE trajectories (DESIGN.md 5).

1. Pairs: unless `ode.shards` names existing ones, rank 0 samples the guided teacher (`ode.num_steps` steps, shift
   `ode.shift`, CFG `ode.cfg_scale`) on the first `ode.num_pairs` captions of `data.shards` (a .txt file, or any
   shards with ``txt``) and keeps its latents at the student's sigmas (`rollout.denoising_steps`) in
   run_dir/data/ode (`sf.distill.ode_pairs`). A rerun finds them complete and skips this.
2. Regression: every chunk of every sample gets a random step of its trajectory; one block-causal forward of the
   student predicts x0 of all chunks; MSE to the trajectory's clean end (`ode_regression_loss`).
The student starts from the teacher's weights unless `model.checkpoint` is given. Exports ``generator`` and
``generator_ema``: the init that `task=distill` starts from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sf import distributed
from sf.data.bank import SampleBank
from sf.data.shards import iter_samples, list_shards
from sf.distill.losses import ode_regression_loss
from sf.distill.ode_pairs import decode_ode_sample, student_sigmas, write_ode_pairs
from sf.distill.rollout import generate
from sf.rng import seed_for
from sf.tasks.base import Job, accumulate, build_net, build_text_encoder, copy_weights, in_dtype, video_decoder


def read_captions(spec: str, limit: int) -> list[str]:
    """The first `limit` captions of a .txt file (one per line) or of shards with a ``txt`` member."""
    if spec.endswith(".txt"):
        if not Path(spec).is_file():
            raise FileNotFoundError(f"data.shards: prompt file {spec} does not exist")
        captions = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
    else:
        captions = []
        for raw in iter_samples(list_shards(spec)):
            if "txt" in raw:
                captions.append(bytes(raw["txt"]).decode("utf-8", errors="replace").strip())
            if len(captions) >= limit:
                break
    if not captions:
        raise ValueError(f"no captions in {spec!r}")
    return captions[:limit]


class OdeJob(Job):
    """One engine (`generator`), causal, regressed onto teacher trajectories; EMA exported as `generator_ema`."""

    def __init__(self, cfg, ctx):
        super().__init__(cfg, ctx)
        self.text = build_text_encoder(cfg, self.device)
        student = build_net(cfg.model, cfg.seed + 1)
        teacher = None
        if not cfg.model.checkpoint or not cfg.ode.shards:
            if cfg.teacher.checkpoint is None:
                raise ValueError("task=ode needs teacher.checkpoint (to sample pairs and to initialise the student)")
            teacher = build_net(cfg.teacher, cfg.seed)
        if not cfg.model.checkpoint:
            copy_weights(student, teacher, "the student")
        shards = cfg.ode.shards or self._write_pairs(teacher)
        del teacher
        self.net_cfg = student.cfg
        self.engine = distributed.build_engine(student, cfg.optim.generator, ctx.ds_config)
        self.engines = {"generator": self.engine}
        self.ema = distributed.EMA(self.engine.module, cfg.ode.ema_decay) if cfg.ode.ema_decay > 0 else None
        self.bank = SampleBank(shards, decode_ode_sample, "ODE pairs")
        self.num_skipped = self.bank.num_skipped
        expected = [round(float(s), 6) for s in student_sigmas(cfg.rollout.timesteps())]
        found = [round(float(s), 6) for s in self.bank.samples[0]["sigmas"]]
        if found != expected:
            raise ValueError(f"ODE pairs in {shards} hold sigmas {found}, the student's steps give {expected}")

    def _write_pairs(self, teacher) -> str:
        """Sample the teacher's trajectories into run_dir/data/ode once (rank 0); every rank returns the path."""
        cfg = self.cfg
        out = self.ctx.run_dir / "data" / "ode"
        if self.dist.is_main and not (out / "DONE").exists():
            captions = read_captions(cfg.data.shards, cfg.ode.num_pairs)
            shape = (cfg.rollout.num_frames, teacher.cfg.in_channels, cfg.distill.latent_height,
                     cfg.distill.latent_width)
            print(f"[sf] sampling {len(captions)} teacher trajectories ({cfg.ode.num_steps} steps) into {out}",
                  flush=True)
            write_ode_pairs(teacher.to(self.device).eval(), self.text, captions, str(out), latent_shape=shape,
                            student_timesteps=cfg.rollout.timesteps(), num_steps=cfg.ode.num_steps,
                            shift=cfg.ode.shift, cfg_scale=cfg.ode.cfg_scale, negative_prompt=cfg.text.negative_prompt,
                            batch_size=cfg.ode.batch_size, seed=cfg.seed, device=self.device)
            (out / "DONE").write_text(f"{len(captions)}\n")
        distributed.barrier()
        return str(out)

    def base_lr(self, name):
        return self.cfg.optim.generator.lr

    def model_config(self, name):
        return self.net_cfg

    def step(self, step: int) -> dict:
        cfg, d, out = self.cfg, self.dist, {}
        accum = cfg.trainer.grad_accum_steps
        for micro in range(accum):
            samples, _ = self.micro_batch(step, micro)
            context, _ = self.text([s["prompt"] for s in samples])
            trajectory = torch.stack([s["trajectory"] for s in samples]).to(self.device)  # (B, K, F, C, h, w)
            clean = torch.stack([s["clean"] for s in samples]).to(self.device)
            generator = torch.Generator().manual_seed(seed_for(cfg.seed, "ode", step, d.rank, micro))
            loss = ode_regression_loss(in_dtype(self.engine, self.dtype), trajectory, samples[0]["sigmas"], clean,
                                       context.to(self.device, self.dtype), cfg.rollout.causal, generator=generator)
            self.optimise(self.engine, loss, "ODE regression", step)
            accumulate(out, {"loss/ode": loss.item()}, accum)
        return self.finish_step(out, "generator", step)

    @torch.no_grad()
    def log_media(self, step: int, logger) -> None:
        """The student streaming the first pair's caption chunk by chunk."""
        cfg = self.cfg
        sample = self.bank.samples[0]
        context, _ = self.text([sample["prompt"]])
        noise = torch.randn((1, *sample["clean"].shape), generator=torch.Generator().manual_seed(cfg.seed))
        net = self.engine.module
        video = generate(net, net.new_cache, noise.to(self.device, self.dtype), context.to(self.device, self.dtype),
                         cfg.rollout, generator=torch.Generator(device=self.device).manual_seed(cfg.seed))
        if self.dist.is_main:
            if not hasattr(self, "_decode"):
                self._decode = video_decoder(cfg, self.device)
            logger.log_video(step, "sample", self._decode(video[0]), caption=sample["prompt"])

