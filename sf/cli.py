"""Console entry points: sf-train, sf-export, sf-generate, sf-eval."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path



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
        raise SystemExit(f"error: {path} is neither a complete checkpoint nor a run dir with one")
    return latest


def export_checkpoint(checkpoint: Path, out: Path, fmt: str = "sf") -> list[Path]:
    """Write generator, generator_ema and critic of a checkpoint as standalone weights in `fmt`."""
    import torch
    from safetensors.torch import load_file

    from sf.models.convert import read_checkpoint, save_state_dict
    from sf.models.dit import VideoDiT

    written = []
    exported = checkpoint / "export"
    generator_cfg = None
    for name in ("generator", "critic"):
        if (exported / f"{name}.safetensors").exists():
            state, _, cfg = read_checkpoint(exported / f"{name}.safetensors")
        else:  # exports were switched off: rebuild from the DeepSpeed (ZeRO) states, no GPU or launcher needed
            from sf.distributed import consolidated_state_dict

            cfg = _model_config(checkpoint, name)
            state = consolidated_state_dict(checkpoint, name)
        generator_cfg = cfg if name == "generator" else generator_cfg
        written.append(save_state_dict(state, cfg, _target(out, name, fmt), fmt, {"source": str(checkpoint)}))
    if (exported / "generator_ema.safetensors").exists():
        state, _, cfg = read_checkpoint(exported / "generator_ema.safetensors")
        written.append(save_state_dict(state, cfg, _target(out, "generator_ema", fmt), fmt, {"source": str(checkpoint)}))
    elif (checkpoint / "ema").is_dir():
        shapes = {n: p.shape for n, p in VideoDiT(generator_cfg).to("meta").named_parameters()}
        shards = [load_file(str(p)) for p in sorted((checkpoint / "ema").glob("rank_*.safetensors"))]
        state = {n: torch.cat([s[n].flatten() for s in shards])[: shape.numel()].view(shape) if shards[0][n].shape != shape
                 else shards[0][n] for n, shape in shapes.items()}
        written.append(save_state_dict(state, generator_cfg, _target(out, "generator_ema", fmt), fmt))
    return written


def _target(out: Path, name: str, fmt: str) -> Path:
    return out / (f"{name}.safetensors" if fmt == "sf" else name)


def _model_config(checkpoint: Path, name: str):
    """The DiT config of a role, read from the checkpoint's resolved config.yaml."""
    from sf.config import read_run_config
    from sf.models.dit import dit_config

    cfg = read_run_config(checkpoint)
    net = cfg.model if name == "generator" else (cfg.teacher if cfg.critic.init_from_teacher else cfg.critic)
    return dit_config(net.flavor, **net.overrides)


def export_main(argv=None) -> None:
    """sf-export: standalone safetensors (or diffusers / original-Wan folders) from a training checkpoint."""
    parser = argparse.ArgumentParser(prog="sf-export", description=export_main.__doc__)
    parser.add_argument("path", type=Path, help="a checkpoint folder (run/checkpoints/step_N) or a run dir (newest)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: <checkpoint>/export_<fmt>)")
    parser.add_argument("--format", choices=["sf", "diffusers", "wan"], default="sf",
                        help="sf: one file with its config; diffusers / wan: folders other tools load")
    args = parser.parse_args(argv)
    checkpoint = _resolve_checkpoint(args.path)
    out = args.out or checkpoint / f"export_{args.format}"
    for path in export_checkpoint(checkpoint, out, args.format):
        print(path)


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

    net = load_dit(args.weights).eval()
    text = OpenCLIPTextEncoder(args.text_model, args.text_weights, max_length=77)
    rollout = RolloutConfig(num_frames=args.num_frames, frames_per_block=args.frames_per_block,
                            local_attn_frames=args.local_attn_frames, sink_frames=args.sink_frames)
    args.out.mkdir(parents=True, exist_ok=True)
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
