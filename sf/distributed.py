"""The engine seam: the only module that imports deepspeed or calls torch.distributed.

What the rest of sf sees:

    init_distributed() -> Dist          this process's place in the job (torchrun, deepspeed, srun or none)
    build_trainable(module, spec, ds)   a role a task trains (generator, critic, teacher, vae): a `Trainable`
    build_frozen(module, ...)           a role a task only calls (the teacher as real score)
    EMA                                 moving average of a trainable role's weights, sharded like it
    barrier, any_rank, mean_across_ranks, broadcast_from_main, broadcast_object, all_gather_object
    gathered(params), full_state_dict(module), consolidated_state_dict(checkpoint, tag)

`build_trainable` applies, in this order, to the unchanged single-device module (`sf.models`):

    1. activation checkpointing   the module's own flag: blocks recompute their activations in backward
    2. (sequence parallelism)     the slot where attention is wrapped in an all-to-all over an SP group
    3. (LoRA)                     the slot where adapters are added and the base frozen
    4. the optimizer              torch AdamW over the parameters that then require grad (no JIT-compiled op)
    5. dtype and ZeRO             `deepspeed.initialize`: bf16 compute with fp32 master weights when enabled,
                                  gradients / optimizer states / parameters sharded by the ZeRO stage

so that whatever changes which parameters train (LoRA) comes before the optimizer, and sharding comes last.
Each role gets its own engine, optimizer and DeepSpeed config dict (a shared scheduler config would step both).
Inside a loss that goes through another role's network, call that role under `Trainable.frozen()`: its module
with its parameters frozen (the engine's own forward there crashes under ZeRO-2 and corrupts state under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from sf.schema import above, at_least, between, fraction

_DEEPSPEED = None
FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # torch's optimizers refuse larger step sizes
_DEVICE = torch.device("cpu")  # where collectives put their tensors (set by init_distributed)


def use_gpu() -> bool:
    """Whether jobs run on the GPU: when there is one, unless DS_ACCELERATOR=cpu asks for the CPU (`make test`)."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "cuda") != "cpu"


def _deepspeed():
    """Import deepspeed on first use (it is slow to import, and CPU runs need DS_ACCELERATOR set first)."""
    global _DEEPSPEED
    if _DEEPSPEED is None:
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        if not use_gpu():
            # DeepSpeed JIT-compiles a shared-memory op at every process-group init on CPU (~20 s on a fresh machine,
            # and again whenever another venv shares the extension cache). Only its inference all-reduce uses it.
            from deepspeed.ops import __compatible_ops__

            __compatible_ops__["deepspeed_shm_comm"] = False
        _DEEPSPEED = deepspeed
    return _DEEPSPEED


# ---------------------------------------------------------------------------------------------------- config


@dataclass
class DeepSpeedConfig:
    """ZeRO stage and the knobs that matter for two engines plus a frozen teacher."""

    stage: int = field(default=2, metadata=between(0, 3))
    # Random exit steps change the execution trace every iteration; ZeRO-3 prefetching keyed on a recorded
    # trace then mis-prefetches (DeepSpeed #3599). 0 turns prefetching off; raise it on large GPUs only.
    stage3_prefetch_bucket_size: int = field(default=0, metadata=at_least(0))
    stage3_param_persistence_threshold: int = field(default=0, metadata=at_least(0))
    offload_optimizer: bool = False
    shard_teacher: bool = True  # under ZeRO-3: the teacher becomes an optimizer-less sharded engine
    extra: dict = field(default_factory=dict)  # merged last into every engine's config dict


@dataclass
class OptimizerConfig:
    """AdamW of one role. Betas (0, 0.999) and wd 0.01 are the Self-Forcing recipe's."""

    lr: float = field(default=2e-6, metadata=between(0, FLOAT32_MAX))
    betas: list = field(default_factory=lambda: [0.0, 0.999], metadata=fraction())
    weight_decay: float = field(default=0.01, metadata=at_least(0))
    eps: float = field(default=1e-8, metadata=above(0))


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


# ---------------------------------------------------------------------------------------------------- process group


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
    global _DEVICE
    _from_slurm_if_needed()
    if "RANK" not in os.environ and "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(free_port())  # a lone process: never collide with another job's port
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    if use_gpu():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        _deepspeed().init_distributed(
            dist_backend=backend, auto_mpi_discovery=False, timeout=datetime.timedelta(minutes=timeout_minutes)
        )
    _DEVICE = device
    return Dist(rank=rank, world_size=world, local_rank=local, device=device)


def launch_rank() -> int:
    """This process's rank as the launcher set it, before the process group exists (0 when run alone)."""
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def free_port() -> int:
    """A TCP port nothing listens on now (the OS picks it)."""
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


