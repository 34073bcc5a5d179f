"""What every task shares: the `Job` interface, its context, and building networks, text and codecs from config."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sf import distributed
from sf.config import RANDOM_INIT, NetConfig, TrainConfig
from sf.models.convert import check_state_dict, load_dit, save_state_dict
from sf.models.dit import VideoDiT, dit_config


@dataclass
class JobContext:
    """What the runner hands a job: the process group, where to write, the compute dtype, DeepSpeed's config."""

    dist: distributed.Dist
    run_dir: Path
    dtype: torch.dtype
    ds_config: dict


class Job:
    """One task on the runner. Subclasses set `engines` (trained, checkpointed, exported) and implement `step`."""

    engines: dict[str, Any]
    ema: distributed.EMA | None = None
    ema_name: str = "generator_ema"  # the export name of the EMA weights
    frozen: dict[str, torch.nn.Module] = {}  # fingerprinted at start and end: must not change
    num_skipped: int = 0  # corrupt samples skipped so far (logged as data/skipped)

    def __init__(self, cfg: TrainConfig, ctx: JobContext):
        self.cfg, self.ctx = cfg, ctx
        self.dist, self.device, self.dtype = ctx.dist, ctx.dist.device, ctx.dtype

    def base_lr(self, name: str) -> float:
        """The peak learning rate of engine `name` (warm-up is the runner's)."""
        raise NotImplementedError

    def step(self, step: int) -> dict[str, float]:
        """One optimisation step of every engine (with `trainer.grad_accum_steps` micro-batches); metrics."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """This rank's data position (JSON); empty when the data order is a function of the step."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def log_media(self, step: int, logger) -> None:
        """Sample videos (called on every rank: ZeRO-3 forwards are collective)."""

    def micro_batch(self, step: int, micro: int) -> tuple[list[dict], list[int]]:
        """This rank's samples of one micro-batch from `self.bank` (a SampleBank), and their global positions."""
        cfg, d = self.cfg, self.dist
        where = (step, micro, cfg.trainer.grad_accum_steps, d.rank, d.world_size, cfg.data.batch_size)
        return self.bank.batch(cfg.seed, *where), self.bank.positions(*where)

    def optimise(self, engine, loss: torch.Tensor, what: str, step: int) -> None:
        """Backward and step `engine` on a loss every rank has checked to be finite."""
        check_finite(loss, what, step, self.device)
        engine.backward(loss)
        engine.step()

    def finish_step(self, out: dict, name: str, step: int) -> dict:
        """After a single-engine step: its gradient norm into `out`, and the EMA (a copy of the weights at step 0)."""
        out[f"grad_norm/{name}"] = float(self.engine.get_global_grad_norm() or 0.0)
        if self.ema is not None:
            self.ema.update(0.0 if step == 0 else None)
        return out

    def export(self, name: str, state: dict[str, torch.Tensor], path: Path, step: int) -> None:
        """Write the full weights of `name` (an engine or the EMA) as a standalone file (rank 0)."""
        save_state_dict(state, self.model_config(name), path, extra_metadata={"step": step})

    def model_config(self, name: str):
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------- builders


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


def build_text_encoder(cfg: TrainConfig, device):
    """The open_clip text tower of `cfg.text` behind a per-prompt feature cache."""
    from sf.models.text import CachedTextEncoder, OpenCLIPTextEncoder

    torch.manual_seed(cfg.seed + 3)  # a random-init tower must be the same on every rank
    tower = OpenCLIPTextEncoder(cfg.text.model_name, cfg.text.pretrained, cfg.text.max_length, device=device)
    return CachedTextEncoder(fallback=tower, max_length=cfg.text.max_length)


def in_dtype(net, dtype: torch.dtype):
    """The network called in its compute dtype (bf16 on GPU), answering in fp32 for the losses."""
    return lambda x, t, context, **kw: net(x.to(dtype), t, context, **kw).float()


def accumulate(out: dict, values: dict, num_micro: int) -> None:
    """out += values / num_micro (metrics averaged over micro-batches)."""
    for k, v in values.items():
        out[k] = out.get(k, 0.0) + float(v) / num_micro


def video_decoder(cfg: TrainConfig, device):
    """latents (F, C, h, w) -> a video to look at: pixels through `cfg.codec` when it is a trained VAE, else a
    false-colour preview of the latents."""
    from sf.video import latent_preview

    if cfg.codec.kind == "identity" or cfg.codec.checkpoint is None:
        return lambda latents: latent_preview(latents.float().cpu())
    from sf.models.vae import codec_from_config

    codec = codec_from_config(cfg.codec).to(device).eval()
    return lambda latents: codec.decode(latents[None].float().to(device))[0].cpu()
