"""Rectified-flow diffusion (Wan convention): noise algebra, timestep shifts, guidance and samplers."""

from sf.diffusion.flow import (
    DEFAULT_SHIFT,
    NUM_TRAIN_TIMESTEPS,
    add_noise,
    dmd_timestep,
    eps_from_flow,
    flow_from_x0_noise,
    shift_sigma,
    sigma_to_t,
    t_to_sigma,
    timesteps_table,
    warp_steps,
    x0_from_flow,
    x0_to_flow,
)
from sf.diffusion.sample import (
    DEFAULT_CFG_SCALE,
    TeacherSample,
    cfg_combine,
    guided_net,
    ode_sigmas,
    sample_few_step,
    sample_teacher,
)

__all__ = [
    "DEFAULT_CFG_SCALE",
    "DEFAULT_SHIFT",
    "NUM_TRAIN_TIMESTEPS",
    "TeacherSample",
    "add_noise",
    "dmd_timestep",
    "cfg_combine",
    "eps_from_flow",
    "flow_from_x0_noise",
    "guided_net",
    "ode_sigmas",
    "sample_few_step",
    "sample_teacher",
    "shift_sigma",
    "sigma_to_t",
    "t_to_sigma",
    "timesteps_table",
    "warp_steps",
    "x0_from_flow",
    "x0_to_flow",
]
