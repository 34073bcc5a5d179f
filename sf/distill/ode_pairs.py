"""ODE pairs for the student's regression init: write them, read them back.

The teacher integrates its guided flow ODE from noise with many steps (48, shift 8, CFG) and the latents are
kept at the sigmas of the student's step list, sigma = 1 (the initial noise) first. One webdataset sample per
prompt:

    txt                 the prompt
    json                {"index", "seed", "sigmas", "num_steps", "shift", "cfg_scale", "negative_prompt"}
    ode.safetensors     {"trajectory": (K, F, C, H, W), "clean": (F, C, H, W), "sigmas": (K,) fp32,
                         "features": (l, D), "mask": (l,) bool}   the text features the teacher saw

(the text features are cut after the last real token, as in prompt shards, so training needs no text encoder.)

`decode_ode_sample` reads one back (``task=ode`` holds them in a `sf.data.bank.SampleBank`): the inputs of
`ode_regression_loss`.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from sf.data.prompts import check_embedding, trimmed_rows
from sf.data.shards import CorruptSample, ShardWriter, decode_tensors, decode_text
from sf.diffusion.flow import NUM_TRAIN_TIMESTEPS
from sf.diffusion.sample import guided_net, sample_teacher
from sf.rng import SampleNoise, seed_for

ODE = "ode.safetensors"  # tar member holding a sample's trajectory
ODE_SHIFT = 8.0  # the reference's ODE-pair sampling shift (training uses 5)

FlowNet = Callable[..., Tensor]
TextFn = Callable[[list[str]], tuple[Tensor, Tensor]]  # prompts -> features (B, L, D), mask (B, L)


# ----------------------------------------------------------------------------------------------------------- writing


@torch.no_grad()
def write_ode_pairs(
    teacher: FlowNet,
    text_encoder: TextFn,
    prompts: Sequence[str],
    out_dir: str,
    *,
    latent_shape: Sequence[int],
    student_timesteps: Sequence[float] | Tensor,
    num_steps: int = 48,
    shift: float = ODE_SHIFT,
    cfg_scale: float = 3.0,
    negative_prompt: str = "",
    batch_size: int = 4,
    seed: int = 0,
    samples_per_shard: int = 256,
    dtype: torch.dtype = torch.float16,
    device: torch.device | str | None = None,
    prefix: str = "ode",
    progress: bool = True,
    indices: Sequence[int] | None = None,
) -> list[str]:
    """Sample the guided teacher for every prompt and write its trajectory at the student's sigmas; returns shards.

    `student_timesteps` are the student's network t (e.g. ``RolloutConfig().timesteps()``), strictly decreasing
    from 1000. Prompt i starts from noise seeded by (seed, i) alone, so batching does not change a sample;
    `indices` are the prompts' indices i (default 0, 1, ...: ranks that split one prompt list pass their
    share's, and the pairs are those one process would write). Latents are integrated in fp32 on `device`
    (default: the teacher's) and stored as `dtype`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(latent_shape) != 4:
        raise ValueError(f"latent_shape must be (F, C, H, W), got {tuple(latent_shape)}")
    sigmas = student_sigmas(student_timesteps)
    device = torch.device(device) if device is not None else _device_of(teacher)
    teacher = _in_own_dtype(teacher)
    prompts = list(prompts)
    indices = list(range(len(prompts))) if indices is None else list(indices)
    if len(indices) != len(prompts):
        raise ValueError(f"{len(indices)} indices for {len(prompts)} prompts")
    negative, _ = text_encoder([negative_prompt])  # (1, L, D): once for every batch
    negative = negative.to(device, torch.float32)
    meta = {"seed": seed, "sigmas": sigmas, "num_steps": num_steps, "shift": shift, "cfg_scale": cfg_scale,
            "negative_prompt": negative_prompt}

    with ShardWriter(out_dir, prefix, samples_per_shard, total=len(prompts), progress=progress) as writer:
        for start in range(0, len(prompts), batch_size):
            batch = prompts[start:start + batch_size]
            batch_indices = indices[start:start + len(batch)]
            features, mask = text_encoder(batch)  # (B, L, D), (B, L)
            cached = trimmed_rows(features, mask, features.dtype)  # as the encoder gave them: training sees the same
            features = features.to(device, torch.float32)
            guided = guided_net(teacher, {"context": features},
                                {"context": negative.expand(len(batch), -1, -1)}, cfg_scale)
            noise = SampleNoise([seed_for(seed, "ode", i) for i in batch_indices]).randn(latent_shape).to(device)
            sample = sample_teacher(guided, noise, num_steps=num_steps, shift=shift, record_sigmas=sigmas)
            for i, prompt, trajectory, clean, text in zip(batch_indices, batch, sample.trajectory, sample.x0, cached):
                writer.write({
                    "__key__": f"{i:09d}",
                    "txt": prompt,
                    "json": {"index": i, **meta},
                    ODE: {"trajectory": trajectory.to(dtype),  # (K, F, C, H, W)
                          "clean": clean.to(dtype),  # (F, C, H, W)
                          "sigmas": torch.tensor(sigmas, dtype=torch.float32), **text},
                })
    return writer.paths


def student_sigmas(timesteps: Sequence[float] | Tensor) -> list[float]:
    """Sigmas t / 1000 of a student step list: strictly decreasing in (0, 1], starting at 1 (the noise)."""
    t = torch.as_tensor(timesteps, dtype=torch.float64).flatten()
    if t.numel() == 0:
        raise ValueError("student_timesteps must not be empty")
    if t[0] != NUM_TRAIN_TIMESTEPS or t.min() <= 0:
        raise ValueError(f"student_timesteps must start at {NUM_TRAIN_TIMESTEPS} and stay > 0, got {t.tolist()}")
    if not bool((t[1:] < t[:-1]).all()):
        raise ValueError(f"student_timesteps must be strictly decreasing, got {t.tolist()}")
    return (t / NUM_TRAIN_TIMESTEPS).tolist()


def _in_own_dtype(net: FlowNet) -> FlowNet:
    """A network whose parameters are not fp32 (a bf16 teacher) called in their dtype, answering in fp32: the ODE
    is integrated in fp32 whatever the network computes in."""
    parameters = getattr(net, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    if first is None or first.dtype == torch.float32:
        return net
    dtype = first.dtype
    return lambda x, t, context, **kw: net(x.to(dtype), t, context.to(dtype), **kw).float()


def _device_of(net: Any) -> torch.device:
    """Where a network's parameters live; plain callables run on the CPU."""
    parameters = getattr(net, "parameters", None)
    first = next(parameters(), None) if callable(parameters) else None
    return first.device if first is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------------------- reading


def decode_ode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw sample -> {"key", "prompt", "meta", "trajectory" (K, F, C, H, W), "clean", "sigmas"}, all fp32, and the
    cached text {"features" (l, D), "mask" (l,)} when the pair has it.

    Raises CorruptSample on missing members, bad bytes, inconsistent shapes or non-finite values.
    """
    if "txt" not in sample or ODE not in sample:
        raise CorruptSample(f"an ODE sample needs txt and {ODE}, got {sorted(sample)}")
    prompt = decode_text(sample)
    try:
        meta = json.loads(bytes(sample["json"])) if "json" in sample else {}
    except ValueError as exn:  # bad json or utf-8
        raise CorruptSample(f"bad json ({exn})") from exn
    tensors = decode_tensors(sample[ODE])
    trajectory, clean, sigmas = (tensors.get(name) for name in ("trajectory", "clean", "sigmas"))
    if trajectory is None or clean is None or sigmas is None:
        raise CorruptSample(f"{ODE} needs trajectory, clean and sigmas, got {sorted(tensors)}")
    if trajectory.ndim != 5 or trajectory.shape[1:] != clean.shape or sigmas.shape != trajectory.shape[:1]:
        raise CorruptSample(f"inconsistent shapes: trajectory {tuple(trajectory.shape)}, clean {tuple(clean.shape)}, "
                            f"sigmas {tuple(sigmas.shape)}")
    trajectory, clean, sigmas = trajectory.float(), clean.float(), sigmas.float()
    if not (torch.isfinite(trajectory).all() and torch.isfinite(clean).all()):
        raise CorruptSample("trajectory or clean contains inf or nan")
    decoded = {"key": sample["__key__"], "prompt": prompt, "meta": meta, "trajectory": trajectory, "clean": clean,
               "sigmas": sigmas}
    if "features" in tensors:
        decoded["features"], decoded["mask"] = check_embedding(tensors)
    return decoded
