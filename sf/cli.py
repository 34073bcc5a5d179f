"""Console entry points: sf-train, sf-export, sf-generate, sf-eval.

Every command checks its inputs and where it writes before any heavy work, and reports a user's mistake (a
missing or wrong-kind file, an unwritable output) as one line, `error: ...`, with a non-zero exit status
(SF_TRACEBACK=1 shows the traceback instead).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from sf.io import existing_file, one_line_errors, writable_dir


def train_main() -> None:
    """sf-train: Hydra-configured training (see `sf-train --help`)."""
    from sf.train import main

    main()


def eval_main() -> None:
    """sf-eval: score exported world models (oracle, world-FVD, NFE, drift); see `sf-eval --help`."""
    from sf.world.evaluate import main

    main()


def _resolve_checkpoint(path: Path) -> Path:
    """A checkpoint folder, or the newest complete one of a run dir."""
    from sf.checkpoint import COMPLETE, latest_checkpoint

    if (path / COMPLETE).exists():
        return path
    latest = latest_checkpoint(path)
    if latest is None:
        raise FileNotFoundError(f"{path} is neither a complete checkpoint nor a run dir with one")
    return latest


def export_checkpoint(checkpoint: Path, out: Path, fmt: str = "sf") -> list[Path]:
    """Write every DiT role of a checkpoint (and its EMA) as standalone weights in `fmt`."""
    import torch
    from safetensors.torch import load_file

    from sf.models.convert import read_checkpoint, save_state_dict
    from sf.models.dit import DiTConfig, VideoDiT

    roles, ema_name = _saved_roles(checkpoint)
    dits = [name for name, arch in roles.items() if arch is None or "dim" in arch]
    if not dits:
        raise ValueError(f"{checkpoint} holds no DiT ({', '.join(roles)}); its export/ folder has the weights")
    written, configs = [], {}
    exported = checkpoint / "export"
    for name in dits:
        if (exported / f"{name}.safetensors").exists():
            state, _, cfg = read_checkpoint(exported / f"{name}.safetensors")
        else:  # exports were switched off: rebuild from the DeepSpeed (ZeRO) states, no GPU or launcher needed
            from sf.distributed import consolidated_state_dict

            cfg = DiTConfig.from_dict(roles[name]) if roles[name] else _model_config(checkpoint, name)
            state = consolidated_state_dict(checkpoint, name)
        configs[name] = cfg
        written.append(save_state_dict(state, cfg, _target(out, name, fmt), fmt, {"source": str(checkpoint)}))
    if ema_name and (exported / f"{ema_name}.safetensors").exists():
        state, _, cfg = read_checkpoint(exported / f"{ema_name}.safetensors")
        written.append(save_state_dict(state, cfg, _target(out, ema_name, fmt), fmt, {"source": str(checkpoint)}))
    elif ema_name and (checkpoint / "ema").is_dir() and ema_name.removesuffix("_ema") in configs:
        cfg = configs[ema_name.removesuffix("_ema")]
        shapes = {n: p.shape for n, p in VideoDiT(cfg).to("meta").named_parameters()}
        shards = [load_file(str(p)) for p in sorted((checkpoint / "ema").glob("rank_*.safetensors"))]
        state = {n: torch.cat([s[n].flatten() for s in shards])[: shape.numel()].view(shape) if shards[0][n].shape != shape
                 else shards[0][n] for n, shape in shapes.items()}
        written.append(save_state_dict(state, cfg, _target(out, ema_name, fmt), fmt))
    return written


def _saved_roles(checkpoint: Path) -> tuple[dict[str, dict | None], str | None]:
    """The trained roles of a checkpoint with their architectures (None when not recorded), and its EMA's name."""
    state_file = checkpoint / "trainer" / "state.json"
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{state_file}: not readable ({e})") from None
    if state.get("architectures"):
        return dict(state["architectures"]), state.get("ema")
    return {"generator": None, "critic": None}, "generator_ema"  # written before roles were recorded: distill


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
    checkpoint = _resolve_checkpoint(args.path)
    out = writable_dir(args.out or checkpoint / f"export_{args.format}")
    for path in export_checkpoint(checkpoint, out, args.format):
        print(path)


@one_line_errors
def generate_main(argv=None) -> None:
    """sf-generate: stream videos from an exported causal student, chunk by chunk over the KV cache."""
    parser = argparse.ArgumentParser(prog="sf-generate", description=generate_main.__doc__)
    parser.add_argument("weights", type=Path, help="exported generator (.safetensors, diffusers or Wan folder)")
    parser.add_argument("--prompt", action="append", required=True, help="a prompt (repeat for several videos)")
    parser.add_argument("--num-frames", type=int, default=21, help="latent frames to generate")
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--local-attn-frames", type=int, default=None, help="rolling window (unbounded length)")
    parser.add_argument("--sink-frames", type=int, default=0)
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(4, 4))
    parser.add_argument("--text-model", default="sf-tiny-clip")
    parser.add_argument("--text-weights", default=None, help="local open_clip weights file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("samples"))
    args = parser.parse_args(argv)

    import torch

    from sf.distill.rollout import RolloutConfig, generate
    from sf.models.convert import load_dit
    from sf.models.text import OpenCLIPTextEncoder
    from sf.video import latent_preview, save_video

    rollout = RolloutConfig(num_frames=args.num_frames, frames_per_block=args.frames_per_block,
                            local_attn_frames=args.local_attn_frames, sink_frames=args.sink_frames)
    writable_dir(args.out)
    net = load_dit(existing_file(args.weights, "weights")).eval()
    text = OpenCLIPTextEncoder(args.text_model, args.text_weights, max_length=77)
    for i, prompt in enumerate(args.prompt):
        context, _ = text([prompt])
        rng = torch.Generator().manual_seed(args.seed + i)
        noise = torch.randn((1, args.num_frames, net.cfg.in_channels, *args.latent_hw), generator=rng)
        with torch.no_grad():
            video = generate(net, net.new_cache, noise, context, rollout, rng=rng)
        torch.save(video, args.out / f"video_{i:03d}.pt")
        path = save_video(latent_preview(video[0]), args.out / f"video_{i:03d}.mp4")
        print(json.dumps({"prompt": prompt, "latents": str(args.out / f"video_{i:03d}.pt"), "preview": str(path)}))


if __name__ == "__main__":
    sys.exit(train_main())
