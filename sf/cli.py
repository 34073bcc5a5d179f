"""Console entry points: sf-train, sf-export, sf-generate, sf-eval.

Every command checks its inputs and where it writes before any heavy work, and reports a user's mistake (a
missing or wrong-kind file, an unwritable output) as one line, `error: ...`, with a non-zero exit status
(SF_TRACEBACK=1 shows the traceback instead).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sf.io import one_line_errors, writable_dir


def train_main() -> None:
    """sf-train: Hydra-configured training (see `sf-train --help`)."""
    from sf.train import main

    main()


def eval_main() -> None:
    """sf-eval: score exported world models (oracle, world-FVD, NFE, drift); see `sf-eval --help`."""
    from sf.world.evaluate import main

    main()


def export_checkpoint(checkpoint: Path, out: Path, fmt: str = "sf") -> list[Path]:
    """Write every DiT role of a checkpoint (and its EMA) as standalone weights in `fmt`."""
    import torch
    from safetensors.torch import load_file

    from sf.checkpoint import saved_roles
    from sf.models.convert import read_checkpoint, save_state_dict
    from sf.models.dit import DiTConfig, VideoDiT

    roles, ema_name = saved_roles(checkpoint)
    dits = [name for name, arch in roles.items() if arch is None or "dim" in arch]
    if not dits:
        raise ValueError(f"{checkpoint} holds no DiT ({', '.join(roles)}); its export/ folder has the weights")
    written, configs = [], {}
    exported = checkpoint / "export"
    metadata = _export_metadata(checkpoint)
    for name in dits:
        if (exported / f"{name}.safetensors").exists():
            state, _, cfg = read_checkpoint(exported / f"{name}.safetensors")
        else:  # exports were switched off: rebuild from the DeepSpeed (ZeRO) states, no GPU or launcher needed
            from sf.distributed import consolidated_state_dict

            cfg = DiTConfig.from_dict(roles[name]) if roles[name] else _model_config(checkpoint, name)
            state = consolidated_state_dict(checkpoint, name)
        configs[name] = cfg
        written.append(save_state_dict(state, cfg, _target(out, name, fmt), fmt, metadata))
    if ema_name and (exported / f"{ema_name}.safetensors").exists():
        state, _, cfg = read_checkpoint(exported / f"{ema_name}.safetensors")
        written.append(save_state_dict(state, cfg, _target(out, ema_name, fmt), fmt, metadata))
    elif ema_name and (checkpoint / "ema").is_dir() and ema_name.removesuffix("_ema") in configs:
        cfg = configs[ema_name.removesuffix("_ema")]
        shapes = {n: p.shape for n, p in VideoDiT(cfg).to("meta").named_parameters()}
        shards = [load_file(str(p)) for p in sorted((checkpoint / "ema").glob("rank_*.safetensors"))]
        state = {n: torch.cat([s[n].flatten() for s in shards])[: shape.numel()].view(shape) if shards[0][n].shape != shape
                 else shards[0][n] for n, shape in shapes.items()}
        written.append(save_state_dict(state, cfg, _target(out, ema_name, fmt), fmt, metadata))
    return written


def _export_metadata(checkpoint: Path) -> dict[str, str]:
    """What an exported file records: where it came from and the run's config (sf-generate reads it)."""
    from sf.config import RUN_CONFIG_KEY

    metadata = {"source": str(checkpoint)}
    if (checkpoint / "config.yaml").exists():
        metadata[RUN_CONFIG_KEY] = (checkpoint / "config.yaml").read_text()
    return metadata


def _target(out: Path, name: str, fmt: str) -> Path:
    return out / (f"{name}.safetensors" if fmt == "sf" else name)


def _model_config(checkpoint: Path, name: str):
    """The DiT config of a role, read from the checkpoint's resolved config.yaml."""
    from sf.config import read_run_config
    from sf.models.dit import dit_config

    cfg = read_run_config(checkpoint)
    if name == "critic":
        net = cfg.teacher if cfg.critic.init_from_teacher else cfg.critic
    else:  # the student of distill and ode, the network task=teacher trains
        net = cfg.model
    return dit_config(net.flavor, **net.overrides)


@one_line_errors
def export_main(argv=None) -> None:
    """sf-export: standalone safetensors (or diffusers / original-Wan folders) from a training checkpoint."""
    parser = argparse.ArgumentParser(prog="sf-export", description=export_main.__doc__)
    parser.add_argument("path", type=Path, help="a checkpoint folder (run/checkpoints/step_N) or a run dir (newest)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <checkpoint>/export_<fmt>)")
    parser.add_argument("--format", choices=["sf", "diffusers", "wan"], default="sf",
                        help="sf: one file with its config; diffusers / wan: folders other tools load")
    args = parser.parse_args(argv)
    from sf.checkpoint import resolve_checkpoint

    checkpoint = resolve_checkpoint(args.path)
    out = writable_dir(args.out or checkpoint / f"export_{args.format}")
    for path in export_checkpoint(checkpoint, out, args.format):
        print(path)


def generate_main(argv=None) -> None:
    """sf-generate: stream videos from a trained causal student (see `sf-generate --help`)."""
    from sf.generate import main

    main(argv)


if __name__ == "__main__":
    sys.exit(train_main())
