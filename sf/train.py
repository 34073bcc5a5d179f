"""`sf-train`: the training runner; self-forcing DMD distillation by default, or another task (`task=`).

    python -m sf.train experiment=smoke                          # one process
    torchrun --nproc_per_node=2 -m sf.train experiment=smoke deepspeed=zero3 hydra.run.dir=runs/a

`train(cfg)` reads top to bottom in the order things happen: the task's roles and data (`sf.tasks`: distill,
teacher, ode, vae), resume, then the loop (the task's step, log, sample videos, checkpoint, preemption).
The distillation step itself is `sf.tasks.distill.DistillJob`: generator_step every `task.gen_update_every`
iterations, critic_step every iteration, EMA.
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

from sf import checkpoint as ckpt
from sf import distributed
from sf.config import TrainConfig, to_train_config
from sf.logging import make_logger
from sf.tasks import Runtime, make_job


def scheduled_lr(base_lr: float, step: int, warmup_steps: int, cooldown_steps: int = 0, max_steps: int = 0) -> float:
    """Warm-up, stable, decay: linear from 0 to base_lr over `warmup_steps` iterations, flat, then linear towards 0
    over the last `cooldown_steps` of `max_steps` (the last step at base_lr / cooldown_steps). A function of the
    step alone, so it resumes exactly, and a run extended before its cool-down matches one planned that long."""
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else base_lr
    if cooldown_steps > 0:
        lr *= min(1.0, (max_steps - step) / cooldown_steps)
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

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (all must checkpoint together)."""
        return distributed.any_rank(self.requested)


def train(cfg: TrainConfig, run_dir: str | Path, config_yaml: str = "") -> dict:
    """Run (or resume) the job of `cfg.task` in `run_dir`; returns the final metrics."""
    d = distributed.init_distributed(cfg.trainer.timeout_minutes)
    run_dir = Path(distributed.broadcast_object(str(run_dir)))
    dtype = _dtype(cfg.trainer.precision, d.device)
    preemption = Preemption()

    # -- the task: its roles (through the engine seam) and its data -------------------------------------------
    ds_config = distributed.engine_config(
        cfg.deepspeed, cfg.data.batch_size, cfg.trainer.grad_accum_steps, cfg.trainer.grad_clip, dtype == torch.bfloat16
    )
    job = make_job(cfg, Runtime(d, run_dir, dtype, ds_config))
    watched = {**job.frozen, **{name: role.module for name, role in job.roles.items()}}
    start_fingerprints = {name: fingerprint(module) for name, module in watched.items()}

    # -- resume --------------------------------------------------------------------------------------------
    start_step = 0
    latest = distributed.broadcast_object(str(ckpt.latest_checkpoint(run_dir) or ""))
    if latest:
        state = ckpt.load_checkpoint(Path(latest), roles=job.roles, ema=job.ema, rank=d.rank,
                                     world_size=d.world_size)
        start_step = state.pop("step")
        job.load_state_dict(state)
        if d.is_main:
            print(f"[sf] resumed from {latest} at step {start_step}", flush=True)
    logger = make_logger(cfg.logger, run_dir, d.rank, _plain(cfg), cfg.trainer.max_steps, start_step)

    def save(step: int) -> None:
        ckpt.save_checkpoint(
            run_dir, step, roles=job.roles, ema=job.ema, ema_name=job.ema_name, trainer_state=job.state_dict(),
            exporter=job.export, config_yaml=config_yaml, rank=d.rank, keep_last=cfg.trainer.keep_last,
            export=cfg.trainer.export_on_checkpoint,
        )

    # -- the loop ------------------------------------------------------------------------------------------
    metrics: dict = {}
    preempted = False
    samples_per_iteration = cfg.data.batch_size * cfg.trainer.grad_accum_steps * d.world_size
    for step in range(start_step, cfg.trainer.max_steps):
        start = time.perf_counter()
        metrics = {}
        for name, role in job.roles.items():
            metrics[f"lr/{name}"] = scheduled_lr(job.base_lr(name), step, cfg.trainer.warmup_steps,
                                                 cfg.trainer.cooldown_steps, cfg.trainer.max_steps)
            role.set_lr(metrics[f"lr/{name}"])
        metrics.update(job.step(step))
        metrics = distributed.mean_across_ranks(metrics)
        elapsed = time.perf_counter() - start
        metrics.update({"time/step_s": elapsed, "time/samples_per_s": samples_per_iteration / elapsed,
                        "data/skipped": float(job.num_skipped)})
        logger.log(step + 1, metrics)
        if cfg.logger.video_every > 0 and (step + 1) % cfg.logger.video_every == 0:  # every rank: ZeRO-3 gathers
            job.log_media(step + 1, logger)
        done = step + 1 == cfg.trainer.max_steps
        preempted = preemption.agreed()
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
    end_fingerprints = {name: fingerprint(module) for name, module in watched.items()}
    (run_dir / f"fingerprints_rank{d.rank}.json").write_text(
        json.dumps({"start": start_fingerprints, "end": end_fingerprints}, indent=1))
    logger.finish()
    distributed.shutdown()
    return metrics


def _dtype(precision: str, device) -> torch.dtype:
    if precision == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"trainer.precision must be auto, fp32 or bf16, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" else torch.float32


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


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

    from sf.config import register_configs, search_path_overrides, task_choices

    try:
        check_task_override(sys.argv[1:], task_choices())
        sys.argv += search_path_overrides()
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    register_configs()

    @hydra.main(version_base=None, config_path="pkg://sf.conf", config_name="config")
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


def check_task_override(argv: list[str], choices: list[str]) -> None:
    """A `task=<name>` on the command line must name a task (Hydra's own message spans a dozen lines)."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "task" and value and "," not in value and value not in choices:
            raise ValueError(f"unknown task {value!r}; the known tasks are {', '.join(choices)}")


if __name__ == "__main__":
    main()
