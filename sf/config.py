"""Typed configuration: one dataclass per concern, composed into `TrainConfig` and registered with Hydra.

`conf/config.yaml` starts from the `train_schema` registered here, so every YAML group and every CLI override is
checked against these types at compose time: an unknown key or a wrong type fails with Hydra's message naming
it. `to_train_config` turns the composed DictConfig into these objects; nothing below `main()` sees a DictConfig.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from sf.data.prompts import PromptDataConfig
from sf.distill.rollout import RolloutConfig
from sf.distributed import DeepSpeedConfig, OptimizerConfig
from sf.logging import LoggerConfig
from sf.models.vae import CodecConfig

TASKS = ("distill", "teacher", "ode", "vae")
TEACHERLESS_TASKS = ("teacher", "vae")
RANDOM_INIT = "random"  # teacher.checkpoint value for smoke tests: a seeded random teacher


@dataclass
class NetConfig:
    """A VideoDiT: a named flavor, field overrides (e.g. in_channels of another VAE), optional weights."""

    flavor: str = "debug"
    checkpoint: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class TeacherConfig(NetConfig):
    """The frozen bidirectional teacher (the real score). Its weights are required (except to train a teacher)."""

    checkpoint: Optional[str] = MISSING


@dataclass
class CriticConfig(NetConfig):
    """The trainable fake score; initialised from the teacher's weights unless it has its own."""

    init_from_teacher: bool = True


@dataclass
class TextConfig:
    """Text features: an open_clip text tower (weights from a local file), unless the shards carry embeddings."""

    model_name: str = "sf-tiny-clip"
    pretrained: Optional[str] = None
    max_length: Optional[int] = 77  # fixed length (zero-padded, as Wan pads to 512): batching never changes results
    negative_prompt: str = ""


@dataclass
class DistillConfig:
    """The objective and its schedule (DESIGN.md section 5)."""

    objective: str = "dmd"  # dmd | sid
    cfg_scale: float = 3.0  # real = cond + cfg_scale * (cond - uncond)
    timestep_shift: float = 5.0
    min_timestep_ratio: float = 0.02
    max_timestep_ratio: float = 0.98
    timestep_from_exit: bool = False  # draw t only within the exit step's noise interval (reference's ts_schedule)
    gen_update_every: int = 5
    ema_decay: float = 0.99  # 0 disables the EMA
    ema_start_step: int = 200
    sid_alpha: float = 1.2
    latent_height: int = 4
    latent_width: int = 4


@dataclass
class FlowConfig:
    """Teacher training (task=teacher): bidirectional flow matching on latents, caption dropout for CFG."""

    caption_dropout: float = 0.1  # share of samples trained on the negative prompt (the unconditional branch)
    timestep_shift: float = 3.0  # t = shift(u), u uniform: more steps at high noise, where layout is decided
    ema_decay: float = 0.999  # 0 disables the EMA (exported as teacher_ema)
    sample_steps: int = 32  # teacher sampler steps for the sample videos
    sample_shift: float = 5.0


@dataclass
class OdeConfig:
    """ODE init (task=ode): teacher trajectories at the student's sigmas, then causal regression (DESIGN 5)."""

    num_pairs: int = 256  # prompts (the first of data.shards) sampled by the teacher into run_dir/data/ode
    num_steps: int = 48
    shift: float = 8.0
    cfg_scale: float = 3.0
    batch_size: int = 16  # prompts per teacher sampling batch
    shards: Optional[str] = None  # existing ode.safetensors shards: skip the sampling
    ema_decay: float = 0.99  # 0 disables the EMA (exported as generator_ema)


@dataclass
class VaeConfig:
    """VAE training (task=vae): the codec of `codec` learns the pixels of `data.shards` (DESIGN 9)."""

    kl_weight: float = 1.0e-6
    sample_posterior: bool = True  # False: decode the posterior mean (trains much faster from scratch)
    foreground_weight: float = 0.0  # > 0: pixels away from the clip's background weigh 1 + this in the L1
    l2_weight: float = 0.0  # > 0: add this x the (equally weighted) squared error to the L1
    crop_frames: int = 41  # random 1 + 4k frame window of each clip (too short ones do not carry over to 81)
    crop_size: int = 32  # random square crop, a multiple of the spatial compression
    # stages [steps, window frames, windows per clip] run first, in order; then crop_frames x 1 window per clip
    curriculum: list = field(default_factory=list)
    stats_videos: int = 32  # full clips encoded to fit the per-channel latent mean/std written with every export


@dataclass
class OptimConfig:
    """One AdamW per role; LR warm-up, flat, linear cool-down; gradient clipping by global norm."""

    generator: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=2e-6))
    critic: OptimizerConfig = field(default_factory=lambda: OptimizerConfig(lr=4e-7))
    warmup_steps: int = 0
    cooldown_steps: int = 0  # linear LR decay to ~0 over the last N of trainer.max_steps (0: flat to the end)
    grad_clip: float = 10.0


@dataclass
class TrainerConfig:
    """Loop length, accumulation, precision, checkpoints."""

    max_steps: int = 1000
    grad_accum_steps: int = 1
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | fp32 | bf16
    checkpoint_every: int = 100
    keep_last: int = 2
    export_on_checkpoint: bool = True
    timeout_minutes: int = 30


@dataclass
class TrainConfig:
    """Everything a training run needs; the resolved copy is saved beside every checkpoint."""

    seed: int = 0
    name: str = "sf"
    task: str = "distill"  # distill (self-forcing DMD/SiD) | teacher | ode | vae
    model: NetConfig = field(default_factory=NetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    text: TextConfig = field(default_factory=TextConfig)
    data: PromptDataConfig = field(default_factory=PromptDataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    flow: FlowConfig = field(default_factory=FlowConfig)
    ode: OdeConfig = field(default_factory=OdeConfig)
    vae: VaeConfig = field(default_factory=VaeConfig)
    codec: CodecConfig = field(default_factory=lambda: CodecConfig(kind="identity"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(relative: str) -> str:
    """Absolute path of a file shipped in sf/assets (the `${sf.asset:prompts/smoke.txt}` resolver)."""
    path = ASSETS / relative
    if not path.exists():
        hint = " (the world's weights are built by `make assets`)" if relative.startswith("world/") else ""
        raise ValueError(f"no shipped asset {relative!r} under {ASSETS}{hint}")
    return str(path)


def register_configs() -> None:
    """Make `train_schema` available to conf/config.yaml's defaults list, and the `sf.asset` resolver."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    if not OmegaConf.has_resolver("sf.asset"):
        OmegaConf.register_new_resolver("sf.asset", asset_path)


def to_train_config(cfg: DictConfig | Any) -> TrainConfig:
    """The composed config as typed objects (raises on a missing mandatory value, naming it)."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if cfg.get("task") in TEACHERLESS_TASKS and OmegaConf.is_missing(cfg.teacher, "checkpoint"):
        cfg = cfg.copy()
        cfg.teacher.checkpoint = None  # these tasks train from data alone
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"missing mandatory value: {', '.join(missing)} (set it as an override, e.g. {missing[0]}=...)")
    return OmegaConf.to_object(cfg)


register_configs()
