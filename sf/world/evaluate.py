"""`sf-eval`: score exported world models with the exact oracle, the world-FVD and drift vs horizon.

    sf-eval --teacher sf/assets/world/teacher.safetensors --student run/checkpoints/step_000120/export/generator_ema.safetensors
    sf-eval --student a.safetensors --num-videos 64 --split heldout --no-drift --out eval_out

Every model generates one video per evaluation caption (the world's `val` split by default: scenes never trained
on), from the same seeded noise per caption, decoded by the world VAE. Then, per model:

* prompt_adherence, motion_consistency, temporal_stability: `sf/world/oracle.py`, averaged over the videos;
* fvd: Fréchet distance between the world classifier's features of the generated videos and of the real videos
  of the same scenes (`sf/world/fvd.py`); fidelity = exp(-fvd / FVD_SCALE);
* oracle_score = geometric mean of prompt_adherence, motion_consistency, temporal_stability and fidelity: right
  on every axis or low (any component at 0 gives 0);
* nfe_per_frame: network evaluations each latent frame goes through (counted, not assumed: a bidirectional
  teacher step with CFG is 2 per frame; a causal chunk is its denoising steps plus the pass that writes its clean
  K/V into the cache, which the last chunk skips); seconds_per_frame: generation wall time per output video frame (VAE decoding excluded);
* drift (causal models): rollouts to `drift_factor` x the training length with the rolling KV cache, scored per
  16-frame window (`drift_vs_horizon`).
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sf.io import existing_file, one_line_errors, writable_dir
from sf.world import ASSETS
from sf.world.report import ORACLE_DEFINITION, format_table, write_report
from sf.world.scenes import caption, make_scene, render
from sf.distill.rollout import RolloutConfig, generate
from sf.rng import seed_for

COMPONENTS = ("prompt_adherence", "motion_consistency", "temporal_stability", "fidelity")

@dataclass
class EvalConfig:
    """What to generate and how to score it."""

    split: str = "val"
    num_videos: int = 32
    seed: int = 1234  # scenes and noise; the same for every model
    first_index: int = 0
    batch_size: int = 16
    teacher_steps: int = 48
    teacher_shift: float = 8.0
    cfg_scale: float = 3.0
    drift_videos: int = 8
    history_videos: int = 16  # videos per intermediate checkpoint (the metric-vs-step curve)
    drift_factor: int = 4
    drift_window: int = 16  # video frames per drift window


def model_score(components: dict[str, float]) -> float:
    """Geometric mean of the four components (0 if any is 0 or not finite)."""
    values = [min(max(float(components[name]), 0.0), 1.0) for name in COMPONENTS]
    if not all(math.isfinite(v) for v in values) or min(values) == 0.0:
        return 0.0
    return float(np.prod(values) ** (1 / len(values)))


class CountedNet:
    """A network that counts frame-evaluations: the sum over calls of batch x frames of its input."""

    def __init__(self, net):
        self.net, self.frame_evals = net, 0
        self.new_cache = getattr(net, "new_cache", None)
        self.cfg = getattr(net, "cfg", None)

    def __call__(self, x, t, context, **kw):
        self.frame_evals += x.shape[0] * x.shape[1]
        return self.net(x, t, context, **kw)


class WorldEvaluator:
    """The evaluation scenes, their real videos and features, and the shipped VAE, text tower and classifier."""

    def __init__(self, cfg: EvalConfig = EvalConfig(), assets: Path = ASSETS, device: str = "cpu",
                 progress: bool = True):
        from sf.world.fvd import features, load_classifier
        from sf.models.text import OpenCLIPTextEncoder
        from sf.models.vae import load_codec

        self.cfg, self.device, self.progress = cfg, torch.device(device), progress
        self.codec = load_codec(assets / "vae.safetensors", device).eval()
        self.text = OpenCLIPTextEncoder("sf-tiny-clip", str(assets / "text_encoder.safetensors"), 77, device=device)
        self.classifier = load_classifier(assets / "classifier.safetensors")
        self.scenes = [make_scene(cfg.seed, cfg.split, cfg.first_index + i) for i in range(cfg.num_videos)]
        self.captions = [caption(scene) for scene in self.scenes]
        self.real = np.stack([render(scene) for scene in self.scenes])  # (N, 81, 64, 64, 3)
        self.real_features = features(self.classifier, self.real)
        self.num_frames = self.real.shape[1]
        self.latent_shape = self.codec.latent_shape(self.num_frames, *self.real.shape[2:4])  # (F, C, h, w)

    def noise(self, indices, num_frames: int | None = None) -> torch.Tensor:
        shape = (num_frames or self.latent_shape[0], *self.latent_shape[1:])
        return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(seed_for(self.cfg.seed, "eval", i)))
                            for i in indices])

    def context(self, captions: list[str]) -> torch.Tensor:
        features, _ = self.text(captions)
        return features.to(self.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> np.ndarray:
        """Normalised latents (B, F, C, h, w) -> uint8 videos (B, T, H, W, 3), decoded `batch_size` at a time."""
        from sf.video import to_uint8

        step = self.cfg.batch_size
        return np.stack([to_uint8(video) for start in range(0, len(latents), step)
                         for video in self.codec.decode(latents[start:start + step].to(self.device).float())])

    def _batches(self):
        from tqdm import tqdm

        starts = range(0, self.cfg.num_videos, self.cfg.batch_size)
        return tqdm(starts, desc="generating", unit="batch", disable=not self.progress, leave=False)

    @torch.no_grad()
    def generate_teacher(self, net) -> tuple[torch.Tensor, float, float]:
        """Latents of the guided many-step teacher for every caption; (latents, nfe/frame, seconds)."""
        from sf.diffusion.sample import guided_net, sample_teacher

        counted, outputs, seconds = CountedNet(net), [], 0.0
        negative = self.context([""])
        for start in self._batches():
            indices = range(start, min(start + self.cfg.batch_size, self.cfg.num_videos))
            cond = self.context([self.captions[i] for i in indices])
            guided = guided_net(counted, {"context": cond}, {"context": negative.expand(len(cond), -1, -1)},
                                self.cfg.cfg_scale)
            begin = time.perf_counter()
            outputs.append(sample_teacher(guided, self.noise(indices).to(self.device), num_steps=self.cfg.teacher_steps,
                                          shift=self.cfg.teacher_shift).x0.cpu())
            seconds += time.perf_counter() - begin
        latents = torch.cat(outputs)
        return latents, counted.frame_evals / latents[:, :, 0, 0, 0].numel(), seconds

    @torch.no_grad()
    def generate_student(self, net, rollout: RolloutConfig, count: int | None = None,
                         num_frames: int | None = None) -> tuple[torch.Tensor, float, float]:
        """Latents streamed chunk by chunk by a causal student; (latents, nfe/frame, seconds)."""
        counted, outputs, seconds = CountedNet(net), [], 0.0
        count = min(count or self.cfg.num_videos, self.cfg.num_videos)
        for start in range(0, count, self.cfg.batch_size):
            indices = range(start, min(start + self.cfg.batch_size, count))
            cond = self.context([self.captions[i] for i in indices])
            begin = time.perf_counter()
            outputs.append(generate(counted, net.new_cache, self.noise(indices, num_frames).to(self.device), cond,
                                    rollout, rng=torch.Generator().manual_seed(self.cfg.seed)).cpu())
            seconds += time.perf_counter() - begin
        latents = torch.cat(outputs)
        return latents, counted.frame_evals / latents[:, :, 0, 0, 0].numel(), seconds

    def score(self, videos: np.ndarray) -> dict:
        """Oracle components, FVD and fidelity, oracle_score of decoded videos (one per caption, in order: the
        first len(videos) captions)."""
        from sf.world.oracle import score_videos
        from sf.world.fvd import FVD_SCALE, features, fidelity, frechet_distance

        oracle = score_videos(list(videos), self.captions[:len(videos)])
        fvd = frechet_distance(features(self.classifier, videos), self.real_features)
        components = {name: oracle[name] for name in COMPONENTS[:3]}
        components["fidelity"] = fidelity(fvd)
        return {"oracle_score": model_score(components), "components": components, "fvd": fvd,
                "fvd_scale": FVD_SCALE, "per_video_score": oracle["video_score"], "num_videos": len(videos)}

    @torch.no_grad()
    def vae_round_trip(self, count: int | None = None) -> dict:
        """The real videos of the first `count` captions encoded and decoded by the VAE, scored like a model: the
        ceiling of what any model decoded by this VAE can reach (a VAE that loses the objects caps all at ~0)."""
        from sf.models.vae import video_from_uint8

        count, step = min(count or self.cfg.num_videos, self.cfg.num_videos), self.cfg.batch_size
        latents = torch.cat([
            self.codec.encode(torch.stack([video_from_uint8(v) for v in self.real[start:min(start + step, count)]])
                              .to(self.device)).cpu()
            for start in range(0, count, step)])
        return {**self.score(self.decode(latents)), "sampler": "VAE encode + decode of the real videos"}

    def evaluate_teacher(self, net) -> tuple[dict, np.ndarray]:
        latents, nfe, seconds = self.generate_teacher(net)
        videos = self.decode(latents)
        return self._result(videos, nfe, seconds, sampler=f"{self.cfg.teacher_steps}-step Euler, shift "
                            f"{self.cfg.teacher_shift}, CFG {self.cfg.cfg_scale}"), videos

    def evaluate_student(self, net, rollout: RolloutConfig, count: int | None = None) -> tuple[dict, np.ndarray]:
        """Scores of the first `count` (default: all) evaluation videos streamed by a causal student."""
        latents, nfe, seconds = self.generate_student(net, rollout, count=count)
        videos = self.decode(latents)
        return self._result(videos, nfe, seconds, sampler=f"{rollout.num_steps}-step causal, "
                            f"{rollout.frames_per_block} latent frames per chunk"), videos

    def _result(self, videos, nfe, seconds, sampler) -> dict:
        return {**self.score(videos), "nfe_per_frame": round(nfe, 3),
                "seconds_per_frame": seconds / (len(videos) * videos.shape[1]), "sampler": sampler}

    def drift(self, net, rollout: RolloutConfig) -> list[dict]:
        """Oracle scores per window of rollouts `drift_factor` x longer, with a rolling cache of the training
        length (the model never saw frames past it)."""
        from dataclasses import replace

        from sf.world.oracle import drift_vs_horizon

        long = replace(rollout, num_frames=rollout.num_frames * self.cfg.drift_factor,
                       local_attn_frames=rollout.local_attn_frames or rollout.num_frames)
        count = min(self.cfg.drift_videos, self.cfg.num_videos)
        latents, _, _ = self.generate_student(net, long, count=count, num_frames=long.num_frames)
        videos = self.decode(latents)
        curves = drift_vs_horizon(list(videos), self.captions[:count], window=self.cfg.drift_window)
        return [{"horizon_frames": int(start) + self.cfg.drift_window,
                 **{k: float(v[w]) for k, v in curves.items() if k != "start"}}
                for w, start in enumerate(curves["start"])]


def load_net(path: str | Path, device: str = "cpu"):
    from sf.models.convert import load_dit

    return load_dit(str(path)).to(device).eval()


@one_line_errors
def main(argv: list[str] | None = None) -> None:
    """sf-eval: oracle, world-FVD, NFE and speed (and drift) of exported world models; writes a report."""
    parser = argparse.ArgumentParser(prog="sf-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--teacher", type=Path, help="a bidirectional model (sampled with many guided steps)")
    parser.add_argument("--ode-init", type=Path, help="a causal student (e.g. sf/assets/world/ode_init.safetensors)")
    parser.add_argument("--student", type=Path, help="a causal student (e.g. export/generator_ema.safetensors)")
    parser.add_argument("--assets", type=Path, default=ASSETS, help="VAE, text tower and classifier (default: sf/assets/world, from `make assets`)")
    parser.add_argument("--num-videos", type=int, default=EvalConfig.num_videos)
    parser.add_argument("--split", default=EvalConfig.split, choices=["train", "val", "heldout"])
    parser.add_argument("--teacher-steps", type=int, default=EvalConfig.teacher_steps)
    parser.add_argument("--steps", type=int, nargs="+", default=[1000, 750, 500, 250], help="student step list")
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--no-drift", action="store_true", help="skip the long rollouts")
    parser.add_argument("--vae-round-trip", action="store_true",
                        help="also score the real videos encoded and decoded by the VAE (the ceiling for every model)")
    parser.add_argument("--out", type=Path, default=Path("eval_out"))
    args = parser.parse_args(argv)
    if not (args.teacher or args.ode_init or args.student or args.vae_round_trip):
        parser.error("give at least one of --teacher, --ode-init, --student, --vae-round-trip")
    # everything that can be wrong with the inputs and the output is found before the first video is generated
    writable_dir(args.out)
    models = {name: path for name, path in (("teacher", args.teacher), ("ode_init", args.ode_init),
                                             ("student", args.student)) if path is not None}
    nets = {name: load_net(existing_file(path, f"--{name.replace('_', '-')}")) for name, path in models.items()}
    missing = [str(args.assets / f) for f in ("vae.safetensors", "text_encoder.safetensors", "classifier.safetensors")
               if not (args.assets / f).is_file()]
    if missing:
        raise FileNotFoundError(f"--assets {args.assets} lacks {', '.join(missing)} (the world's weights: make assets)")

    evaluator = WorldEvaluator(EvalConfig(split=args.split, num_videos=args.num_videos,
                                          teacher_steps=args.teacher_steps), args.assets)
    rollout = RolloutConfig(denoising_steps=args.steps, num_frames=evaluator.latent_shape[0],
                            frames_per_block=args.frames_per_block)
    report, samples, drift = {}, {}, {}
    for name, path in models.items():
        net = nets[name]
        if name == "teacher":
            report[name], videos = evaluator.evaluate_teacher(net)
        else:
            report[name], videos = evaluator.evaluate_student(net, rollout)
            if not args.no_drift:
                drift[name] = evaluator.drift(net, rollout)
        report[name]["weights"] = str(path)
        samples[name] = videos[:4]
    if args.vae_round_trip:
        report["vae_round_trip"] = evaluator.vae_round_trip()
    report["oracle_definition"] = ORACLE_DEFINITION
    path = write_report(args.out, report, drift=drift or None, samples=samples, captions=evaluator.captions[:4])
    print(format_table(report))
    print(f"report: {path}")


if __name__ == "__main__":
    main()
