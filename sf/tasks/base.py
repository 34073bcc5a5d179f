"""What every task shares: the `Job` interface, its runtime, the EMA config, and building networks, text and codecs."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from sf import distributed
from sf.config import RANDOM_INIT, NetConfig
from sf.distributed import EMA, RoleSpec, Trainable
from sf.models.convert import check_state_dict, load_dit, save_state_dict
from sf.models.dit import VideoDiT, dit_config
from sf.schema import at_least, fraction

if TYPE_CHECKING:
    from sf.config import TrainConfig
    from sf.data.bank import SampleBank


@dataclass
class Runtime:
    """What the runner hands a job: the process group, where to write, the compute dtype, DeepSpeed's config."""

    dist: distributed.Dist
    run_dir: Path
    dtype: torch.dtype
    ds_config: dict


@dataclass
class EmaConfig:
    """Moving average of the trained weights (what is exported as `<role>_ema` and sampled from)."""

    decay: float = field(default=0.99, metadata=fraction())  # 0 disables it
    start_step: int = field(default=0, metadata=at_least(0))  # starts as a copy at the first update at/after it


class Job:
    """One task on the runner: it builds its roles and data and runs one optimisation step of every role.

    The runner (`sf.train.train`) owns everything else: resume, LR schedule, logging, checkpoints, preemption.
    Subclasses set `roles` and implement `step`; `task.optim.<role>` is each role's optimizer.
    """

    networks: tuple[str, ...] = ()  # the config sections of the DiTs it builds (teacher, model, critic)
    trained_sections: tuple[str, ...] = ()  # those of them it trains
    data_kind: str = ""  # what data.shards holds: prompts | captions | latents | pixels (what preflight checks)
    roles: dict[str, Trainable]  # trained: LR-scheduled, checkpointed, exported
    frozen: dict[str, torch.nn.Module]  # only called: fingerprinted at start and end, must not change
    ema: EMA | None = None
    bank: SampleBank | None = None  # in-memory data (teacher, ode, vae, the forcing baselines); else prompts stream

    def __init__(self, cfg: TrainConfig, runtime: Runtime):
        self.cfg, self.task, self.runtime = cfg, cfg.task, runtime
        self.dist, self.device, self.dtype = runtime.dist, runtime.dist.device, runtime.dtype
        self.roles, self.frozen = {}, {}
        self.updated: list[str] = []  # roles whose optimizer stepped in the current step (the runner resets it)

    # ---- the interface the runner calls

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step of every role (with `trainer.grad_accum_steps` micro-batches); metrics."""
        raise NotImplementedError

    def base_lr(self, role: str) -> float:
        """The peak learning rate of a role (the schedule is the runner's)."""
        return getattr(self.task.optim, role).lr

    @property
    def ema_name(self) -> str:
        """The export name of the EMA weights."""
        return f"{self.ema.role}_ema" if self.ema is not None else ""

    @property
    def num_skipped(self) -> int:
        """Corrupt samples skipped so far (logged as data/skipped)."""
        return self.bank.num_skipped if self.bank is not None else 0

    def state_dict(self) -> dict:
        """This rank's data position (JSON); empty when the data order is a function of the step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def log_media(self, step: int, logger) -> None:
        """Sample videos (called on every rank: ZeRO-3 forwards are collective)."""

    def periodic(self, step: int) -> dict[str, float]:
        """Metrics the job computes every so often after step `step` (health checks), equal on every rank (every
        rank calls it, after the step's metrics were averaged)."""
        return {}

    @classmethod
    def data_for(cls, task) -> str:
        """What `data.shards` holds for this task's config (what preflight checks)."""
        return cls.data_kind

    def export(self, name: str, state: dict[str, torch.Tensor], path: Path, step: int) -> None:
        """Write the full weights of `name` (a role or the EMA) as a standalone file (rank 0) that carries the
        run's config (what sf-generate reads: text encoder, codec, rollout, latent size)."""
        from sf.config import RUN_CONFIG_KEY, config_to_yaml

        metadata = {"step": step, RUN_CONFIG_KEY: config_to_yaml(self.cfg)}
        save_state_dict(state, self.model_config(name), path, extra_metadata=metadata)

    def model_config(self, name: str):
        """The architecture of an exported role (the EMA shares its role's)."""
        return self.roles[name.removesuffix("_ema")].module.cfg

    def architectures(self) -> dict[str, dict]:
        """Each trained role's architecture as a dict (recorded in checkpoints, compared when resuming)."""
        out = {}
        for name, role in self.roles.items():
            module = role.module
            out[name] = module.codec_config() if hasattr(module, "codec_config") else module.cfg.to_dict()
        return out

    # ---- helpers for subclasses

    def train_role(self, module: torch.nn.Module, name: str, gradient_checkpointing: bool = False) -> Trainable:
        """`module` as a trained role named `name`, with the optimizer `task.optim.<name>`."""
        spec = RoleSpec(name, getattr(self.task.optim, name), gradient_checkpointing)
        self.roles[name] = distributed.build_trainable(module, spec, self.runtime.ds_config)
        return self.roles[name]

    def micro_batch(self, step: int, micro: int) -> tuple[list[dict], list[int]]:
        """This rank's samples of one micro-batch from `self.bank`, and their global positions."""
        cfg, d = self.cfg, self.dist
        where = (step, micro, cfg.trainer.grad_accum_steps, d.rank, d.world_size, cfg.data.batch_size)
        return self.bank.batch(cfg.seed, *where), self.bank.positions(*where)

    def optimise(self, role: Trainable, loss: torch.Tensor, what: str, step: int) -> None:
        """Backward and (at the end of the update) step `role` on a loss every rank has checked to be finite."""
        check_finite(loss, what, step, role.name, self.updated)
        if role.step(loss) is not None:
            self.updated.append(role.name)

    def finish_update(self, out: dict, role: Trainable, step: int) -> dict:
        """After the last micro-batch of an update of `role`: its gradient norm into `out`, then its EMA."""
        out[f"grad_norm/{role.name}"] = role.grad_norm or 0.0
        if self.ema is not None and self.ema.role == role.name:
            self.ema.update(step)
        return out

    def make_ema(self, role: Trainable, ema: EmaConfig) -> None:
        """An EMA of `role` unless `ema.decay` is 0."""
        self.ema = EMA(role, ema.decay, ema.start_step) if ema.decay > 0 else None


# ---------------------------------------------------------------------------------------------------- builders


def check_finite(loss: torch.Tensor, what: str, step: int, role: str = "", updated: list[str] = ()) -> None:
    """Stop every rank before a non-finite loss reaches `role`'s weights, saying truthfully what this step
    (`step` counts from 0; the message, like metrics.jsonl, from 1) had already updated."""
    if distributed.any_rank(not bool(torch.isfinite(loss).all())):
        done = f"; {', '.join(updated)} already updated in this step" if updated else ""
        raise FloatingPointError(
            f"non-finite {what} loss at step {step + 1} (on some rank): {role or 'its role'} not updated{done}; "
            f"nothing of this step is saved"
        )


def build_net(net: NetConfig, seed: int, dtype: torch.dtype = torch.float32) -> VideoDiT:
    """A VideoDiT from its config: weights from `checkpoint`, or seeded random init (identical on every rank).

    Weights are built on the meta device and take the file's tensors, memory-mapped, in `dtype` (the one the run
    computes in, which DeepSpeed would cast to anyway): no random init beside them and, when the file already
    holds that dtype, no private copy on any rank (the node's ranks share the page cache)."""
    if net.checkpoint and net.checkpoint != RANDOM_INIT:
        return load_dit(net.checkpoint, dtype=dtype)
    torch.manual_seed(seed)
    return VideoDiT(dit_config(net.flavor, **net.overrides)).to(dtype)


def copy_weights(dst: VideoDiT, src: VideoDiT, what: str) -> VideoDiT:
    """dst <- src's weights (same architecture required; the error lists every difference)."""
    state = src.state_dict()
    check_state_dict(dst, state, f"initialising {what} from the teacher")
    dst.load_state_dict(state)
    return dst


def build_text_encoder(cfg: TrainConfig, device, dtype: torch.dtype = torch.float32):
    """The text encoder of a resolved `cfg.text` behind the run's cached features: the fixed prompts' table
    (sf-embed) when there is one, and UMT5 built only if a prompt is not in it."""
    from sf.data.prompts import read_prompt_table
    from sf.models.text import CachedTextEncoder, OpenCLIPTextEncoder, load_umt5
    from sf.tasks.preflight import prompt_table_path

    table_path = prompt_table_path(cfg)
    table, meta = read_prompt_table(table_path) if table_path is not None else ({}, {})
    if cfg.text.kind == "umt5":
        def fallback():
            return load_umt5(cfg.text.pretrained, device=device, dtype=dtype, max_length=cfg.text.max_length)
    else:
        torch.manual_seed(cfg.seed + 3)  # a random-init tower must be the same on every rank
        fallback = OpenCLIPTextEncoder(cfg.text.model_name, cfg.text.pretrained, cfg.text.max_length, device=device)
    samples = json.loads(meta.get("sample_prompts", "[]"))
    return CachedTextEncoder(table, fallback=fallback, max_length=cfg.text.max_length, sample_prompts=samples)


def compute_dtype(precision: str, device: torch.device | str) -> torch.dtype:
    """The dtype networks run in for `trainer.precision` (auto: bf16 on GPU, fp32 on CPU)."""
    if precision == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    return torch.bfloat16 if precision == "bf16" else torch.float32


def in_dtype(net, dtype: torch.dtype):
    """The network called in its compute dtype (bf16 on GPU), answering in fp32 for the losses."""
    return lambda x, t, context, **kw: net(x.to(dtype), t, context, **kw).float()


def accumulate(out: dict, values: dict, num_micro: int) -> None:
    """out += values / num_micro (metrics averaged over micro-batches)."""
    for k, v in values.items():
        out[k] = out.get(k, 0.0) + float(v) / num_micro


def trained_codec(cfg: TrainConfig, device, dtype: torch.dtype = torch.float32):
    """The run's codec when it is a trained VAE (`cfg.codec` names weights), else None."""
    if cfg.codec.kind == "identity" or cfg.codec.checkpoint is None:
        return None
    from sf.models.vae import codec_from_config

    return codec_from_config(cfg.codec).to(device=device, dtype=dtype).eval()


def video_decoder(cfg: TrainConfig, device):
    """latents (F, C, h, w) -> a video to look at: pixels through `cfg.codec` when it is a trained VAE, else a
    false-colour preview of the latents."""
    from sf.video import latent_preview

    codec = trained_codec(cfg, device)
    if codec is None:
        return lambda latents: latent_preview(latents.float().cpu())
    return lambda latents: codec.decode(latents[None].float().to(device))[0].cpu()
