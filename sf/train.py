"""`sf-train`: self-forcing DMD distillation of a bidirectional teacher into a causal few-step student.

    python -m sf.train experiment=smoke                          # one process
    torchrun --nproc_per_node=2 -m sf.train experiment=smoke deepspeed=zero3 hydra.run.dir=runs/a

`train(cfg)` reads top to bottom in the order things happen: networks, engines, data, resume, then the loop
(generator_step every `gen_update_every` iterations, critic_step every iteration, EMA, log, checkpoint).
Rerunning the same command in the same run dir resumes from its last complete checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

import sf  # noqa: F401  (torchvision compatibility before open_clip / diffusers)
from sf import checkpoint as ckpt
from sf import distributed
from sf.config import RANDOM_INIT, NetConfig, TrainConfig, to_train_config
from sf.distill.losses import critic_loss, dmd_loss, sid_loss, x0_predictor
from sf.distill.rollout import generate, self_forcing_rollout
from sf.logging import make_logger
from sf.models.convert import check_state_dict, load_dit
from sf.models.dit import VideoDiT, dit_config
from sf.rng import SampleNoise, seed_for


def build_net(net: NetConfig, seed: int) -> VideoDiT:
    """A VideoDiT from its config: weights from `checkpoint`, or seeded random init (identical on every rank)."""
    if net.checkpoint and net.checkpoint != RANDOM_INIT:
        model = load_dit(net.checkpoint)
    else:
        torch.manual_seed(seed)
        model = VideoDiT(dit_config(net.flavor, **net.overrides))
    model.gradient_checkpointing = net.gradient_checkpointing
    return model


def copy_weights(dst: VideoDiT, src: VideoDiT, what: str) -> VideoDiT:
    """dst <- src's weights (same architecture required; the error lists every difference)."""
    state = src.state_dict()
    check_state_dict(dst, state, f"initialising {what} from the teacher")
    dst.load_state_dict(state)
    return dst


def build_networks(cfg: TrainConfig) -> tuple[VideoDiT, VideoDiT, VideoDiT]:
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


def build_text_encoder(cfg: TrainConfig, device):
    from sf.models.text import CachedTextEncoder, OpenCLIPTextEncoder

    torch.manual_seed(cfg.seed + 3)  # a random-init tower must be the same on every rank
    tower = OpenCLIPTextEncoder(cfg.text.model_name, cfg.text.pretrained, cfg.text.max_length, device=device)
    return CachedTextEncoder(fallback=tower, max_length=cfg.text.max_length)


