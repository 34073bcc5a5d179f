"""The algorithm: self-forcing rollouts over the student's KV cache and the distillation losses."""

from sf.distill.losses import (
    critic_loss,
    dmd_loss,
    flow_matching_loss,
    ode_regression_loss,
    sid_loss,
    x0_predictor,
)
from sf.distill.rollout import (
    RolloutConfig,
    RolloutOutput,
    diffusion_forcing_rollout,
    draw_exit_steps,
    generate,
    self_forcing_rollout,
    stream_chunks,
    teacher_forcing_rollout,
)

__all__ = [
    "RolloutConfig",
    "RolloutOutput",
    "critic_loss",
    "diffusion_forcing_rollout",
    "dmd_loss",
    "draw_exit_steps",
    "flow_matching_loss",
    "generate",
    "ode_regression_loss",
    "self_forcing_rollout",
    "sid_loss",
    "stream_chunks",
    "teacher_forcing_rollout",
    "x0_predictor",
]
