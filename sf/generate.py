"""sf-generate: stream videos from a trained causal student, chunk by chunk over its KV cache, each chunk decoded
through the VAE's causal decoder as soon as it is denoised and appended to an mp4.

    sf-generate outputs/wan/run --prompt "a red fox in the snow" --out fox.mp4
    sf-generate outputs/wan/run --prompt-file prompts.txt --out samples/video.mp4 --num-frames 42 --seed 3
    sf-generate self_forcing_dmd.pt --wan Wan2.1-T2V-1.3B --prompt "..." --out a.mp4   # bare weights

Everything the student was trained with is read from its run: the text encoder (with the run's cached prompt
table), the VAE, the rollout (step list, chunking, cache window), the latent size and the precision. A run dir
(its newest complete checkpoint), a checkpoint folder, or a weights file sf-train / sf-export wrote (they carry
the run's config) all name a run; the EMA weights are used when the run exported them (with exports off, the
generator's ZeRO shards are consolidated: the raw weights, not the EMA). Weights that carry no run
(another project's) take the text encoder and VAE of a Wan model directory (`--wan`), or an open_clip tower, and
the rollout and latent size from the flags.

Longer than training: `--num-frames` beyond the trained length rolls the KV cache over a window of the trained
length (`--window` to choose), so memory and time per chunk stay constant. Each video prints one JSON line:
first-chunk latency and frames per second, with and without decoding.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from sf.io import existing_file, one_line_errors, writable_dir

WAN_LATENT_HW = (60, 104)  # 480 x 832 pixels through the Wan VAE's 8x spatial compression


@dataclass
class Run:
    """Where a student comes from: its weights (None: rebuild them from a checkpoint's ZeRO states) and its run."""

    weights: Path | None
    checkpoint: Path | None
    cfg: object | None  # the run's TrainConfig; None for bare weights


def find_run(path: Path) -> Run:
    """The student weights and run config that `path` (run dir, checkpoint, weights file or folder) names."""
    from sf.checkpoint import (
        COMPLETE,
        latest_checkpoint,
        resolve_checkpoint,
        saved_roles,
    )
    from sf.config import RUN_CONFIG_KEY, parse_run_config, read_run_config
    from sf.models.convert import read_weights_metadata

    if path.is_dir() and ((path / COMPLETE).exists() or latest_checkpoint(path) is not None):
        checkpoint = resolve_checkpoint(path)
        roles, ema = saved_roles(checkpoint)
        if "generator" not in roles:
            raise ValueError(f"{checkpoint} holds no causal student (its roles: {', '.join(roles)}); sf-generate "
                             f"streams the generator of task=distill or task=ode")
        for name in (ema, "generator"):
            if name and (checkpoint / "export" / f"{name}.safetensors").exists():
                return Run(checkpoint / "export" / f"{name}.safetensors", checkpoint, read_run_config(checkpoint))
        return Run(None, checkpoint, read_run_config(checkpoint))
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (a run dir, checkpoint or weights file)")
    metadata = read_weights_metadata(path)
    if RUN_CONFIG_KEY in metadata:
        cfg = parse_run_config(metadata[RUN_CONFIG_KEY], f"{path} (its run config)")
    elif path.is_file() and (path.parent.parent / "config.yaml").exists():  # <checkpoint>/export/<name>.safetensors
        cfg = read_run_config(path.parent.parent)
    else:
        cfg = None
    return Run(path, None, cfg)


def bare_config(args: argparse.Namespace):
    """The config of a run that does not exist: weights from elsewhere, text and VAE from --wan or open_clip."""
    from sf.config import TeacherConfig, TextConfig, TrainConfig
    from sf.data.prompts import PromptDataConfig
    from sf.distill.rollout import RolloutConfig
    from sf.models.vae import CodecConfig
    from sf.tasks.distill import DistillTask

    height, width = args.latent_hw or (WAN_LATENT_HW if args.wan else (4, 4))
    rollout = RolloutConfig(frames_per_block=args.frames_per_block, num_frames=args.num_frames or 21,
                            sink_frames=args.sink_frames)
    if args.wan:
        text, codec = TextConfig(kind="umt5", pretrained=str(args.wan)), CodecConfig(kind="auto")
    else:
        text = TextConfig(kind="open_clip", model_name=args.text_model, pretrained=args.text_weights)
        codec = CodecConfig(kind="identity")
    if args.codec:
        codec = CodecConfig(kind="wan", checkpoint=str(args.codec))
    return TrainConfig(task=DistillTask(latent_height=height, latent_width=width, rollout=rollout),
                       teacher=TeacherConfig(checkpoint=str(args.wan) if args.wan else None), text=text, codec=codec,
                       data=PromptDataConfig(shards=""))


def streaming_rollout(rollout, num_frames: int, window: int | None):
    """The run's rollout for a video of `num_frames` latent frames: beyond the trained length without a window of
    its own, the cache rolls over `window` frames (default: the trained length)."""
    trained = rollout.num_frames
    if window is None and num_frames > trained and rollout.local_attn_frames is None:
        window = trained
    if window is not None:
        rollout = dataclasses.replace(rollout, local_attn_frames=window)
    return dataclasses.replace(rollout, num_frames=num_frames)


def load_student(run: Run, device: torch.device, dtype: torch.dtype):
    """The causal student of a run, built without a random init."""
    from sf.models.convert import dit_from_state, load_dit
    from sf.models.dit import DiTConfig

    if run.weights is not None:
        return load_dit(run.weights, dtype=dtype, device=device).eval()
    from sf.checkpoint import saved_roles
    from sf.distributed import consolidated_state_dict

    architecture = saved_roles(run.checkpoint)[0]["generator"]
    if architecture is None:
        raise ValueError(f"{run.checkpoint}: no exported generator and no recorded architecture; run sf-export")
    state = consolidated_state_dict(run.checkpoint, "generator")
    return dit_from_state(state, DiTConfig.from_dict(architecture), str(run.checkpoint), dtype, device).eval()


class Clock:
    """Wall time of GPU work: synchronises the device before reading the clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@torch.no_grad()
def stream_timed(net, context: torch.Tensor, noise: torch.Tensor, rollout, decode: Callable, sink: Callable,
                 rng: torch.Generator | None, clock: Callable[[], float]) -> dict:
    """Generate chunk after chunk, decode each as it comes and hand its frames to `sink`; the timings (the
    sink's own time, e.g. mp4 encoding, is not counted): first-chunk latency (denoised and decoded) and frames
    per second with and without decoding."""
    from sf.distill.rollout import stream_chunks

    dit_s = decode_s = 0.0
    first_chunk_s, num_frames = None, 0
    chunks = stream_chunks(net, net.new_cache, noise, context, rollout, rng=rng)
    while True:
        start = clock()
        latents = next(chunks, None)  # (1, f, C, h, w)
        done = clock()
        if latents is None:
            break
        frames = decode(latents)  # (T, 3, H, W)
        decoded = clock()
        dit_s, decode_s = dit_s + done - start, decode_s + decoded - done
        if first_chunk_s is None:
            first_chunk_s = dit_s + decode_s
        num_frames += len(frames)
        sink(frames)
    return {"frames": num_frames, "first_chunk_s": round(first_chunk_s, 4),
            "fps": round(num_frames / (dit_s + decode_s), 3), "fps_dit": round(num_frames / dit_s, 3),
            "dit_s": round(dit_s, 4), "decode_s": round(decode_s, 4)}


def stream_to_mp4(net, context: torch.Tensor, noise: torch.Tensor, rollout, decode: Callable, out: Path, fps: int,
                  rng: torch.Generator, clock: Callable[[], float]) -> dict:
    """`stream_timed` into an mp4 at `out`, written as the frames come."""
    from sf.video import VideoWriter

    with VideoWriter(out, fps) as writer:
        return stream_timed(net, context, noise, rollout, decode, writer.append, rng, clock)


def decoder(codec) -> Callable[[torch.Tensor], torch.Tensor]:
    """Chunk latents (1, f, C, h, w) -> frames (T, 3, H, W): the VAE's streaming decoder, else a latent preview."""
    from sf.video import latent_preview

    if codec is None:
        return lambda latents: latent_preview(latents[0].float().cpu())
    stream = codec.stream_decoder()
    return lambda latents: stream(latents.to(next(codec.parameters()).dtype))[0].float().cpu()


def _outputs(out: Path, count: int) -> list[Path]:
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(count)]


def _prompts(args: argparse.Namespace) -> list[str]:
    from sf.data.prompts import read_prompt_file

    prompts = list(args.prompt or [])
    if args.prompt_file:
        prompts += read_prompt_file(str(existing_file(args.prompt_file, "prompt file")))
    if not prompts:
        raise ValueError("give a --prompt or a --prompt-file")
    return prompts


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sf-generate", description=__doc__.split("\n\n")[0],
                                     epilog="The module doc (python -m pydoc sf.generate) and docs/generate.md say "
                                            "more.", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="a run dir (newest checkpoint), a checkpoint folder, or exported "
                                                "weights (.safetensors / .pt, diffusers or Wan folder)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeat for several videos)")
    parser.add_argument("--prompt-file", type=Path, help="one prompt per line")
    parser.add_argument("--out", type=Path, default=Path("video.mp4"),
                        help="the mp4 (several prompts: <stem>_000.mp4, ...); default video.mp4")
    parser.add_argument("--num-frames", type=int, default=None,
                        help="latent frames (default: the trained length; longer rolls the cache)")
    parser.add_argument("--window", type=int, default=None,
                        help="latent frames the rolling KV cache keeps (default: the trained length)")
    parser.add_argument("--seed", type=int, default=0, help="video i starts from noise seeded by seed + i")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto",
                        help="auto: bf16 on GPU, fp32 on CPU")
    parser.add_argument("--fps", type=int, default=16, help="frame rate of the mp4 (Wan2.1: 16)")
    parser.add_argument("--latent-hw", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="latent height and width (default: the run's; bare weights with --wan: 60 104)")
    bare = parser.add_argument_group("weights without a run (ignored for a run)")
    bare.add_argument("--wan", type=Path, help="a Wan2.1 model directory: its UMT5 text encoder and VAE")
    bare.add_argument("--codec", type=Path, help="a VAE (Wan directory, its vae/ folder, or a codec file)")
    bare.add_argument("--frames-per-block", type=int, default=3, help="latent frames per chunk")
    bare.add_argument("--sink-frames", type=int, default=0, help="first frames the rolling cache always keeps")
    bare.add_argument("--text-model", default="sf-tiny-clip", help="open_clip architecture (without --wan)")
    bare.add_argument("--text-weights", default=None, help="open_clip weights file (without --wan)")
    return parser


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """sf-generate (see the module doc)."""
    from sf.tasks.base import build_text_encoder, compute_dtype, trained_codec
    from sf.tasks.preflight import resolve

    args = _parser().parse_args(argv)
    prompts = _prompts(args)
    writable_dir(args.out.parent if str(args.out.parent) else Path("."))
    if args.out.suffix.lower() != ".mp4":
        raise ValueError(f"--out must name an .mp4 file; got {args.out}")
    run = find_run(args.path)
    cfg = resolve(run.cfg if run.cfg is not None else bare_config(args))
    rollout = getattr(cfg.task, "rollout", None)
    if rollout is None:
        raise ValueError(f"{args.path}: a task={cfg.task.name} run has no causal student; sf-generate streams "
                         f"those of task=distill and task=ode")
    rollout = streaming_rollout(rollout, args.num_frames or rollout.num_frames, args.window)
    latent_hw = args.latent_hw or (cfg.task.latent_height, cfg.task.latent_width)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = compute_dtype(cfg.trainer.precision if args.dtype == "auto" else args.dtype, device)

    # the text first, then free its encoder (UMT5-XXL alone is 11 GB in bf16) before the student and VAE load
    text = build_text_encoder(cfg, device, dtype)
    contexts = [text([prompt])[0].to(device, dtype) for prompt in prompts]
    del text
    net = load_student(run, device, dtype)
    codec = trained_codec(cfg, device, dtype)
    if codec is None:
        print("[sf] the run has no trained VAE: the mp4 shows false-colour latent previews", file=sys.stderr)
    clock = Clock(device)
    source = str(run.weights or run.checkpoint)
    for i, (prompt, context, out) in enumerate(zip(prompts, contexts, _outputs(args.out, len(prompts)))):
        noise = torch.randn((1, rollout.num_frames, net.cfg.in_channels, *latent_hw),
                            generator=torch.Generator().manual_seed(args.seed + i))
        rng = torch.Generator(device=device).manual_seed(args.seed + i)
        stats = stream_to_mp4(net, context, noise.to(device, dtype), rollout, decoder(codec), out, args.fps, rng,
                              clock)
        print(json.dumps({"out": str(out), "prompt": prompt, "weights": source, "latent_frames": rollout.num_frames,
                          "window": rollout.local_attn_frames, "device": str(device),
                          "dtype": str(dtype).removeprefix("torch."), **stats}), flush=True)
        print(f"[sf] {out}: {stats['frames']} frames, first chunk after {stats['first_chunk_s']:.2f} s, "
              f"{stats['fps']:.1f} fps ({stats['fps_dit']:.1f} fps without decoding)", file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