# ---------------------------------------------------------------------------------------------------- collectives


def world_size() -> int:
    """Processes in the job (1 without a process group)."""
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def any_rank(flag: bool) -> bool:
    """True on every rank when `flag` is true on at least one (a non-finite loss, a preemption signal)."""
    if world_size() == 1:
        return bool(flag)
    value = torch.tensor([float(bool(flag))], device=_DEVICE)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def broadcast_from_main(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's value of `tensor` on every rank (used for the exit steps: all ranks must run the same forwards)."""
    if world_size() == 1:
        return tensor
    out = tensor.clone().contiguous()
    dist.broadcast(out, src=0)
    return out


def broadcast_object(obj):
    """Rank 0's picklable object on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj) -> list:
    """Every rank's object, in rank order."""
    if world_size() == 1:
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def mean_across_ranks(values: dict[str, float]) -> dict[str, float]:
    """Average scalar metrics over ranks (one all-reduce for the whole dict)."""
    if not values or world_size() == 1:
        return values
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_DEVICE)
    dist.all_reduce(t)
    t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


# ---------------------------------------------------------------------------------------------------- roles


@dataclass(frozen=True)
class RoleSpec:
    """How to build one trained role: its name (the checkpoint tag and metric suffix), optimizer, memory options."""

    name: str
    optim: OptimizerConfig
    gradient_checkpointing: bool = False


