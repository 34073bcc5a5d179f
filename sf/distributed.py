"""Everything that touches DeepSpeed or torch.distributed: process group, engines, broadcasts, gathers, EMA.

The only module that imports deepspeed. One engine per trainable role (generator, critic), each with its own
torch AdamW and its own config dict; the frozen teacher is a plain module, or an optimizer-less ZeRO-3 engine
when sharded. Inside a loss that goes through another role's network, call `engine.module` with its
parameters frozen: the engine's own forward there crashes under ZeRO-2 and corrupts state under ZeRO-3.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

_DEEPSPEED = None


def _deepspeed():
    """Import deepspeed on first use (it is slow to import, and CPU runs need DS_ACCELERATOR set first)."""
    global _DEEPSPEED
    if _DEEPSPEED is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not torch.cuda.is_available():
            # DeepSpeed JIT-compiles a shared-memory op at every process-group init on CPU (~20 s on a fresh machine,
            # and again whenever another venv shares the extension cache). Only its inference all-reduce uses it.
            from deepspeed.ops import __compatible_ops__

            __compatible_ops__["deepspeed_shm_comm"] = False
        _DEEPSPEED = deepspeed
    return _DEEPSPEED


@dataclass
class DeepSpeedConfig:
    """ZeRO stage and the knobs that matter for two engines plus a frozen teacher."""

    stage: int = 2
    # Random exit steps change the execution trace every iteration; ZeRO-3 prefetching keyed on a recorded
    # trace then mis-prefetches (DeepSpeed #3599). 0 turns prefetching off; raise it on large GPUs only.
    stage3_prefetch_bucket_size: int = 0
    stage3_param_persistence_threshold: int = 0
    offload_optimizer: bool = False
    shard_teacher: bool = True  # under ZeRO-3: the teacher becomes an optimizer-less sharded engine
    extra: dict = field(default_factory=dict)  # merged last into every engine's config dict


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(timeout_minutes: int = 30) -> Dist:
    """Join the job's process group from the launcher's environment (torchrun, deepspeed, srun, or none)."""
    _from_slurm_if_needed()
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())  # a lone process: never collide with another job's port
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _deepspeed().init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def _free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _from_slurm_if_needed() -> None:
    """Under `srun` (or submitit) without torchrun, translate SLURM_* into the torch.distributed variables.

    Rendezvous on the allocation's first node, at a port derived from the job id, unless MASTER_ADDR/PORT are set.
    """
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ.get("SLURM_NTASKS", "1")
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ and "SLURM_JOB_NODELIST" in os.environ:
        import subprocess

        hosts = subprocess.run(["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
                               capture_output=True, text=True, check=True).stdout.split()
        os.environ["MASTER_ADDR"] = hosts[0]
    if "MASTER_PORT" not in os.environ and "SLURM_JOB_ID" in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + int(os.environ["SLURM_JOB_ID"]) % 20000)


def shutdown() -> None:
    """Destroy the process group (without it, gloo runs sometimes abort at exit)."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `tensor` on every rank (used for the exit steps: all ranks must run the same forwards)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    out = tensor.clone().contiguous()
    dist.broadcast(out, src=0)
    return out


def broadcast_object(obj):
    """Rank 0's picklable object on every rank."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float], device) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for the whole dict)."""
    if not values or not dist.is_initialized() or dist.get_world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


@dataclass
class OptimizerConfig:
    """AdamW of one role. Betas (0, 0.999) and wd 0.01 are the Self-Forcing recipe's."""

    lr: float = 2e-6
    betas: list = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    eps: float = 1e-8


def engine_config(ds: DeepSpeedConfig, micro_batch: int, grad_accum: int, grad_clip: float, bf16: bool) -> dict:
    """One engine's DeepSpeed config dict (each engine gets its own; no shared scheduler)."""
    zero = {"stage": ds.stage}
    if ds.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
            stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
        )
    if ds.offload_optimizer and ds.stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    return _deep_merge(config, ds.extra)


def _deep_merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def build_engine(model: torch.nn.Module, optim: OptimizerConfig, config: dict):
    """A DeepSpeed engine training `model` with torch AdamW (no DeepSpeed JIT-compiled optimizer needed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay, eps=optim.eps
    )
    engine, _, _, _ = _deepspeed().initialize(model=model, optimizer=optimizer, config=config)
    return engine


def build_frozen(model: torch.nn.Module, ds: DeepSpeedConfig, config: dict, device, dtype) -> torch.nn.Module:
    """The frozen teacher: a plain module (ZeRO 0-2), or sharded by an optimizer-less ZeRO-3 engine.

    Returns the module to call; under ZeRO-3 its forward gathers the shards (hooks installed by the engine).
    """
    model.requires_grad_(False).eval()
    if ds.stage == 3 and ds.shard_teacher:
        engine, _, _, _ = _deepspeed().initialize(model=model, config=config)
        engine.eval()
        return engine.module
    return model.to(device=device, dtype=dtype)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Temporarily set requires_grad=False on a module's trainable parameters (a critic inside G's loss)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def gathered(params: list[torch.Tensor], modifier_rank: int | None = None):
    """Full parameter values inside the block under ZeRO-3 (a no-op otherwise)."""
    zero3 = [p for p in params if is_zero3_param(p)]
    if not zero3:
        yield
        return
    with _deepspeed().zero.GatheredParameters(zero3, modifier_rank=modifier_rank):
        yield


def full_state_dict(module: torch.nn.Module, rank: int) -> dict[str, torch.Tensor] | None:
    """Gathered fp32 CPU state dict on rank 0 (None elsewhere); gathers one parameter at a time under ZeRO-3."""
    out = {} if rank == 0 else None
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        with gathered([tensor]):
            if out is not None:
                out[name] = tensor.detach().float().cpu().clone()
    return out


class EMA:
    """Exponential moving average of a (possibly ZeRO-3-sharded) model's parameters.

    Under ZeRO-3 every rank keeps the average of its own shard (`param.ds_tensor`), so memory is sharded like
    the model and no gather is needed per update; `full_state_dict` assembles it. Otherwise every rank keeps a
    full fp32 copy (they are identical: ZeRO-1/2 keep parameters replicated).
    """

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.names = [n for n, p in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.zero3 = any(is_zero3_param(p) for p in self.params)
        self.shadow = [self._local(p).detach().float().clone() for p in self.params]

    def _local(self, p: torch.Tensor) -> torch.Tensor:
        return p.ds_tensor if is_zero3_param(p) else p.data

    @torch.no_grad()
    def update(self, decay: float | None = None) -> None:
        """shadow <- d * shadow + (1 - d) * param; d = 0 copies the parameters (EMA start)."""
        d = self.decay if decay is None else decay
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(self._local(p).float(), alpha=1 - d)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the EMA (a shard under ZeRO-3), keyed by parameter name."""
        return {n: s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The whole EMA model on rank 0 (None elsewhere); all ranks must call it under ZeRO-3."""
        if not self.zero3:
            return {n: s.clone().cpu() for n, s in zip(self.names, self.shadow)} if rank == 0 else None
        out = {} if rank == 0 else None
        world = dist.get_world_size()
        for name, s, p in zip(self.names, self.shadow, self.params):
            parts = [torch.empty_like(s) for _ in range(world)]
            dist.all_gather(parts, s)
            if out is not None:
                out[name] = torch.cat(parts)[: p.ds_numel].view(p.ds_shape).cpu()
        return out
