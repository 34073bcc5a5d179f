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

from safetensors import SafetensorError

from sf import checkpoint as ckpt
from sf import distributed
from sf.config import TrainConfig, config_to_yaml, to_train_config
from sf.io import exit_with_error
from sf.logging import log, make_logger, setup_log
from sf.rundir import RunDirBusy, RunDirLock, die_with_launcher
from sf.tasks import TASKS, Runtime, make_job
from sf.tasks.base import compute_dtype
from sf.tasks.preflight import parameter_count, preflight, resolve


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


class Interrupts:
    """SIGTERM, SIGUSR1, SIGUSR2 (slurm and submitit before a time limit, `scontrol requeue`, preemption), SIGINT
    (Ctrl-C) and SIGHUP (the launcher died, `sf.rundir.die_with_launcher`) -> a checkpoint at the end of the
    current step, then a clean exit; a second Ctrl-C exits at once.

    A handler that was installed before ours (submitit's, which requeues the job on SIGUSR2) is not lost: `chain`
    calls it once the checkpoint is written.
    """

    PREEMPTION = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.received: list[int] = []
        self.previous = {}
        for sig in (*self.PREEMPTION, signal.SIGINT, signal.SIGHUP):
            self.previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        speak = distributed.launch_rank() == 0  # one line per job, not per rank
        if signum == signal.SIGINT and signal.SIGINT in self.received:
            os.write(2, b"[sf] interrupted again: exiting now, without a checkpoint of this step\n")
            os._exit(130)
        if signum == signal.SIGINT and speak:
            os.write(2, b"[sf] interrupted: saving a checkpoint at the end of this step, then exiting "
                        b"(Ctrl-C again to exit at once)\n")
        if signum == signal.SIGHUP and speak:
            os.write(2, b"[sf] the launcher is gone: saving a checkpoint at the end of this step, then exiting\n")
        self.received.append(signum)

    @property
    def preempted(self) -> bool:
        """A preemption signal (not only Ctrl-C) arrived: the job is to be requeued."""
        return any(sig in self.PREEMPTION for sig in self.received)

    def agreed(self) -> bool:
        """True on every rank when any rank was signalled (all must checkpoint together)."""
        return distributed.any_rank(bool(self.received))

    def chain(self) -> None:
        """Run the handlers ours replaced for the signals received (e.g. submitit's requeue on SIGUSR2)."""
        for sig in dict.fromkeys(self.received):
            handler = self.previous.get(sig)
            if callable(handler):
                handler(sig, None)


def own_run_dir(run_dir: Path) -> RunDirLock | None:
    """Rank 0 takes the run dir's lock for the life of the job, before anything heavy starts; RunDirBusy (naming
    the holder) or PermissionError (naming the dir) when it cannot. The other ranks are stopped by their launcher
    when rank 0 exits."""
    if distributed.launch_rank() != 0:
        return None
    lock = RunDirLock(run_dir)
    try:
        lock.acquire()
    except RunDirBusy:
        raise
    except OSError as e:
        raise PermissionError(f"run dir {run_dir} is not writable ({e.strerror or e})") from None
    return lock


def resume_hint(run_dir: Path) -> str:
    """What a rerun of the same command will start from."""
    latest = ckpt.latest_checkpoint(run_dir)
    start = f"resumes from {latest.name}" if latest else "starts from step 0 (no checkpoint yet)"
    return f"rerunning the command {start}; lower the learning rate (or raise trainer.warmup_steps) first"


def train(cfg: TrainConfig, run_dir: str | Path) -> dict:
    """Run (or resume) the job of `cfg.task` in `run_dir`; returns the final metrics."""
    cfg = resolve(cfg)  # the text encoder and codec a Wan teacher directory brings, unless others are named
    if cfg.trainer.dry_run:
        return dry_run(cfg)
    lock = own_run_dir(Path(run_dir))
    try:
        d = distributed.init_distributed(cfg.trainer.timeout_minutes)
        run_dir = Path(distributed.broadcast_object(str(run_dir)))  # rank 0's (a default dir holds a time)
        setup_log(run_dir, d.rank)
        return _train(cfg, run_dir, d)
    finally:
        if lock is not None:
            lock.release()


