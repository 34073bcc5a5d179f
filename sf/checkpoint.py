"""Resumable training checkpoints and their safetensors exports.

    run_dir/checkpoints/step_000100/
        generator/ critic/                each trained role's DeepSpeed state (weights + optimizer, sharded per rank)
        ema/rank_00000.safetensors        the EMA (a shard per rank under ZeRO-3; its start step in the metadata)
        trainer/rank_00000.safetensors    every rank's RNG states; trainer/state.json: step, data positions, ...
        export/generator.safetensors      plain weights + model config, loadable without DeepSpeed
        export/generator_ema.safetensors  (sf.models.convert.load_dit reads them)
        export/critic.safetensors         (other tasks export their own roles: teacher, vae, ...)
        config.yaml                       the resolved config that built the run
        MANIFEST.json                     size and blake2b hash of every file above, recorded at commit
        COMPLETE

A checkpoint is written into `step_N.tmp/` and renamed only once every rank has finished, so a kill at any
moment leaves the previous checkpoint intact; unfinished `.tmp` folders are ignored and cleaned up. Before a
checkpoint is trusted its files are checked against its manifest (`resume_point`): a damaged one is moved aside
to `step_N.damaged` for inspection, with a one-line warning, and the newest intact one is used instead.
"""

from __future__ import annotations

import hashlib
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
MANIFEST = "MANIFEST.json"
DAMAGED = ".damaged"  # suffix of a checkpoint folder set aside because it failed verification


class CheckpointMismatch(ValueError):
    """A checkpoint that is intact but cannot be resumed by this job (other networks, other world size)."""


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


def resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one of a run dir."""
    path = Path(path)
    if (path / COMPLETE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run dir with one")
    return latest


def saved_roles(checkpoint: Path) -> tuple[dict[str, dict | None], str | None]:
    """The trained roles of a checkpoint with their architectures (None when not recorded), and its EMA's name."""
    state_file = checkpoint / "trainer" / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_file}: not readable ({e})") from None
    if state.get("architectures"):
        return dict(state["architectures"]), state.get("ema")
    return {"generator": None, "critic": None}, "generator_ema"  # written before roles were recorded: distill


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
    architectures: dict | None = None,
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
        state = {"step": step, "ranks": all_states, "architectures": architectures or {},
                 "ema": ema_name if ema is not None else None}
        (tmp / "trainer" / "state.json").write_text(json.dumps(state, indent=1))
        (tmp / "config.yaml").write_text(config_yaml)
    distributed.barrier()
    write_manifest(tmp, rank)
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
                    world_size: int, architectures: dict | None = None) -> dict:
    """Restore roles, EMA and this rank's RNG from `path`; returns this rank's trainer state (with `step`).

    CheckpointMismatch (one line) when the checkpoint was written by another world size or for other networks.
    """
    state = json.loads((path / "trainer" / "state.json").read_text())
    if len(state["ranks"]) != world_size:
        raise CheckpointMismatch(
            f"{path} was written by {len(state['ranks'])} ranks, this job has {world_size}: resume with the same "
            f"world size, or start a new run from {path / 'export'}"
        )
    check_architectures(path, state.get("architectures") or {}, architectures or {})
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


def check_architectures(path: Path, saved: dict, current: dict) -> None:
    """The networks of the job must be those the checkpoint holds (else one line naming the first difference)."""
    for role in sorted(set(saved) | set(current)):
        if role not in saved or role not in current:
            raise CheckpointMismatch(f"{path} holds roles {sorted(saved)}, this job trains {sorted(current)}: "
                                     f"resume with the same task, or start a new run dir")
        diff = {k: (saved[role].get(k), current[role].get(k)) for k in sorted(set(saved[role]) | set(current[role]))
                if saved[role].get(k) != current[role].get(k)}
        if diff:
            key, (was, now) = next(iter(diff.items()))
            more = f" (and {len(diff) - 1} more fields)" if len(diff) > 1 else ""
            raise CheckpointMismatch(f"{path} holds a {role} with {key}={was}, this job's has {key}={now}{more}: "
                                     f"resume with the config that wrote it (its config.yaml), or start a new run dir")


# ---------------------------------------------------------------------------------------------------- integrity


def _files(folder: Path) -> list[str]:
    """Every file under a checkpoint folder, relative, sorted (the manifest and COMPLETE marker excluded)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and p.name not in (MANIFEST, COMPLETE))


def _digest(path: Path) -> str:
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, rank: int) -> None:
    """Collective: every rank hashes its share of the files (file i on rank i mod world), rank 0 writes them all."""
    files = _files(folder)
    world = distributed.world_size()
    mine = {name: [(folder / name).stat().st_size, _digest(folder / name)] for name in files[rank::world]}
    parts = distributed.all_gather_object(mine)
    if rank == 0:
        manifest = {name: entry for part in parts for name, entry in part.items()}
        (folder / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
    distributed.barrier()


def damage(folder: Path, rank: int) -> str | None:
    """Collective: what is wrong with a complete checkpoint, as a short phrase naming the first bad file, or None.

    Sizes are checked on rank 0, hashes on every rank (a share each). A checkpoint without a manifest (written
    by an older sf) is trusted as it is.
    """
    problem = None
    if not (folder / MANIFEST).exists():
        return None
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest, problem = {}, f"{MANIFEST} unreadable"
    names = sorted(manifest)
    if problem is None and rank == 0:
        for name in names:
            path = folder / name
            if not path.is_file():
                problem = f"{name} missing"
                break
            if path.stat().st_size != manifest[name][0]:
                problem = f"{name} has {path.stat().st_size} bytes, {manifest[name][0]} were written"
                break
    problem = distributed.broadcast_object(problem)
    if problem is None:
        world = distributed.world_size()
        mine = next((f"{name} differs from what was written (hash)" for name in names[rank::world]
                     if _digest(folder / name) != manifest[name][1]), None)
        problem = next((p for p in distributed.all_gather_object(mine) if p), None)
    return problem


def resume_point(run_dir: Path, rank: int, warn: Callable[[str], None]) -> Path | None:
    """Collective: the newest complete checkpoint that passes verification; damaged newer ones are moved aside to
    `step_N.damaged` (rank 0) with a warning each."""
    candidates = distributed.broadcast_object([str(p) for p in list_checkpoints(run_dir)])
    for candidate in reversed(candidates):
        path = Path(candidate)
        problem = damage(path, rank)
        if problem is None:
            return path
        if rank == 0:
            aside = path.with_name(path.name + DAMAGED)
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
            older = [Path(c).name for c in candidates if Path(c) != path and int(_STEP_DIR.match(Path(c).name)[1])
                     < int(_STEP_DIR.match(path.name)[1])]
            fallback = f"resuming from {older[-1]}" if older else "no older checkpoint: starting from step 0"
            warn(f"checkpoint {path.name} is damaged ({problem}); moved to {aside.name} for inspection, {fallback}")
        distributed.barrier()
    return None