def prepare_prompt_shards(cfg: TrainConfig, run_dir: Path, rank: int) -> str:
    """`data.shards` as shards: a .txt prompt list is written into run_dir/data once (rank 0)."""
    from sf.data.prompts import write_prompt_shards

    spec = cfg.data.shards
    if not spec.endswith(".txt"):
        return spec
    out = run_dir / "data" / "prompts"
    if rank == 0 and not (out / "DONE").exists():
        if not Path(spec).is_file():
            raise FileNotFoundError(f"data.shards: prompt file {spec} does not exist")
        prompts = [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]
        write_prompt_shards(prompts, str(out), samples_per_shard=max(1, len(prompts) // 8))
        (out / "DONE").write_text("")
    distributed.barrier()
    return str(out)


def in_dtype(net, dtype: torch.dtype):
    """The network called in its compute dtype (bf16 on GPU), answering in fp32 for the losses."""
    return lambda x, t, context, **kw: net(x.to(dtype), t, context, **kw).float()


def set_lr(engine, base_lr: float, step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to base_lr over `warmup_steps` iterations (stateless: resumes exactly)."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    for group in engine.optimizer.param_groups:
        group["lr"] = lr
    return lr


def fingerprint(module: torch.nn.Module) -> str:
    """Hash of the gathered weights (collective under ZeRO-3): equal on all ranks iff the weights are."""
    digest = hashlib.sha256()
    for name, p in module.named_parameters():
        with distributed.gathered([p]):
            digest.update(name.encode())
            digest.update(p.detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


class Preemption:
    """SIGTERM/SIGUSR1 (slurm before the time limit, `scontrol requeue`) -> checkpoint at the step's end, exit."""

    def __init__(self):
        self.requested = False
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (all must checkpoint together)."""
        flag = torch.tensor([float(self.requested)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def exits_agree(exit_steps: torch.Tensor) -> float:
    """1.0 when every rank drew the same exit steps (they must: ZeRO and all-reduces need equal forwards)."""
    drawn = distributed.all_gather_object(exit_steps.tolist())
    return float(all(d == drawn[0] for d in drawn))


def check_finite(loss: torch.Tensor, what: str, step: int, device) -> None:
    """Stop every rank before a non-finite loss reaches the weights (the last checkpoint stays good)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=device)
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item():
        raise FloatingPointError(
            f"non-finite {what} loss at step {step} (on some rank); weights not updated, "
            f"resume from the last checkpoint (rerun the command), e.g. with a lower learning rate"
        )


def train(cfg: TrainConfig, run_dir: str | Path, config_yaml: str = "") -> dict:
    """Run (or resume) a self-forcing distillation job in `run_dir`; returns the final metrics."""
    d = distributed.init_distributed(cfg.trainer.timeout_minutes)
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    dtype = _dtype(cfg.trainer.precision, d.device)
    preemption = Preemption()

    # -- networks and engines ----------------------------------------------------------------------------
    teacher, generator, critic = build_networks(cfg)
    model_configs = {"generator": generator.cfg, "critic": critic.cfg}
    ds_config = distributed.engine_config(
        cfg.deepspeed, cfg.data.batch_size, cfg.trainer.grad_accum_steps, cfg.optim.grad_clip, dtype == torch.bfloat16
    )
    gen_engine = distributed.build_engine(generator, cfg.optim.generator, ds_config)
    critic_engine = distributed.build_engine(critic, cfg.optim.critic, ds_config)
    teacher = distributed.build_frozen(teacher, cfg.deepspeed, ds_config, d.device, dtype)
    ema = distributed.EMA(gen_engine.module, cfg.distill.ema_decay) if cfg.distill.ema_decay > 0 else None
    start_fingerprints = {"teacher": fingerprint(teacher), "generator": fingerprint(gen_engine.module),
                          "critic": fingerprint(critic_engine.module)}

    # -- data and text -----------------------------------------------------------------------------------
    from sf.data.prompts import PromptDataConfig, PromptStream
    from sf.models.text import encode_negative_prompt

    data_cfg = PromptDataConfig(**{**asdict(cfg.data), "shards": prepare_prompt_shards(cfg, run_dir, d.rank),
                                   "seed": cfg.data.seed + cfg.seed})
    stream = PromptStream(data_cfg, d.rank, d.world_size)
    text = build_text_encoder(cfg, d.device)

    # -- resume --------------------------------------------------------------------------------------------
    start_step = 0
    latest = distributed.broadcast_object(str(ckpt.latest_checkpoint(run_dir) or ""))
    if latest:
        state = ckpt.load_checkpoint(Path(latest), engines={"generator": gen_engine, "critic": critic_engine},
                                     ema=ema, rank=d.rank, world_size=d.world_size)
        start_step = state["step"]
        stream.load_state_dict(state["data"])
        if d.is_main:
            print(f"[sf] resumed from {latest} at step {start_step}", flush=True)
    logger = make_logger(cfg.logger, run_dir, d.rank, _plain(cfg), cfg.trainer.max_steps, start_step)
    batches = iter(stream)

    sample_prompts: list[str] = []  # the first prompt seen: what sample videos show

    def context_for(batch):
        """Text features of a batch and of the negative prompt (encoded once), in the compute dtype."""
        if not sample_prompts:
            sample_prompts.append(batch["prompt"][0])
        features, _ = text.encode_batch(batch)
        negative, _ = encode_negative_prompt(text, cfg.text.negative_prompt, features.shape[0])
        return features.to(d.device, dtype), negative.to(d.device, dtype)

    latent = (cfg.rollout.num_frames, generator.cfg.in_channels, cfg.distill.latent_height, cfg.distill.latent_width)

    def roll_out(step: int, micro: int, role: str, ctx: torch.Tensor):
        """A self-forcing rollout plus the DMD/critic timestep and noise, all from per-sample seeded streams.

        A sample's randomness depends on (seed, role, step, rank, its index in the step), not on how samples
        are grouped into micro-batches; exit steps come from one generator per (role, step), drawn on rank 0
        and broadcast so every rank runs the same forwards.
        """
        first = micro * ctx.shape[0]
        noise = SampleNoise([seed_for(cfg.seed, role, step, d.rank, first + b) for b in range(ctx.shape[0])],
                            device=d.device)
        exits = torch.Generator().manual_seed(seed_for(cfg.seed, role + "/exit", step))
        rollout = self_forcing_rollout(
            gen_engine, gen_engine.module.new_cache, noise.randn(latent, dtype), ctx, cfg.rollout,
            generator=noise, sync=distributed.broadcast_from_main, exit_generator=exits,
        )
        span = (0.0, 1.0)
        if cfg.distill.timestep_from_exit:  # only noise levels the exit step itself denoised (reference's ts_schedule)
            span = (rollout.denoised_to / 1000, rollout.denoised_from / 1000)
        t = noise.dmd_timestep(cfg.distill.timestep_shift, cfg.distill.min_timestep_ratio,
                               cfg.distill.max_timestep_ratio, *span)
        return rollout, t, noise.randn(latent, torch.float32)

    def generator_step(step: int) -> dict:
        """Self-forcing rollout with grad at the exit step, DMD (or SiD) loss through teacher and frozen critic."""
        out = {}
        for micro in range(cfg.trainer.grad_accum_steps):
            ctx, neg = context_for(next(batches))
            rollout, t, eps = roll_out(step, micro, "generator", ctx)
            video = rollout.video.float()  # (B, F, C, H, W)
            real = x0_predictor(in_dtype(teacher, dtype), ctx, cfg.distill.cfg_scale, neg)
            with distributed.frozen(critic_engine.module):
                fake = x0_predictor(in_dtype(critic_engine.module, dtype), ctx)
                if cfg.distill.objective == "sid":
                    loss, stats = sid_loss(video, real, fake, t, eps, alpha=cfg.distill.sid_alpha)
                else:
                    loss, stats = dmd_loss(video, real, fake, t, eps)
            check_finite(loss, "generator", step, d.device)
            gen_engine.backward(loss)
            gen_engine.step()
            _accumulate(out, {"loss/generator": loss.item(), **{f"dmd/{k}": float(v) for k, v in stats.items()},
                              "rollout/exit_step": float(rollout.exit_steps.float().mean()),
                              "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                        cfg.trainer.grad_accum_steps)
        out["grad_norm/generator"] = float(gen_engine.get_global_grad_norm() or 0.0)
        return out

    def critic_step(step: int) -> dict:
        """A fresh no-grad rollout; the critic learns the generator's distribution by flow matching."""
        out = {}
        for micro in range(cfg.trainer.grad_accum_steps):
            ctx, _ = context_for(next(batches))
            with torch.no_grad():
                rollout, t, eps = roll_out(step, micro, "critic", ctx)
            loss = critic_loss(lambda x, tt: in_dtype(critic_engine, dtype)(x, tt, ctx), rollout.video.float(), t, eps)
            check_finite(loss, "critic", step, d.device)
            critic_engine.backward(loss)
            critic_engine.step()
            _accumulate(out, {"loss/critic": loss.item(), "rollout/exit_steps_agree": exits_agree(rollout.exit_steps)},
                        cfg.trainer.grad_accum_steps)
        out["grad_norm/critic"] = float(critic_engine.get_global_grad_norm() or 0.0)
        return out

    def save(step: int) -> None:
        ckpt.save_checkpoint(
            run_dir, step, engines={"generator": gen_engine, "critic": critic_engine}, ema=ema,
            trainer_state={"data": stream.state_dict()}, model_configs=model_configs, config_yaml=config_yaml,
            rank=d.rank, keep_last=cfg.trainer.keep_last, export=cfg.trainer.export_on_checkpoint,
        )

    # -- the loop ------------------------------------------------------------------------------------------
    metrics: dict = {}
    preempted = False
    samples_per_iteration = cfg.data.batch_size * cfg.trainer.grad_accum_steps * d.world_size
    for step in range(start_step, cfg.trainer.max_steps):
        start = time.perf_counter()
        metrics = {
            "lr/generator": set_lr(gen_engine, cfg.optim.generator.lr, step, cfg.optim.warmup_steps),
            "lr/critic": set_lr(critic_engine, cfg.optim.critic.lr, step, cfg.optim.warmup_steps),
        }
        if step % cfg.distill.gen_update_every == 0:
            metrics.update(generator_step(step))
            if ema is not None and step >= cfg.distill.ema_start_step:
                ema.update(0.0 if step == cfg.distill.ema_start_step else None)  # start = copy of the weights
        metrics.update(critic_step(step))
        metrics = distributed.mean_across_ranks(metrics, d.device)
        elapsed = time.perf_counter() - start
        metrics.update({"time/step_s": elapsed, "time/samples_per_s": samples_per_iteration / elapsed,
                        "data/skipped": float(stream.num_skipped)})
        logger.log(step + 1, metrics)
        if cfg.logger.video_every > 0 and (step + 1) % cfg.logger.video_every == 0:  # every rank: ZeRO-3 gathers
            _log_sample(logger, step + 1, gen_engine, sample_prompts[0], context_for, cfg, latent, dtype, d)
        done = step + 1 == cfg.trainer.max_steps
        preempted = preemption.agreed(d.device)
        if done or preempted or (step + 1) % cfg.trainer.checkpoint_every == 0:
            save(step + 1)
        if preempted:
            if d.is_main:  # launch/slurm/train.sbatch requeues the job when it finds this marker
                (run_dir / "PREEMPTED").write_text(f"{step + 1}\n")
                print(f"[sf] preempted: checkpoint saved at step {step + 1}, exiting for requeue", flush=True)
            break

    if preempted and "SUBMITIT_EXECUTOR" in os.environ:
        # A submitit job that returns is "done", and the sweep would end before its requeued run; leave without a
        # result so the launcher waits for the requeued job, which resumes from the checkpoint just written.
        logger.finish()
        distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    end_fingerprints = {"teacher": fingerprint(teacher), "generator": fingerprint(gen_engine.module),
                        "critic": fingerprint(critic_engine.module)}
    (run_dir / f"fingerprints_rank{d.rank}.json").write_text(
        json.dumps({"start": start_fingerprints, "end": end_fingerprints}, indent=1))
    logger.finish()
    distributed.shutdown()
    return metrics


def _accumulate(out: dict, values: dict, num_micro: int) -> None:
    for k, v in values.items():
        out[k] = out.get(k, 0.0) + float(v) / num_micro


def _dtype(precision: str, device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


@torch.no_grad()
def _log_sample(logger, step, gen_engine, prompt, context_for, cfg, latent, dtype, d) -> None:
    """Stream one video with the current generator (all ranks run it: ZeRO-3 forwards are collective)."""
    from sf.video import latent_preview

    ctx, _ = context_for({"prompt": [prompt]})
    noise = torch.randn((1, *latent), generator=torch.Generator().manual_seed(cfg.seed), dtype=torch.float32)
    video = generate(gen_engine.module, gen_engine.module.new_cache, noise.to(d.device, dtype), ctx, cfg.rollout,
                     generator=torch.Generator(device=d.device).manual_seed(cfg.seed))
    if d.is_main:
        logger.log_video(step, "sample", latent_preview(video[0].float().cpu()), caption=prompt)


def name_wandb_run(cfg: TrainConfig, hydra_cfg) -> None:
    """Dashboard identity: group by experiment (and sweep), tags from the overrides, name from the run dir."""
    from hydra.types import RunMode

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.logger.group is None:
        cfg.logger.group = f"{cfg.name}/{Path(hydra_cfg.sweep.dir).name}" if sweep else cfg.name
    if not cfg.logger.tags:  # wandb tags are at most 64 characters
        cfg.logger.tags = [o[:64] for o in hydra_cfg.overrides.task if not o.startswith(("hydra.", "logger."))]
    if cfg.logger.name is None:
        run_dir = Path(hydra_cfg.runtime.output_dir)
        cfg.logger.name = f"{cfg.name}/{run_dir.parent.name}/{run_dir.name}" if sweep else f"{cfg.name}/{run_dir.name}"


def main() -> None:
    """Hydra entry point (`sf-train`, `python -m sf.train`)."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    conf_dir = os.environ.get("SF_CONF_DIR", str(Path(__file__).resolve().parents[1] / "conf"))

    @hydra.main(version_base=None, config_path=conf_dir, config_name="config")
    def _run(dict_cfg) -> None:
        try:
            cfg = to_train_config(dict_cfg)
        except Exception as e:  # omegaconf's missing-value / validation errors: one line, naming the key
            print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        hydra_cfg = HydraConfig.get()
        name_wandb_run(cfg, hydra_cfg)
        try:
            train(cfg, hydra_cfg.runtime.output_dir, OmegaConf.to_yaml(dict_cfg, resolve=True))
        except (ValueError, FileNotFoundError, FloatingPointError) as e:  # bad input: one line, no traceback
            print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
            sys.exit(1)

    _run()


if __name__ == "__main__":
    main()