def check_inputs(cfg: TrainConfig, world_size: int):
    """The task's preflight (`sf.tasks.preflight`): paths, architectures, text width, shards; no weights loaded."""
    from sf.logging import wandb_login_problem

    job_class = TASKS[cfg.task.name][1]
    plan = preflight(cfg, world_size, job_class.networks, job_class.data_for(cfg.task))
    problem = wandb_login_problem(cfg.logger)
    if problem is not None:
        raise ValueError(problem)
    return plan


def dry_run(cfg: TrainConfig) -> dict:
    """What the run would do, checked as far as it can be without loading weights; nothing is written."""
    world = int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1")))
    plan = check_inputs(cfg, world)
    if distributed.launch_rank() == 0:
        estimate = memory_lines(cfg, plan, world)
        print("\n".join([f"[sf] dry run of task={cfg.task.name} on {world} rank(s): nothing is loaded or written",
                         *(f"[sf]   {line}" for line in plan.lines + estimate),
                         f"[sf] the run would train {cfg.trainer.max_steps} steps; remove trainer.dry_run to start"]),
              flush=True)
    return {}


def memory_lines(cfg: TrainConfig, plan, world: int) -> list[str]:
    """DeepSpeed's estimate of each network's model states per rank (weights, gradients, optimizer states)."""
    job_class = TASKS[cfg.task.name][1]
    lines = []
    for section, arch in plan.architectures.items():
        trained = section in job_class.trained_sections
        per_rank = distributed.model_state_bytes(parameter_count(arch), cfg.deepspeed.stage, world, trained,
                                                 offload=cfg.deepspeed.offload_optimizer)
        size = f"{per_rank / 2**30:.2f} GiB" if per_rank >= 2**30 else f"{per_rank / 2**20:.1f} MiB"
        lines.append(f"memory: {section} ({'trained' if trained else 'frozen'}) ~{size} of model states per rank "
                     f"at ZeRO-{cfg.deepspeed.stage} (DeepSpeed's estimate; activations extra)")
    return lines