class Trainable:
    """A role a task trains: its module, one optimizer step per `step` call, LR, checkpoint state, full weights.

    Calling it runs the engine's forward (the role's own loss); inside another role's loss use `frozen()`.
    """

    def __init__(self, name: str, engine):
        self.name = name
        self._engine = engine
        self.grad_norm: float | None = None  # of the last completed update (before clipping)

    @property
    def module(self) -> torch.nn.Module:
        """The unwrapped network (its parameters are shards under ZeRO-3)."""
        return self._engine.module

    def __call__(self, *args, **kwargs):
        return self._engine(*args, **kwargs)

    def step(self, loss: torch.Tensor) -> float | None:
        """Backward of one micro-batch's loss; on the last micro-batch of an update, the optimizer step.

        Returns the update's gradient norm (before clipping) when the optimizer stepped, else None.
        """
        boundary = self._engine.is_gradient_accumulation_boundary()
        self._engine.backward(loss)
        self._engine.step()
        if not boundary:
            return None
        self.grad_norm = float(self._engine.get_global_grad_norm() or 0.0)
        return self.grad_norm

    @property
    def low_precision(self) -> bool:
        """Whether the module computes in bf16/fp16 while the optimizer keeps fp32 master weights."""
        return bool(self._engine.bfloat16_enabled() or self._engine.fp16_enabled())

    def master_weights(self) -> list[torch.Tensor]:
        """fp32 values of the module's parameters as the optimizer holds them, in `module.parameters()` order:
        this rank's partition under ZeRO-3 (flat, as `param.ds_tensor`), else the whole tensor. With bf16 these
        are the optimizer's fp32 masters (under ZeRO-1/2 assembled from the ranks' partitions: collective),
        not the rounded bf16 weights the forward uses; in fp32 the weights are their own masters."""
        params = list(self.module.parameters())
        if not self.low_precision:
            return [_local(p) for p in params]
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

        out = []
        for p in params:
            master = safe_get_local_fp32_param(p) if is_zero3_param(p) else safe_get_full_fp32_param(p)
            out.append((master if master is not None else _local(p)).view(_local(p).shape))
        return out

    def set_lr(self, lr: float) -> None:
        for group in self._engine.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def frozen(self):
        """The module with its trainable parameters frozen, for use inside another role's loss."""
        params = [p for p in self.module.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            yield self.module
        finally:
            for p in params:
                p.requires_grad_(True)

    def save(self, checkpoint: Path) -> None:
        """Weights and optimizer state (this rank's shards) into `checkpoint/<name>/` (collective)."""
        self._engine.save_checkpoint(str(checkpoint), tag=self.name, save_latest=False)

    def load(self, checkpoint: Path) -> None:
        """Restore what `save` wrote (collective); ValueError naming the checkpoint when it cannot be read."""
        path, _ = self._engine.load_checkpoint(str(checkpoint), tag=self.name, load_optimizer_states=True,
                                               load_lr_scheduler_states=True)
        if path is None:
            raise ValueError(f"{checkpoint}: DeepSpeed state of {self.name!r} could not be loaded")

    def full_state_dict(self, rank: int) -> dict[str, torch.Tensor] | None:
        """The whole fp32 weights on rank 0 (None elsewhere); collective under ZeRO-3."""
        return full_state_dict(self.module, rank)

    def nonfinite(self) -> bool:
        """Collective: whether any weight (of any rank's shard) is inf or nan."""
        return any_rank(not all(bool(torch.isfinite(_local(p)).all()) for p in self.module.parameters()))

    def held_bytes(self) -> dict:
        """Bytes of parameters and optimizer state this rank holds, each byte counted once.

        parameters     ZeRO-3: each parameter's own partition `p.ds_tensor`; otherwise the full `p.data`
        fp32 master    the DeepSpeed wrapper's fp32 copy of (this rank's partition of) the parameters, found under
                       the attribute names of MASTER_ATTRIBUTES; plain fp32 ZeRO-0 (torch AdamW unwrapped) has none
        optimizer      every tensor in the torch AdamW's state (exp_avg, exp_avg_sq, step) on this rank
        Tensors that share memory (under fp32 ZeRO-3 the master partition IS the parameter partition) are counted
        once, in the first category: the categories are "new bytes" in that order. Not counted: gradients and
        DeepSpeed's communication buckets (transient), activations, buffers of the module.
        """
        engine = self._engine
        params = list(engine.module.parameters())
        zero3 = any(hasattr(p, "ds_tensor") for p in params)
        wrapper = engine.optimizer
        basic = getattr(engine, "basic_optimizer", None) or getattr(wrapper, "optimizer", None) or wrapper
        masters = []
        for name in MASTER_ATTRIBUTES:
            masters += _tensors_in(getattr(wrapper, name, None))
        states = [v for state in basic.state.values() for v in state.values() if torch.is_tensor(v)]
        categories = {
            "parameters": [p.ds_tensor if zero3 else p.data for p in params],
            "fp32_master": masters,
            "optimizer_state": states,
        }
        seen: list[tuple[int, int]] = []
        out = {"zero3_partitioned": zero3, "optimizer_wrapper": type(wrapper).__name__,
               "num_parameters": sum(getattr(p, "ds_numel", p.numel()) for p in params)}
        for name, tensors in categories.items():
            ranges = byte_ranges(tensors)
            before = union_bytes(seen)
            seen += ranges
            out[f"{name}_bytes"] = union_bytes(seen) - before
            out[f"{name}_raw_bytes"] = sum(b - a for a, b in ranges)  # before removing shared memory
        out["total_bytes"] = union_bytes(seen)
        return out


def model_state_bytes(num_params: int, stage: int, world_size: int, trained: bool, offload: bool = False,
                      gpus_per_node: int | None = None) -> float:
    """Bytes of model states per rank for a network of `num_params` (DeepSpeed's estimators for trained ones:
    16-bit weights and gradients, fp32 master weights and Adam moments, sharded by the stage; 16-bit weights, and
    under ZeRO-3 sharded, for frozen ones)."""
    if not trained:
        return 2.0 * num_params / (world_size if stage == 3 else 1)
    per_node = gpus_per_node or min(world_size, max(1, torch.cuda.device_count() or world_size))
    nodes = max(1, world_size // per_node)
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

        _deepspeed()
        _, gpu, _ = estimate_zero3_model_states_mem_needs(num_params, 0, per_node, nodes, cpu_offload=offload,
                                                          cpu_offload_params=False, zero_init=True)
        return float(gpu)
    if stage in (1, 2):
        from deepspeed.runtime.zero.stage_1_and_2 import (
            estimate_zero2_model_states_mem_needs,
        )

        _deepspeed()
        _, gpu = estimate_zero2_model_states_mem_needs(num_params, per_node, nodes, cpu_offload=offload)
        return float(gpu)
    return 16.0 * num_params  # ZeRO-0: everything on every rank


def build_trainable(module: torch.nn.Module, spec: RoleSpec, config: dict) -> Trainable:
    """A trained role, built in the order of the module docstring (a DeepSpeed engine under the hood)."""
    if hasattr(module, "gradient_checkpointing"):
        module.gradient_checkpointing = spec.gradient_checkpointing
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=spec.optim.lr, betas=tuple(spec.optim.betas), weight_decay=spec.optim.weight_decay, eps=spec.optim.eps
    )
    engine, _, _, _ = _deepspeed().initialize(model=module, optimizer=optimizer, config=config)
    return Trainable(spec.name, engine)


def build_frozen(model: torch.nn.Module, ds: DeepSpeedConfig, config: dict, device, dtype) -> torch.nn.Module:
    """A role only called under no_grad (the teacher): a plain module (ZeRO 0-2), or sharded by an optimizer-less
    ZeRO-3 engine, whose hooks gather the shards in each forward. Returns the module to call."""
    model.requires_grad_(False).eval()
    if ds.stage == 3 and ds.shard_teacher:
        engine, _, _, _ = _deepspeed().initialize(model=model, config=config)
        engine.eval()
        return engine.module
    return model.to(device=device, dtype=dtype)


def is_zero3_param(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def _local(p: torch.Tensor) -> torch.Tensor:
    """What this rank holds of a parameter: its ZeRO-3 shard, else the whole tensor."""
    return p.ds_tensor if is_zero3_param(p) else p.data


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


def consolidated_state_dict(checkpoint: Path, tag: str) -> dict[str, torch.Tensor]:
    """A role's full fp32 weights rebuilt from its ZeRO shards in a checkpoint folder, without a process group."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    _deepspeed()
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=tag)


class EMA:
    """Exponential moving average of a trained role's parameters, started as a copy at its first update at or
    after `start_step`.

    It averages the fp32 master weights (`Trainable.master_weights`), not the bf16 weights the forward uses:
    at a distillation learning rate most single updates are far below bf16's resolution and an average of
    rounded weights would lose them. Under ZeRO-3 every rank keeps the average of its own shard, so memory is
    sharded like the model and no gather is needed per update; `full_state_dict` assembles it. Otherwise every
    rank keeps a full fp32 copy (they are identical).
    """

    def __init__(self, role: Trainable, decay: float, start_step: int = 0):
        self.role, self.decay, self.start_step = role.name, decay, start_step
        self.started_at: int | None = None  # the step of the copy; None until then
        self._trainable = role
        module = role.module
        self.names = [n for n, p in module.named_parameters()]
        self.params = [p for _, p in module.named_parameters()]
        self.zero3 = any(is_zero3_param(p) for p in self.params)
        self.shadow = [w.detach().float().clone() for w in role.master_weights()]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """After an update of the role at `step`: copy the weights (the start), or shadow <- d * shadow + (1 - d) * w."""
        if step < self.start_step:
            return
        d = self.decay if self.started_at is not None else 0.0
        if self.started_at is None:
            self.started_at = step
        for s, w in zip(self.shadow, self._trainable.master_weights()):
            s.mul_(d).add_(w.float(), alpha=1 - d)

    def nonfinite(self) -> bool:
        """Collective: whether any averaged weight is inf or nan."""
        return any_rank(not all(bool(torch.isfinite(s).all()) for s in self.shadow))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the EMA (a shard under ZeRO-3), keyed by parameter name."""
        return {n: s for n, s in zip(self.names, self.shadow)}

    def load_state_dict(self, state: dict[str, torch.Tensor], started_at: int | None) -> None:
        missing = [n for n in self.names if n not in state]
        if missing:
            raise ValueError(f"EMA state lacks {len(missing)} parameters, e.g. {missing[0]}")
        for i, n in enumerate(self.names):
            self.shadow[i].copy_(state[n])
        self.started_at = started_at

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


# ---------------------------------------------------------------------------------------------------- memory accounting


def byte_ranges(tensors) -> list[tuple[int, int]]:
    """Byte ranges [start, end) the tensors occupy (whole storage for non-contiguous ones)."""
    out = []
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        if t.is_contiguous():
            start = t.data_ptr()
            out.append((start, start + t.numel() * t.element_size()))
        else:
            storage = t.untyped_storage()
            out.append((storage.data_ptr(), storage.data_ptr() + storage.nbytes()))
    return out


def union_bytes(intervals: list[tuple[int, int]]) -> int:
    """Bytes covered by byte ranges, overlaps counted once."""
    total, end = 0, None
    for a, b in sorted(intervals):
        if end is None or a >= end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


# Where DeepSpeed 0.19 keeps the fp32 master weights, by optimizer wrapper.
MASTER_ATTRIBUTES = (
    "fp32_partitioned_groups_flat",  # ZeRO-3 (DeepSpeedZeroOptimizer_Stage3): this rank's partition
    "single_partition_of_fp32_groups",  # ZeRO-1/2 (DeepSpeedZeroOptimizer): this rank's partition
    "fp32_groups_flat_partition",  # BF16_Optimizer: this rank's partition
    "fp32_groups_flat",  # FP16_Optimizer (fused): full copy
    "fp32_groups",  # FP16_UnfusedOptimizer (bf16 at ZeRO-0): full copy, a list of lists of tensors
)


def _tensors_in(value) -> list[torch.Tensor]:
    """Tensors in a tensor or (nested) list/tuple of tensors."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for item in value for t in _tensors_in(item)]
    return []
