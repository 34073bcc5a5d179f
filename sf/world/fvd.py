"""World-FVD: the Fréchet distance between videos' features under a small video classifier of the embedded world.

Features. `WorldClassifier` is a 5-layer 3-D CNN trained (`train_classifier`, ~4 minutes on one core) on
videos rendered on the fly from the world's ``train`` split. It reads every 4th frame, so any clip of >= 9
frames works (81 frames -> 21, 321 -> 81), as RGB plus motion energy (−∂t·∂x, −∂t·∂y: signed local motion,
by brightness constancy) and temporal change energy (∂t²). It convolves frames to 16x16 cells, then space and
time together, and pools every layer: mean and max over the clip and over its first `EARLY_FRAMES` frames
(before any bounce), min and max over time of the per-frame mean. A linear map takes the pooled statistics to
`feature_dim` (16) features, and linear heads read the features, so everything the heads know is in them:

* the truth: colours, shapes and initial directions present (multi-label), background, number of objects;
* the objects' speed (regression, on videos rendered at 1, 2 and 3 px/frame; the world's is 2): a real video
  is always at 2, a frozen one at 0;
* coherence (real vs `stutter_or_jumble`: one frame held for 6-24 frames, or 8-24 frames in random order):
  local breaks in time, never the whole-clip freezes and shuffles that the calibration below uses.

Once trained, the features are whitened with the mean and covariance of 256 real ``val`` videos, so real
videos' features have mean 0 and covariance I, and a distance is in units of how real videos vary.

FVD. With feature means μ and covariances Σ (ddof 1) of two sets of videos,

    FVD = ‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½)

in float64, both square roots by symmetric eigendecomposition with tiny negative eigenvalues clipped to 0. With
16 dimensions, ~32 videos per set estimate Σ; FVD of finite sets is biased upwards (two sets of 32 real videos
are ~6 apart, not 0), so compare models at equal set sizes.

Fidelity. ``fidelity = exp(−FVD / FVD_SCALE)`` in [0, 1]; FVD_SCALE = 35 puts real videos >= 0.8 and
clearly broken ones <= 0.3 (any scale in [31, 39] would). Measured with the default classifier by

    python -m sf.world.fvd train --out /tmp/world_classifier.safetensors   # 400 steps, 285 s on a busy core
    python -m sf.world.fvd calibrate --classifier /tmp/world_classifier.safetensors --trials 10

with 32 videos per set: the reference is ``val`` indices 1000-1031 and trial k compares indices 2000 + 32k..,
as they are (real) or broken: the first frame frozen, the frames shuffled, uniform noise. Over the 10 trials:

                FVD min    mean     max    fidelity
    real           4.65    5.96    6.86    0.82 - 0.88
    frozen        49.04   54.32   61.13    0.17 - 0.25
    shuffled      47.97   70.06  105.86    0.05 - 0.25
    noise         10068   10101   10147    0.00

(val accuracy of that classifier: colours 0.89, shapes 0.48, directions 0.86, background 1.00, objects 1.00,
speed 0.98, coherence 0.92; exact sets for the multi-label heads.) Real videos of 41 or 161 frames against
references of the same length, the ``heldout`` split, mp4-compressed or time-reversed videos all stay at FVD
6.6-7.1 (fidelity >= 0.81); a frozen clip of 41 or 161 frames is at 65 or 52.

    python -m sf.world.fvd score --classifier PATH --videos-npz generated.npz    # vs real val videos
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sf.world.scenes import BACKGROUNDS, COLOURS, DIRECTIONS, SHAPES, WorldSpec, make_scene, render
from sf.video import to_uint8

__all__ = [
    "FVD_SCALE", "ClassifierConfig", "WorldClassifier", "train_classifier", "save_classifier", "load_classifier",
    "features", "frechet_distance", "world_fvd", "fidelity", "calibrate",
]

FVD_SCALE = 35.0  # calibrated in the module docstring
FORMAT = "sf.world_classifier/1"  # safetensors metadata marker of a classifier file
MIN_FRAMES = 9
IN_CHANNELS = 8  # RGB, motion energy to the right, down, left and up, temporal change energy
CONV_CHANNELS = 7  # all but the change energy, which is only pooled (convolving it slowed every other head)
EARLY_FRAMES = WorldSpec().min_run  # frames every object runs before its first bounce
MAX_OBJECTS = WorldSpec().max_objects
HEADS: dict[str, int] = {  # name -> logits
    "colours": len(COLOURS), "shapes": len(SHAPES), "directions": len(DIRECTIONS),  # present or not, each
    "background": len(BACKGROUNDS), "num_objects": MAX_OBJECTS + 1,  # classes
    "speed": 1,  # the objects' speed over the world's (regression; trained on TRAIN_SPEEDS)
    "coherent": 1,  # real (1) or broken in time by `stutter_or_jumble` (0)
}
MULTI_LABEL = ("colours", "shapes", "directions", "coherent")
REGRESSION = ("speed",)
TRAIN_SPEEDS = (1, 2, 3)  # pixels per frame; the world's is WorldSpec.speed = 2


@dataclass(frozen=True)
class ClassifierConfig:
    """Shape of the world classifier."""

    feature_dim: int = 16  # small, so ~32 videos estimate the feature covariance
    channels: tuple[int, ...] = (8, 16, 32, 48, 64)  # two per-frame convolutions, then three 3x3x3
    frame_stride: int = 4  # read every 4th frame (81 -> 21, the latent frame rate): objects move 8 px a step
    frame_size: int = 64  # the world's frame side; other sizes are refused, never resized

    def __post_init__(self):
        if len(self.channels) != 5 or self.feature_dim < 1 or self.frame_stride < 1:
            raise ValueError(f"need 5 channel counts, feature_dim >= 1 and frame_stride >= 1, got {self}")


# ------------------------------------------------------------------------------------------------------ model


class WorldClassifier(nn.Module):
    """A 3-D CNN over uint8 (N, T, H, W, 3) world videos: features (N, D) and, from them, the truth's logits."""

    def __init__(self, cfg: ClassifierConfig = ClassifierConfig()):
        super().__init__()
        self.cfg = cfg
        c0, c1, c2, c3, c4 = cfg.channels
        self.stages = nn.ModuleList([  # frame by frame to 16x16 cells, then space and time together
            nn.Conv3d(CONV_CHANNELS, c0, kernel_size=(1, 2, 2), stride=(1, 2, 2)),  # (N, c0, t, 32, 32)
            nn.Conv3d(c0, c1, kernel_size=(1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1)),  # (N, c1, t, 16, 16)
            nn.Conv3d(c1, c2, kernel_size=3, stride=2, padding=1),  # (N, c2, t/2, 8, 8)
            nn.Conv3d(c2, c3, kernel_size=3, stride=2, padding=1),  # (N, c3, t/4, 4, 4)
            nn.Conv3d(c3, c4, kernel_size=3, stride=1, padding=1),  # (N, c4, t/4, 4, 4)
        ])
        num_pooled = 6 * (IN_CHANNELS + sum(cfg.channels))
        # pooled statistics differ in scale by orders of magnitude (the mean of sparse motion vs a max of colour)
        self.pooled_norm = nn.BatchNorm1d(num_pooled, affine=False)
        self.project = nn.Linear(num_pooled, cfg.feature_dim)
        self.heads = nn.Linear(cfg.feature_dim, sum(HEADS.values()))
        # once trained, features are whitened with the statistics of real videos (`_whiten_features`)
        self.register_buffer("feature_mean", torch.zeros(cfg.feature_dim))
        self.register_buffer("feature_whitening", torch.eye(cfg.feature_dim))

    def forward(self, videos: torch.Tensor, phase: int = 0) -> torch.Tensor:
        """uint8 (N, T, H, W, 3) -> features (N, D); reads frames phase, phase + stride, ..."""
        return (self.raw_features(videos, phase) - self.feature_mean) @ self.feature_whitening

    def raw_features(self, videos: torch.Tensor, phase: int = 0) -> torch.Tensor:
        """Features before whitening; (N, D)."""
        self._check(videos)
        x = network_input(videos, self.cfg.frame_stride, phase)  # (N, 8, t, H, W)
        pooled, frames_per_step = [], self.cfg.frame_stride
        for stage in (None, *self.stages):  # None: the input itself, so motion is one linear map from the loss
            if stage is not None:
                x = F.relu(stage(x[:, : stage.in_channels]))  # (N, C, t', h, w); drops the change energy
                frames_per_step *= stage.stride[0]
            early = x[:, :, : math.ceil(EARLY_FRAMES / frames_per_step)]  # (N, C, e, h, w)
            # every stage pooled: a short path from the loss to colour-detecting early layers; the early window
            # shows the initial direction before any bounce
            per_frame = x.mean(dim=(3, 4))  # (N, C, t'): its extremes show a stall or a jump in time
            pooled += [
                x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4)), early.mean(dim=(2, 3, 4)), early.amax(dim=(2, 3, 4)),
                per_frame.amin(dim=2), per_frame.amax(dim=2),
            ]
        return self.project(self.pooled_norm(torch.cat(pooled, dim=1)))  # (N, D)

    def logits(self, feats: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-head logits from features: {head: (N, HEADS[head])}."""
        return dict(zip(HEADS, self.heads(feats).split(list(HEADS.values()), dim=1)))

    def _check(self, videos: torch.Tensor) -> None:
        """ValueError for input the classifier was not made for."""
        size = self.cfg.frame_size
        if videos.dtype != torch.uint8 or videos.ndim != 5 or tuple(videos.shape[2:]) != (size, size, 3):
            raise ValueError(
                f"expected uint8 (N, T, {size}, {size}, 3) videos, got {tuple(videos.shape)} {videos.dtype}"
            )
        if videos.shape[1] < MIN_FRAMES:
            raise ValueError(f"videos need at least {MIN_FRAMES} frames, got {videos.shape[1]}")


@torch.no_grad()
def network_input(videos: torch.Tensor, frame_stride: int, phase: int = 0) -> torch.Tensor:
    """uint8 (N, T, H, W, 3) -> (N, 8, t, H, W): frames phase, phase + stride, ... in [-1, 1], then their motion
    energy towards the right, down, left and up (each >= 0).

    Motion energy is −∂t·∂x and −∂t·∂y summed over colour channels, ∂t from the frames just before and after
    each kept frame (one-sided at the clip's ends), ∂x and ∂y central differences (zero at the borders). By
    brightness constancy ∂t + v·∇ = 0, an edge moving with velocity v has −∂t ∂x = v_x (∂x)² whatever its
    contrast: the sign of motion is a local, linear read-out rather than something the CNN must discover.
    """
    num_frames = videos.shape[1]
    kept = torch.arange(phase, num_frames, frame_stride)
    frames = videos[:, kept].float() / 127.5 - 1.0  # (N, t, H, W, 3)
    after, before = videos[:, (kept + 1).clamp(max=num_frames - 1)], videos[:, (kept - 1).clamp(min=0)]
    dt = (after.float() - before.float()) / 127.5  # (N, t, H, W, 3)
    dx = F.pad(frames[:, :, :, 2:] - frames[:, :, :, :-2], (0, 0, 1, 1))
    dy = F.pad(frames[:, :, 2:] - frames[:, :, :-2], (0, 0, 0, 0, 1, 1))
    motion = -torch.stack([(dt * dx).sum(dim=-1), (dt * dy).sum(dim=-1)], dim=1) / 4  # (N, 2, t, H, W)
    change = dt.square().sum(dim=-1)[:, None] / 4  # (N, 1, t, H, W)
    return torch.cat([frames.permute(0, 4, 1, 2, 3), motion.relu(), (-motion).relu(), change], dim=1)


# ------------------------------------------------------------------------------------------------------ training


def scene_targets(scenes: Sequence) -> dict[str, torch.Tensor]:
    """The truth the heads predict: multi-hot (N, K) for colours/shapes/directions, class indices (N,) else."""
    claims = [scene.claim() for scene in scenes]
    vocabularies = {"colours": list(COLOURS), "shapes": list(SHAPES), "directions": list(DIRECTIONS)}
    attribute = {"colours": "colour", "shapes": "shape", "directions": "direction"}
    targets = {}
    for head, vocabulary in vocabularies.items():
        hot = torch.zeros(len(claims), len(vocabulary))
        for row, claim in enumerate(claims):
            for obj in claim.objects:
                hot[row, vocabulary.index(getattr(obj, attribute[head]))] = 1.0
        targets[head] = hot
    targets["background"] = torch.tensor([list(BACKGROUNDS).index(claim.background) for claim in claims])
    targets["num_objects"] = torch.tensor([len(claim.objects) for claim in claims])
    speeds = [max(abs(v) for v in scene.objects[0].velocity) for scene in scenes]
    targets["speed"] = torch.tensor(speeds, dtype=torch.float32)[:, None] / WorldSpec().speed
    return targets


def head_losses(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Binary cross-entropy for multi-label heads, squared error for regression, cross-entropy for classes; a
    head's target may cover only the first rows (the truth heads see real videos only, `coherent` every video)."""
    losses = {}
    for head, target in targets.items():
        logit = logits[head][: len(target)]
        if head in MULTI_LABEL:
            losses[head] = F.binary_cross_entropy_with_logits(logit, target)
        elif head in REGRESSION:
            losses[head] = F.mse_loss(logit, target)
        else:
            losses[head] = F.cross_entropy(logit, target)
    return losses


def head_accuracy(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> dict[str, float]:
    """Share of videos whose whole answer is right: the exact set for multi-label heads, the nearest training
    speed for the speed, the class otherwise."""
    accuracy = {}
    for head, target in targets.items():
        logit = logits[head][: len(target)]
        if head in MULTI_LABEL:
            right = ((logit > 0).float() == target).all(dim=1)
        elif head in REGRESSION:  # nearest training speed
            right = ((logit - target).abs() < 0.5 / WorldSpec().speed).all(dim=1)
        else:
            right = logit.argmax(dim=1) == target
        accuracy[head] = float(right.float().mean())
    return accuracy


def stutter_or_jumble(videos: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Copies of uint8 (N, T, H, W, 3) videos, each broken once in time: one frame held for 6-24 frames (a
    stutter; cut short by the clip's end, so some freeze to the end) or a window of 8-24 frames in random order
    (a jumble). The negatives of the `coherent` head: local breaks only, never the whole-clip freezes and
    shuffles of the calibration (`broken_videos`)."""
    broken = videos.clone()
    num_frames = videos.shape[1]
    for video in broken:
        stutter = bool(torch.rand(1, generator=generator) < 0.5)
        shortest = 6 if stutter else 8
        start = int(torch.randint(num_frames - shortest + 1, (1,), generator=generator))
        span = min(num_frames - start, int(torch.randint(shortest, 25, (1,), generator=generator)))
        window = video[start : start + span]
        window[:] = window[0].clone() if stutter else window[torch.randperm(span, generator=generator)]
    return broken


def render_batch(
    split: str, seed: int, indices: Sequence[int], num_frames: int = 81, speeds: Sequence[int] | None = None
) -> tuple[torch.Tensor, list]:
    """uint8 (N, T, 64, 64, 3) videos of world scenes (split, seed, index) and the scenes; objects move at the
    world's speed, or at speeds[index % len(speeds)]."""
    specs = [WorldSpec() if speeds is None else WorldSpec(speed=speeds[int(i) % len(speeds)]) for i in indices]
    scenes = [make_scene(seed, split, int(index), spec) for index, spec in zip(indices, specs)]
    return torch.from_numpy(np.stack([render(scene, num_frames) for scene in scenes])), scenes


def train_classifier(
    num_steps: int = 400,
    batch_size: int = 24,
    seed: int = 0,
    progress: bool = True,
    cfg: ClassifierConfig = ClassifierConfig(),
    lr: float = 1e-2,
    num_val: int = 256,
) -> tuple[WorldClassifier, dict]:
    """Train on fresh ``train`` videos (batch b is indices b*batch_size.., world seed `seed`, rendered at
    TRAIN_SPEEDS in turn) plus broken copies (`stutter_or_jumble`) of a third of them, then whiten the features
    with `num_val` real ``val`` videos. Metrics: the ``val`` accuracy of every head (speed and coherence on those
    videos and broken copies of half of them) and the mean loss over the first/last tenth of steps.

    Each batch reads its frames from a random phase (0..stride-1) and a random length in [41, 81] from frame 0,
    so the features hold for other lengths and frame offsets; the truth (initial direction included) is kept.
    """
    from tqdm.auto import tqdm

    if num_steps < 1 or batch_size < 3:
        raise ValueError(f"need num_steps >= 1 and batch_size >= 3, got {num_steps}, {batch_size}")
    if num_val <= cfg.feature_dim:
        raise ValueError(f"whitening {cfg.feature_dim} features needs num_val > {cfg.feature_dim}, got {num_val}")
    torch.manual_seed(seed)
    augment = torch.Generator().manual_seed(seed)
    model = WorldClassifier(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    warmup = max(1, num_steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * step / num_steps))
    )
    start = time.perf_counter()
    losses = []
    model.train()
    bar = tqdm(range(num_steps), desc="world classifier", disable=not progress, dynamic_ncols=True)
    for step in bar:
        phase = int(torch.randint(cfg.frame_stride, (1,), generator=augment))
        length = int(torch.randint(41, 82, (1,), generator=augment))
        indices = range(step * batch_size, (step + 1) * batch_size)
        videos, scenes = render_batch("train", seed, indices, length, TRAIN_SPEEDS)
        broken = stutter_or_jumble(videos[: batch_size // 3], augment)
        logits = model.logits(model(torch.cat([videos, broken]), phase))
        loss = sum(head_losses(logits, _targets(scenes, len(broken))).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    bar.close()

    model.eval()
    videos, scenes = render_batch("val", seed, range(num_val))
    _whiten_features(model, videos)
    broken = stutter_or_jumble(videos[: num_val // 2], torch.Generator().manual_seed(seed))
    with torch.no_grad():
        logits = model.logits(torch.cat([model(chunk) for chunk in torch.cat([videos, broken]).split(32)]))
    tenth = max(1, num_steps // 10)
    metrics = {
        **{f"val_{head}": value for head, value in head_accuracy(logits, _targets(scenes, len(broken))).items()},
        "loss_first": float(np.mean(losses[:tenth])), "loss_last": float(np.mean(losses[-tenth:])),
        "num_steps": num_steps, "batch_size": batch_size, "seed": seed, "num_val": num_val,
        "train_seconds": round(time.perf_counter() - start, 1),
    }
    return model, metrics


def _targets(scenes: Sequence, num_broken: int) -> dict[str, torch.Tensor]:
    """Targets for a batch of real videos of these scenes followed by `num_broken` broken ones."""
    coherent = torch.cat([torch.ones(len(scenes), 1), torch.zeros(num_broken, 1)])
    return {**scene_targets(scenes), "coherent": coherent}


@torch.no_grad()
def _whiten_features(model: WorldClassifier, videos: torch.Tensor) -> None:
    """Whiten features with the mean and covariance of these (real) videos' raw features (so theirs have mean 0
    and covariance I); the heads are rewritten to give the same logits."""
    raw = torch.cat([model.raw_features(chunk) for chunk in videos.split(32)]).double()  # (N, D)
    mean = raw.mean(dim=0)
    eigenvalues, vectors = torch.linalg.eigh(torch.cov(raw.T))
    eigenvalues = eigenvalues.clamp_min(1e-4 * float(eigenvalues.max()))  # at most 100x along any direction
    whitening = (vectors * eigenvalues.rsqrt()) @ vectors.T  # (D, D) symmetric: Σ^-½
    colouring = (vectors * eigenvalues.sqrt()) @ vectors.T  # Σ^½, its inverse
    # logits = A f0 + b with f0 = (raw - m0) W0 and raw = f1 Σ^½ + m: A <- A W0ᵀ Σ^½ᵀ, b <- b + A W0ᵀ (m - m0)
    old_whitening, old_mean = model.feature_whitening.double(), model.feature_mean.double()
    weight = model.heads.weight.double() @ old_whitening.T
    model.heads.bias.add_((weight @ (mean - old_mean)).float())
    model.heads.weight.copy_((weight @ colouring.T).float())
    model.feature_mean.copy_(mean.float())
    model.feature_whitening.copy_(whitening.float())


# ------------------------------------------------------------------------------------------------------ files


def save_classifier(model: WorldClassifier, path: str | Path, metrics: dict | None = None) -> Path:
    """Weights, config and metrics (json metadata) in one safetensors file."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": FORMAT, "config": json.dumps(asdict(model.cfg)), "metrics": json.dumps(metrics or {})}
    save_file(state, str(path), metadata=metadata)
    return path


def load_classifier(path: str | Path) -> WorldClassifier:
    """A classifier saved by `save_classifier`, in eval mode, its training metrics in `.metrics`; ValueError for a
    missing or foreign file."""
    from sf.io import read_safetensors

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"no world classifier file at {path}")
    try:
        state, metadata = read_safetensors(path)
    except ValueError as exn:
        raise ValueError(f"{path} is not a world classifier file ({exn})") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"{path} is not a world classifier file (metadata format is {metadata.get('format')!r})")
    config = json.loads(metadata["config"])
    model = WorldClassifier(ClassifierConfig(**{**config, "channels": tuple(config["channels"])}))
    model.load_state_dict(state)
    model.metrics = json.loads(metadata.get("metrics", "{}"))
    return model.eval()


# ------------------------------------------------------------------------------------------------------ FVD


@torch.no_grad()
def features(model: WorldClassifier, videos, batch_size: int = 16) -> np.ndarray:
    """Features of videos (a list of uint8 (T, H, W, 3) or float (T, C, H, W) in [-1, 1] arrays, or one
    (N, T, H, W, 3) array); float64 (N, D). Videos of one call must share their shape."""
    videos = [to_uint8(video) for video in videos]
    if len({video.shape for video in videos}) > 1:
        raise ValueError(f"videos of one call must share a shape, got {sorted({v.shape for v in videos})}")
    model.eval()
    chunks = [
        model(torch.from_numpy(np.stack(videos[start : start + batch_size]))).double().numpy()
        for start in range(0, len(videos), batch_size)
    ]
    return np.concatenate(chunks) if chunks else np.zeros((0, model.cfg.feature_dim))


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray) -> float:
    """‖μa − μb‖² + Tr(Σa + Σb − 2 (Σa^½ Σb Σa^½)^½) of two (N, D) feature sets, in float64."""
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"need two (N, D) feature arrays with the same D, got shapes {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set for a covariance, got {len(a)} and {len(b)}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("features contain nan or inf")
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))  # (D, D), ddof 1
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    eigenvalues = np.linalg.eigvalsh((middle + middle.T) / 2)
    cross = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()  # Tr((Σa^½ Σb Σa^½)^½)
    mean_term = float(np.sum((a.mean(axis=0) - b.mean(axis=0)) ** 2))
    return max(0.0, mean_term + float(np.trace(cov_a) + np.trace(cov_b) - 2.0 * cross))


def _sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative rounding-error eigenvalues -> 0)."""
    eigenvalues, vectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (vectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ vectors.T


def world_fvd(model: WorldClassifier, videos, reference_videos, batch_size: int = 16) -> float:
    """Fréchet distance between the classifier features of videos and of reference videos."""
    return frechet_distance(features(model, videos, batch_size), features(model, reference_videos, batch_size))


def fidelity(fvd: float, scale: float = FVD_SCALE) -> float:
    """exp(−fvd / scale) in [0, 1]: 1 for matching feature statistics, ~0 for unrelated videos."""
    if scale <= 0 or math.isnan(fvd):
        raise ValueError(f"need a positive scale and a number for fvd, got scale {scale}, fvd {fvd}")
    return math.exp(-max(fvd, 0.0) / scale)


# ------------------------------------------------------------------------------------------------------ calibration


def broken_videos(videos: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Clearly broken versions of uint8 (N, T, H, W, 3) videos: frozen first frame, shuffled frames, noise."""
    rng = np.random.default_rng(seed)
    shuffled = np.stack([video[rng.permutation(len(video))] for video in videos])
    return {
        "frozen": np.repeat(videos[:, :1], videos.shape[1], axis=1),
        "shuffled": shuffled,
        "noise": rng.integers(0, 256, size=videos.shape, dtype=np.uint8),
    }


def calibrate(model: WorldClassifier, num_videos: int = 32, num_trials: int = 1, num_frames: int = 81) -> dict:
    """FVD of real ``val`` videos of other indices, and of broken versions of them, against ``val`` indices
    1000..; trial k compares indices 2000 + k * num_videos.. . {kind: [fvd per trial]}."""
    reference, _ = render_batch("val", 0, range(1000, 1000 + num_videos), num_frames)
    reference_feats = features(model, reference.numpy())
    results: dict[str, list[float]] = {"real": [], "frozen": [], "shuffled": [], "noise": []}
    for trial in range(num_trials):
        first = 2000 + trial * num_videos
        videos = render_batch("val", 0, range(first, first + num_videos), num_frames)[0].numpy()
        for kind, sample in {"real": videos, **broken_videos(videos, seed=trial)}.items():
            results[kind].append(frechet_distance(features(model, sample), reference_feats))
    return results


# ------------------------------------------------------------------------------------------------------ CLI


def _load_videos(path: str) -> np.ndarray:
    """The 'videos' array of an npz file (else its only array): uint8 (N, T, H, W, 3)."""
    with np.load(path, allow_pickle=False) as data:
        names = list(data.keys())
        if "videos" not in names and len(names) != 1:
            raise ValueError(f"{path}: expected a 'videos' array (or a single array), found {names}")
        return data["videos" if "videos" in names else names[0]]


def main(argv: list[str] | None = None) -> None:
    """World-FVD: train the world classifier, score videos against real world videos, or calibrate the scale."""
    parser = argparse.ArgumentParser(prog="python -m sf.world.fvd", description=main.__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train the classifier on rendered world videos and save it")
    train.add_argument("--out", required=True, help="output .safetensors path")
    train.add_argument("--steps", type=int, default=400, help="optimizer steps (default: 400)")
    train.add_argument("--batch-size", type=int, default=24, help="videos per step (default: 24)")
    train.add_argument("--seed", type=int, default=0, help="init, data stream and augmentation seed (default: 0)")
    train.add_argument(
        "--num-val", type=int, default=256, help="val videos to whiten the features and measure accuracy (default: 256)"
    )
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    score = commands.add_parser("score", help="FVD and fidelity of videos in an npz against reference videos")
    score.add_argument("--classifier", required=True, help="a file written by 'train'")
    score.add_argument("--videos-npz", required=True, help="npz with a uint8 (N, T, 64, 64, 3) 'videos' array")
    score.add_argument(
        "--reference-npz", help="npz of reference videos (default: N val videos of the same length, indices 1000..)"
    )
    calibration = commands.add_parser("calibrate", help="FVD of real vs real and vs broken val videos")
    calibration.add_argument("--classifier", required=True, help="a file written by 'train'")
    calibration.add_argument("--num-videos", type=int, default=32, help="videos per set (default: 32)")
    calibration.add_argument("--trials", type=int, default=1, help="disjoint sets compared to the reference")
    args = parser.parse_args(argv)

    if args.command == "train":
        model, metrics = train_classifier(
            args.steps, args.batch_size, args.seed, progress=not args.no_progress, num_val=args.num_val
        )
        path = save_classifier(model, args.out, metrics)
        print(json.dumps({"saved": str(path), **metrics}, indent=1))
    elif args.command == "score":
        model = load_classifier(args.classifier)
        videos = _load_videos(args.videos_npz)
        if args.reference_npz:
            reference = _load_videos(args.reference_npz)
        else:
            reference = render_batch("val", 0, range(1000, 1000 + len(videos)), videos.shape[1])[0].numpy()
        fvd = world_fvd(model, videos, reference)
        print(json.dumps({"world_fvd": fvd, "fidelity": fidelity(fvd), "num_videos": len(videos)}))
    else:
        results = calibrate(load_classifier(args.classifier), args.num_videos, args.trials)
        print(f"{'':9s} {'FVD min':>9s} {'mean':>9s} {'max':>9s}   fidelity at max, min (FVD_SCALE {FVD_SCALE:g})")
        for kind, values in results.items():
            low, high = min(values), max(values)
            mean = np.mean(values)
            print(f"{kind:9s} {low:9.2f} {mean:9.2f} {high:9.2f}   {fidelity(high):.3f}, {fidelity(low):.3f}")


if __name__ == "__main__":
    main()
