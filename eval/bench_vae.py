"""Benchmark: how fast the world's Wan VAE learns — whole-clip PSNR and *object* PSNR against training steps.

The world's VAE is the piece of `make assets` that decides whether anything downstream can work: a codec that
reconstructs the background but not the few object pixels gives a teacher of empty scenes (docs/benchmarks.md).
A clip-level PSNR hides that (background-only decoding already reads ~17 dB), so this script also reports the
PSNR over object pixels alone (every pixel whose colour differs from the scene's background, known from the
world's truth) on held-out `val` clips at their full 81 frames.

It trains with the recipe's own pieces — `WanVAE` at `--flavor` (+ `--base-dim` etc.), `vae_loss` (L1 of the
posterior mean, `--foreground-weight` on pixels away from the background, + KL, as `experiment=world_vae`),
AdamW with linear warm-up and gradient clipping — on random windows of freshly rendered train clips, on
whatever device is given, and writes JSON + a PNG learning curve.

    python -m eval.bench_vae --steps 300 --out docs/figures                     # the world_vae recipe's loss
    python -m eval.bench_vae --steps 300 --foreground-weight 0                  # plain L1: background only
    python -m eval.bench_vae --steps 20000 --batch 8 --device cuda --out runs/vae   # a GPU schedule
    python -m eval.bench_vae --data constant --crop-frames 1 --crop-size 32      # the constant-colour probe
    python -m eval.bench_vae --evaluate sf/assets/world/vae.safetensors --val-videos 16   # score a saved codec

``--data constant`` trains on clips of one random colour: a sanity probe (an autoencoder should learn it at
once; the PSNR it reaches after N steps says how hard the architecture is to optimise, independent of objects).
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import sf  # noqa: F401  (torchvision fix before diffusers is imported)
from sf.world.scenes import BACKGROUNDS, make_scene, render
from sf.models.vae import WanVAE, video_from_uint8
from sf.tasks.vae import vae_loss


def object_mask(frames: np.ndarray, background: str) -> np.ndarray:
    """(T, H, W) True where a pixel is not the scene's background colour (the world's colours are far apart)."""
    return np.abs(frames.astype(np.int16) - np.array(BACKGROUNDS[background], np.int16)).sum(-1) > 30


def psnr(error_sq: float) -> float:
    return 10 * math.log10(4.0 / max(error_sq, 1e-10))  # values in [-1, 1]: peak-to-peak 2


@torch.no_grad()
def evaluate(codec: WanVAE, clips: list[tuple[np.ndarray, str]], device, per_frame: bool = False) -> dict:
    """Clip PSNR and object-pixel PSNR of whole-clip reconstructions (posterior mean, diffusers' clamp); with
    `per_frame`, also the object PSNR of each frame index (where long clips degrade)."""
    was_training = codec.training
    codec.eval()
    total, objects, count, object_count = 0.0, 0.0, 0, 0
    frame_objects, frame_counts = 0.0, 0
    for frames, background in clips:
        video = video_from_uint8(frames)[None].to(device)
        error = (codec.decode_raw(codec.encode_raw(video)).float() - video).square().sum(2)[0].cpu()  # (T, H, W)
        mask = torch.from_numpy(object_mask(frames, background))
        total, count = total + error.sum().item(), count + error.numel() * 3
        objects, object_count = objects + error[mask].sum().item(), object_count + int(mask.sum()) * 3
        frame_objects = frame_objects + (error * mask).sum((1, 2)).double()
        frame_counts = frame_counts + mask.sum((1, 2)).double() * 3
    codec.train(was_training)
    result = {"psnr": psnr(total / count), "object_psnr": psnr(objects / max(object_count, 1))}
    if per_frame:
        result["object_psnr_per_frame"] = [round(psnr(e / max(n, 1)), 2)
                                           for e, n in zip(frame_objects.tolist(), frame_counts.tolist())]
    return result


class Windows:
    """Random (crop_frames, crop_size) windows of rendered train clips, or of constant-colour clips."""

    def __init__(self, args):
        self.args, self.rng = args, np.random.default_rng(args.seed)
        self.clips = [render(make_scene(args.seed, "train", i)) for i in range(args.num_videos)] \
            if args.data == "world" else []

    def batch(self) -> torch.Tensor:
        a, videos = self.args, []
        for _ in range(a.batch):
            if a.data == "constant":
                colour = self.rng.integers(0, 256, size=3, dtype=np.uint8)
                videos.append(video_from_uint8(np.tile(colour, (a.crop_frames, a.crop_size, a.crop_size, 1))))
                continue
            clip = self.clips[self.rng.integers(len(self.clips))]
            t, h, w, _ = clip.shape
            t0, y0, x0 = (int(self.rng.integers(0, n - k + 1))
                          for n, k in ((t, a.crop_frames), (h, a.crop_size), (w, a.crop_size)))
            videos.append(video_from_uint8(clip[t0:t0 + a.crop_frames, y0:y0 + a.crop_size, x0:x0 + a.crop_size]))
        return torch.stack(videos)


def train(args) -> dict:
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    overrides = {k: v for k, v in (("base_dim", args.base_dim), ("decoder_base_dim", args.decoder_base_dim))
                 if v is not None}
    codec = WanVAE.from_flavor(args.flavor, **overrides).to(device)
    optimizer = torch.optim.AdamW(codec.parameters(), lr=args.lr, weight_decay=0.0)
    windows = Windows(args)
    val = [(render(scene), scene.background) for scene in (make_scene(args.seed, "val", i)
                                                            for i in range(args.val_videos))]
    curve, smoothed, begin = [], None, time.perf_counter()
    evaluate_now = [0] + [s for s in range(1, args.steps + 1) if s % args.eval_every == 0 or s == args.steps]
    if args.data == "world" and 0 in evaluate_now:
        curve.append({"step": 0, "loss": None, "seconds": 0.0,
                      **{k: round(v, 2) for k, v in evaluate(codec, val, device).items()}})
    from tqdm import tqdm

    for step in tqdm(range(1, args.steps + 1), desc="vae", disable=args.quiet):
        for group in optimizer.param_groups:
            group["lr"] = args.lr * min(1.0, step / max(args.warmup, 1))
        video = windows.batch().to(device)
        loss, _ = vae_loss(codec, video, args.kl_weight, sample=False, foreground_weight=args.foreground_weight,
                           l2_weight=args.l2_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(codec.parameters(), args.grad_clip)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.9 * smoothed + 0.1 * loss.item()
        if step in evaluate_now:
            row = {"step": step, "loss": round(smoothed, 5), "seconds": round(time.perf_counter() - begin, 1)}
            if args.data == "world":
                row.update({k: round(v, 2) for k, v in evaluate(codec, val, device).items()})
            curve.append(row)
            tqdm.write(json.dumps(row))
            sys.stdout.flush()
    return {"curve": curve, "seconds_per_step": round((time.perf_counter() - begin) / args.steps, 3),
            "parameters": sum(p.numel() for p in codec.parameters()), "codec": codec.codec_config()}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = [row for row in result["curve"] if "psnr" in row]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in curve], [r["psnr"] for r in curve], marker="o", label="whole clip")
    ax.plot([r["step"] for r in curve], [r["object_psnr"] for r in curve], marker="o", label="object pixels")
    ax.set_xlabel("training step")
    ax.set_ylabel("val PSNR (dB), 81 frames")
    ax.set_title(f"world VAE ({result['parameters'] / 1e6:.2f}M params, {result['args']['device']})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_vae", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--crop-frames", type=int, default=17, help="1 + 4k frames per training window")
    parser.add_argument("--crop-size", type=int, default=64, help="square crop side, a multiple of 8")
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--grad-clip", type=float, default=1.0)
    parser.add_argument("--kl-weight", type=float, default=1e-6)
    parser.add_argument("--foreground-weight", type=float, default=10.0, help="0: the plain L1")
    parser.add_argument("--l2-weight", type=float, default=1.0, help="squared-error term added to the L1")
    parser.add_argument("--flavor", default="world")
    parser.add_argument("--base-dim", type=int, default=None, help="override the flavor's base_dim")
    parser.add_argument("--decoder-base-dim", type=int, default=None, help="a wider decoder than encoder")
    parser.add_argument("--data", choices=("world", "constant"), default="world")
    parser.add_argument("--num-videos", type=int, default=256, help="train clips to draw windows from")
    parser.add_argument("--val-videos", type=int, default=4)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=None, help="write bench_vae.json and bench_vae.png here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    parser.add_argument("--evaluate", type=Path, default=None, metavar="CODEC",
                        help="only score a saved codec (a save_codec file) on --val-videos whole val clips")
    args = parser.parse_args(argv)
    if args.evaluate is not None:
        from sf.models.vae import load_codec

        clips = [(render(scene), scene.background) for scene in (make_scene(args.seed, "val", i)
                                                                 for i in range(args.val_videos))]
        result = {k: [round(x, 2) for x in v] if isinstance(v, list) else round(v, 2) for k, v in
                  evaluate(load_codec(args.evaluate, args.device), clips, args.device, per_frame=True).items()}
        print(json.dumps({"codec": str(args.evaluate), "val_videos": args.val_videos, **result}))
        return result
    if (args.crop_frames - 1) % 4 or args.crop_size % 8:
        parser.error(f"--crop-frames must be 1 + 4k and --crop-size a multiple of 8, got {args.crop_frames}, "
                     f"{args.crop_size}")
    result = {**train(args), "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "machine": {"platform": platform.platform(), "threads": torch.get_num_threads()}}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "bench_vae.json").write_text(json.dumps(result, indent=2))
        if args.data == "world":
            plot(result, args.out / "bench_vae.png")
        print(f"wrote {args.out / 'bench_vae.json'}")
    return result


if __name__ == "__main__":
    main()