def _train(cfg: TrainConfig, run_dir: Path, d) -> dict:
    dtype = compute_dtype(cfg.trainer.precision, d.device)
    interrupts = Interrupts()
    config_yaml = config_to_yaml(cfg)  # resolved: it records which text encoder and codec were used

    # -- everything that can be checked before weights load ------------------------------------------------
    problem, lines = None, []
    if d.is_main:
        try:
            plan = check_inputs(cfg, d.world_size)
            lines = plan.lines + memory_lines(cfg, plan, d.world_size)
        except (ValueError, OSError) as e:
            problem = e
    problem, lines = distributed.broadcast_object((problem, lines))
    if problem is not None:
        raise problem
    for line in lines:
        log.info(line)

    # -- the task: its roles (through the engine seam) and its data -------------------------------------------
    ds_config = distributed.engine_config(
        cfg.deepspeed, cfg.data.batch_size, cfg.trainer.grad_accum_steps, cfg.trainer.grad_clip, dtype == torch.bfloat16
    )
    job = make_job(cfg, Runtime(d, run_dir, dtype, ds_config))
    watched = {**job.frozen, **{name: role.module for name, role in job.roles.items()}}
    start_fingerprints = {name: fingerprint(module) for name, module in watched.items()}

    # -- resume from the newest intact checkpoint --------------------------------------------------------------
    start_step = 0
    latest = ckpt.resume_point(run_dir, d.rank, warn=lambda message: log.warning(f"warning: {message}"))
    if latest is not None:
        state = ckpt.load_checkpoint(latest, roles=job.roles, ema=job.ema, rank=d.rank, world_size=d.world_size,
                                     architectures=job.architectures())
        start_step = state.pop("step")
        job.load_state_dict(state)
        log.info(f"resumed from {latest} at step {start_step}")
    logger = make_logger(cfg.logger, run_dir, d.rank, _plain(cfg), cfg.trainer.max_steps, start_step)

    def save(step: int) -> None:
        try:
            ckpt.save_checkpoint(
                run_dir, step, roles=job.roles, ema=job.ema, ema_name=job.ema_name, trainer_state=job.state_dict(),
                exporter=job.export, config_yaml=config_yaml, rank=d.rank, keep_last=cfg.trainer.keep_last,
                export=cfg.trainer.export_on_checkpoint, architectures=job.architectures(),
            )
        except (OSError, RuntimeError, SafetensorError) as e:  # a full disk, a quota, a vanished mount
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            latest = ckpt.latest_checkpoint(run_dir)
            kept = f"{latest.name} is intact" if latest else "no earlier checkpoint exists"
            raise OSError(f"could not write checkpoint step_{step:06d} under {run_dir / 'checkpoints'} ({reason}); "
                          f"{kept}: free space (df -h {run_dir}) and rerun the command") from None

    # -- the loop ------------------------------------------------------------------------------------------
    metrics: dict = {}
    stopped = False
    samples_per_iteration = cfg.data.batch_size * cfg.trainer.grad_accum_steps * d.world_size
    for step in range(start_step, cfg.trainer.max_steps):
        start = time.perf_counter()
        metrics, job.updated = {}, []
        for name, role in job.roles.items():
            metrics[f"lr/{name}"] = scheduled_lr(job.base_lr(name), step, cfg.trainer.warmup_steps,
                                                 cfg.trainer.cooldown_steps, cfg.trainer.max_steps)
            role.set_lr(metrics[f"lr/{name}"])
        try:
            metrics.update(job.step(step))
        except FloatingPointError as e:
            raise FloatingPointError(f"{e}; {resume_hint(run_dir)}") from None
        broken = [name for name, role in job.roles.items() if role.nonfinite()]
        broken += [job.ema_name] if job.ema is not None and job.ema.nonfinite() else []
        if broken:  # never checkpoint them: the last checkpoint stays the one to resume from
            raise FloatingPointError(
                f"non-finite weights in {', '.join(broken)} after the updates of step {step + 1} (updated: "
                f"{', '.join(job.updated) or 'none'}); nothing of this step is saved; {resume_hint(run_dir)}")
        metrics = distributed.mean_across_ranks(metrics)
        elapsed = time.perf_counter() - start
        metrics.update({"time/step_s": elapsed, "time/samples_per_s": samples_per_iteration / elapsed,
                        "data/skipped": float(job.num_skipped)})
        checked = job.periodic(step + 1)  # health checks: not part of the step's time
        if checked:
            metrics.update({**checked, "time/health_s": time.perf_counter() - start - elapsed})
        logger.log(step + 1, metrics)
        if cfg.logger.video_every > 0 and (step + 1) % cfg.logger.video_every == 0:  # every rank: ZeRO-3 gathers
            job.log_media(step + 1, logger)
        done = step + 1 == cfg.trainer.max_steps
        stopped = interrupts.agreed()
        if done or stopped or (step + 1) % cfg.trainer.checkpoint_every == 0:
            save(step + 1)
        if stopped:
            preempted = distributed.any_rank(interrupts.preempted)
            if preempted and d.is_main:  # launch/slurm/train.sbatch requeues the job when it finds this marker
                (run_dir / "PREEMPTED").write_text(f"{step + 1}\n")
            if preempted:
                log.info(f"preempted: checkpoint saved at step {step + 1}, exiting for requeue")
            else:
                log.info(f"stopped: checkpoint saved at step {step + 1}; rerun the command to resume")
            break

    if stopped and "SUBMITIT_EXECUTOR" in os.environ:
        # A submitit job that returns is "done", and the sweep would end before its requeued run; leave without a
        # result so the launcher waits for the requeued job, which resumes from the checkpoint just written.
        # submitit's own handler of its signal (SIGUSR2: requeue the job) runs now that the checkpoint exists.
        logger.finish()
        distributed.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        interrupts.chain()
        os._exit(0)
    end_fingerprints = {name: fingerprint(module) for name, module in watched.items()}
    (run_dir / f"fingerprints_rank{d.rank}.json").write_text(
        json.dumps({"start": start_fingerprints, "end": end_fingerprints}, indent=1))
    logger.finish()
    distributed.shutdown()
    return metrics


