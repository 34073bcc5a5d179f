"""Training tasks on the shared runner of `sf.train`: what is trained, on what data, with which loss.

    distill   self-forcing DMD / SiD: causal generator + critic against a frozen teacher (the main job)
    teacher   bidirectional flow matching on latents with caption dropout (trains a teacher)
    ode       teacher ODE pairs at the student's sigmas, then causal regression (the student's init)
    vae       a Wan VAE on pixels (the codec of the latents everything else uses)

A task is a `Job`: it builds its networks as DeepSpeed engines and its data, and runs one optimisation step;
the runner (`sf.train.train`) owns everything else: resume, warm-up, logging, checkpoints, preemption.
"""

from __future__ import annotations

from sf.tasks.base import Job, JobContext


def make_job(cfg, ctx: JobContext) -> Job:
    """The job of `cfg.task`."""
    if cfg.task == "distill":
        from sf.tasks.distill import DistillJob as job_class
    elif cfg.task == "teacher":
        from sf.tasks.teacher import TeacherJob as job_class
    elif cfg.task == "ode":
        from sf.tasks.ode import OdeJob as job_class
    elif cfg.task == "vae":
        from sf.tasks.vae import VaeJob as job_class
    else:
        from sf.config import TASKS

        raise ValueError(f"unknown task {cfg.task!r}; choose from {', '.join(TASKS)}")
    return job_class(cfg, ctx)


__all__ = ["Job", "JobContext", "make_job"]
