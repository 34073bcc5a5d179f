"""Resumable training checkpoints and their safetensors exports.

    run_dir/checkpoints/step_000100/
        generator/ critic/                each trained role's DeepSpeed state (weights + optimizer, sharded per rank)
        ema/rank_00000.safetensors        the EMA (a shard per rank under ZeRO-3; its start step in the metadata)
        trainer/rank_00000.safetensors    every rank's RNG states; trainer/state.json: step, data positions, ...
        export/generator.safetensors      plain weights + model config, loadable without DeepSpeed
        export/generator_ema.safetensors  (sf.models.convert.load_dit reads them)
        export/critic.safetensors         (other tasks export their own roles: teacher, vae, ...)
        config.yaml                       the resolved config that built the run
        COMPLETE

A checkpoint is written into `step_N.tmp/` and renamed only once every rank has finished, so a kill at any
moment leaves the previous checkpoint intact; unfinished `.tmp` folders are ignored and cleaned up.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sf import distributed

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
COMPLETE = "COMPLETE"


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / COMPLETE).exists()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name)[1]))


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    """This process's global RNG states (torch CPU/CUDA, python, numpy) as tensors + JSON-able values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_keys.astype(np.int64))}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"python": [py_version, list(py_state), py_gauss], "numpy": [np_name, np_pos, np_has_gauss, np_gauss]}
    return {"tensors": tensors, "meta": meta}


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])
    py_version, py_state, py_gauss = meta["python"]
    random.setstate((py_version, tuple(py_state), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = meta["numpy"]
    np.random.set_state((np_name, tensors["numpy_keys"].numpy().astype(np.uint32), np_pos, np_has_gauss, np_gauss))


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    roles: dict[str, distributed.Trainable],
    ema: distributed.EMA | None,
    ema_name: str,
    trainer_state: dict,
    exporter: Callable[[str, dict, Path, int], None],
    config_yaml: str,
    rank: int,
    keep_last: int,
    export: bool = True,
) -> Path:
    """Write checkpoint `step` collectively (every rank calls it) and prune old ones; returns its folder."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:06d}"
    tmp = root / f"step_{step:06d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()

    for role in roles.values():
        role.save(tmp)
    rank_file = f"rank_{rank:05d}.safetensors"
    if ema is not None:
        (tmp / "ema").mkdir(exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in ema.state_dict().items()}, str(tmp / "ema" / rank_file),
                  metadata={"started_at": json.dumps(ema.started_at)})
    rng = rng_state()
    (tmp / "trainer").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in rng["tensors"].items()}, str(tmp / "trainer" / rank_file),
              metadata={"rng": json.dumps(rng["meta"])})
    all_states = distributed.all_gather_object(trainer_state)

    exports = {}
    if export:
        exports = {name: role.full_state_dict(rank) for name, role in roles.items()}
        if ema is not None:
            exports[ema_name] = ema.full_state_dict(rank)
    if rank == 0:
        for name, state in exports.items():
            exporter(name, state, tmp / "export" / f"{name}.safetensors", step)
        (tmp / "trainer" / "state.json").write_text(json.dumps({"step": step, "ranks": all_states}, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
    distributed.barrier()
    if rank == 0:
        (tmp / COMPLETE).write_text(f"{step}\n")
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(run_dir, keep_last)
    distributed.barrier()
    return final


def _prune(run_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` complete checkpoints (0 keeps all); remove stale unfinished ones."""
    root = checkpoint_root(run_dir)
    for stale in root.glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(run_dir)
    if keep_last > 0:
        for old in complete[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(path: Path, *, roles: dict[str, distributed.Trainable], ema: distributed.EMA | None, rank: int,
                    world_size: int) -> dict:
    """Restore roles, EMA and this rank's RNG from `path`; returns this rank's trainer state (with `step`)."""
    state = json.loads((path / "trainer" / "state.json").read_text())
    if len(state["ranks"]) != world_size:
        raise ValueError(
            f"{path} was written by {len(state['ranks'])} ranks, this job has {world_size}: resume with the same "
            f"world size, or start a new run from {path / 'export'}"
        )
    for role in roles.values():
        role.load(path)
    rank_file = f"rank_{rank:05d}.safetensors"
    if ema is not None:
        with safe_open(str(path / "ema" / rank_file), framework="pt") as f:
            started_at = json.loads((f.metadata() or {}).get("started_at", "null"))
        ema.load_state_dict(load_file(str(path / "ema" / rank_file)), started_at)
    with safe_open(str(path / "trainer" / rank_file), framework="pt") as f:
        meta = json.loads(f.metadata()["rng"])
    set_rng_state(load_file(str(path / "trainer" / rank_file)), meta)
    return {"step": state["step"], **state["ranks"][rank]}