def _plain(cfg: TrainConfig) -> dict:
    return json.loads(json.dumps(asdict(cfg), default=str))


def name_wandb_run(cfg: TrainConfig, hydra_cfg) -> None:
    """Dashboard identity: group by experiment (and sweep), tags from the overrides, name from the run dir, job
    type from the task."""
    from hydra.types import RunMode

    sweep = hydra_cfg.mode == RunMode.MULTIRUN
    if cfg.logger.group is None:
        cfg.logger.group = f"{cfg.name}/{Path(hydra_cfg.sweep.dir).name}" if sweep else cfg.name
    if not cfg.logger.tags:  # wandb tags are at most 64 characters
        cfg.logger.tags = [o[:64] for o in hydra_cfg.overrides.task if not o.startswith(("hydra.", "logger."))]
    if cfg.logger.name is None:
        run_dir = Path(hydra_cfg.runtime.output_dir)
        cfg.logger.name = f"{cfg.name}/{run_dir.parent.name}/{run_dir.name}" if sweep else f"{cfg.name}/{run_dir.name}"
    if cfg.logger.job_type is None:
        cfg.logger.job_type = cfg.task.name


# Mistakes a user can make, reported as one line (SF_TRACEBACK=1 shows the traceback instead).
USER_ERRORS = (ValueError, OSError, FloatingPointError, RunDirBusy)


def main() -> None:
    """Hydra entry point (`sf-train`, `python -m sf.train`)."""
    die_with_launcher(signal.SIGHUP)  # a worker of torchrun / the deepspeed launcher must not outlive it
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from sf.config import register_configs, search_path_overrides, task_choices

    if "--dry-run" in sys.argv:  # the same as trainer.dry_run=true
        sys.argv = [a for a in sys.argv if a != "--dry-run"] + ["trainer.dry_run=true"]
    try:
        check_task_override(sys.argv[1:], task_choices())
        check_run_dir_writable(sys.argv[1:])
        sys.argv += search_path_overrides()
    except ValueError as e:
        exit_with_error(e, 2)
    register_configs()

    @hydra.main(version_base=None, config_path="pkg://sf.conf", config_name="config")
    def _run(dict_cfg) -> None:
        try:
            cfg = to_train_config(dict_cfg)
        except Exception as e:  # omegaconf's missing-value / validation errors: one line, naming the key
            exit_with_error(e, 2)
        hydra_cfg = HydraConfig.get()
        name_wandb_run(cfg, hydra_cfg)
        try:
            train(cfg, hydra_cfg.runtime.output_dir)
        except USER_ERRORS as e:  # bad input, a damaged file, a full disk: one line, no traceback
            exit_with_error(e, 1)

    _run()


def check_task_override(argv: list[str], choices: list[str]) -> None:
    """A `task=<name>` on the command line must name a task (Hydra's own message spans a dozen lines)."""
    for arg in argv:
        key, _, value = arg.lstrip("+~").partition("=")
        if key == "task" and value and "," not in value and value not in choices:
            raise ValueError(f"unknown task {value!r}; the known tasks are {', '.join(choices)}")


def check_run_dir_writable(argv: list[str]) -> None:
    """The run dir (`hydra.run.dir=`, else ./outputs) must be creatable: Hydra writes into it before sf runs."""
    if "-m" in argv or "--multirun" in argv or any(a.startswith("--") for a in argv):  # sweeps, --help, --cfg
        return
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")]
    target = Path(chosen[-1] if chosen else "outputs").expanduser().absolute()
    if "${" in str(target):
        return
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"run dir {target} cannot be created or written ({existing} is not a writable folder)")


if __name__ == "__main__":
    main()
