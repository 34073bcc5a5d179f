"""Training tasks on the shared runner of `sf.train`: what is trained, on what data, with which loss.

    distill   self-forcing DMD / SiD: causal generator + critic against a frozen teacher (the main job)
    teacher   bidirectional flow matching on latents with caption dropout (trains a teacher)
    ode       teacher ODE pairs at the student's sigmas, then causal regression (the student's init)
    vae       a Wan VAE on pixels (the codec of the latents everything else uses)

Each task is one file, `sf/tasks/<name>.py`: its config dataclass (the `task` section of the config, selected by
`task=<name>` through `conf/task/<name>.yaml`) and its `Job`, which builds its roles through the engine seam
(`sf.distributed`) and its data, and runs one optimisation step. The runner (`sf.train.train`) owns everything
else: resume, LR schedule, logging, checkpoints, preemption. Adding a task: docs/architecture.md.
"""

from __future__ import annotations

from sf.tasks.base import Job, Runtime
from sf.tasks.distill import DistillJob, DistillTask
from sf.tasks.ode import OdeJob, OdeTask
from sf.tasks.teacher import TeacherJob, TeacherTask
from sf.tasks.vae import VaeJob, VaeTask

# name -> (config schema, job); the name is `task=<name>` and the schema's `name` field
TASKS: dict[str, tuple[type, type[Job]]] = {
    "distill": (DistillTask, DistillJob),
    "teacher": (TeacherTask, TeacherJob),
    "ode": (OdeTask, OdeJob),
    "vae": (VaeTask, VaeJob),
}


def make_job(cfg, runtime: Runtime) -> Job:
    """The job of `cfg.task`."""
    if cfg.task.name not in TASKS:
        raise ValueError(f"unknown task {cfg.task.name!r}; the known tasks are {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task.name][1](cfg, runtime)


__all__ = ["TASKS", "Job", "Runtime", "make_job"]
