"""The world oracle: recover the embedded world's truth from pixels and score a video against its caption.

Recovery (`track`) looks at pixels only, so it works on a model's decoded videos as on real ones:

1. each frame's background is its median colour; the clip's background class is the nearest vocabulary
   background when most pixels lie near it (noise has none);
2. a pixel far from its frame's background and near a vocabulary colour gets that colour; 4-connected blobs of
   one colour smaller than `min_area` are noise; the largest blob of each colour is that colour's object;
3. each blob is measured softly (`_measure`): a pixel's opacity is where its colour lies between the
   background and the blob's colour, so blur moves neither the area (sum of opacities), the centroid, nor the
   box (taken at opacity 1/2);
4. from the per-frame blobs: shape = a triangle's mass sits low in its box, else the box fill ratio tells a
   square (1) from a circle (~0.8); size = median box side; initial direction = centroid motion over the first
   frames. Shape, size and motion prefer *clean* frames, where the blob's box touches no other blob.

Scores, each in [0, 1], against what a caption claims (`parse_caption`):

* prompt_adherence: (objects recovered with the claimed colour, shape, size and initial direction, + 1 if the
  background matches) / (claimed objects + 1);
* motion_consistency: mean over claimed objects of the share of clean frame-to-frame steps that obey the
  world's physics: constant speed along one axis, no sideways drift, reversals only at a wall; 0 for a
  claimed object that is missing or slower than `min_speed`;
* temporal_stability: mean over frames of (claimed objects present with an area within `stable_area` of their
  median) / (claimed objects + unclaimed colours present), so vanishing, flicker and extra objects all cost;
* video_score = geometric mean of the three: a video scores well only if it is right on every axis, and any
  component at 0 (nothing recognisable, frozen motion) makes it 0. (A model's `oracle_score` in
  `sf.world.evaluate` adds a fourth component, the world-FVD fidelity of its whole set of videos.)

`drift_vs_horizon` scores consecutive windows of long rollouts, where the initial direction is not checked.
Nothing here raises on a bad video: empty, noisy or nan frames score 0.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Sequence

import numpy as np

from sf.world.scenes import BACKGROUNDS, COLOURS, DIRECTIONS, SIZES, Claim, ObjectClaim, parse_caption
from sf.video import to_uint8

__all__ = [
    "OracleConfig", "Tracks", "track", "recover", "parse_caption", "prompt_adherence", "motion_consistency",
    "temporal_stability", "video_score", "score_video", "score_videos", "drift_vs_horizon",
]

COMPONENTS = ("prompt_adherence", "motion_consistency", "temporal_stability")
_PALETTE = np.array(list(COLOURS.values()), dtype=np.float32)  # (K, 3)
_BACKDROPS = np.array(list(BACKGROUNDS.values()), dtype=np.float32)  # (B, 3)
UNKNOWN = "unknown"  # an attribute the pixels do not show


@dataclass(frozen=True)
class OracleConfig:
    """Thresholds of the pixel oracle: RGB distances on 0..255, areas in pixels, speeds in pixels per frame."""

    foreground: float = 60.0  # a pixel this far from its frame's background colour is foreground
    colour: float = 100.0  # ... and takes the nearest vocabulary colour within this distance
    background: float = 50.0  # a frame's background class: the nearest vocabulary background within this ...
    background_share: float = 0.5  # ... with at least this share of the frame's pixels within that distance
    min_area: int = 20  # blobs smaller than this are noise (a small triangle has 60 pixels)
    triangle_offset: float = 0.05  # centre of mass this far (in box heights) below the box centre: triangle
    square_fill: float = 0.9  # otherwise, box fill ratio at least this: square
    circle_fill: float = 0.7  # at least this: circle; below: triangle
    early_frames: int = 6  # frames after an object first shows whose motion gives its initial direction
    min_speed: float = 0.5  # slower objects are not moving
    tolerance: float = 0.75  # a step may differ from the object's typical step by this much per axis (a
    # bounce: twice this, as it is read from two box edges)
    min_presence: float = 0.5  # an object counts as recovered when seen in at least this share of frames
    stable_area: tuple[float, float] = (0.5, 2.0)  # a blob is stable within these factors of its median area
    min_steps: int = 3  # fewer clean steps than this: motion unknown (scores 0)


# ------------------------------------------------------------------------------------------------------ recovery


@dataclass(frozen=True, eq=False)
class Tracks:
    """The largest blob of each vocabulary colour in each frame of a clip (K = len(COLOURS) colours)."""

    backgrounds: np.ndarray  # (T,) int index into BACKGROUNDS per frame, -1 where none fits
    present: np.ndarray  # (K, T) bool
    area: np.ndarray  # (K, T) float pixels, 0 where absent
    box: np.ndarray  # (K, T, 4) int (x0, y0, x1, y1) inclusive
    centroid: np.ndarray  # (K, T, 2) float (x, y)
    clean: np.ndarray  # (K, T) bool: present and its box (grown by 1 pixel) touches no other blob's box
    height: int
    width: int

    @property
    def num_frames(self) -> int:
        """Frames tracked."""
        return self.present.shape[1]

    @property
    def background(self) -> str | None:
        """The background class shown in at least half of the frames, else None."""
        known = self.backgrounds[self.backgrounds >= 0]
        if len(known) == 0:
            return None
        counts = np.bincount(known, minlength=len(BACKGROUNDS))
        best = int(counts.argmax())
        return list(BACKGROUNDS)[best] if counts[best] * 2 >= self.num_frames else None

    def window(self, start: int, stop: int) -> Tracks:
        """The same tracks restricted to frames [start, stop)."""
        return replace(
            self, backgrounds=self.backgrounds[start:stop], present=self.present[:, start:stop],
            area=self.area[:, start:stop], box=self.box[:, start:stop], centroid=self.centroid[:, start:stop],
            clean=self.clean[:, start:stop],
        )


def track(video, cfg: OracleConfig = OracleConfig()) -> Tracks:
    """Recover per-frame blobs of every vocabulary colour from a video's pixels (uint8 (T, H, W, 3) or float
    (T, C, H, W) in [-1, 1], numpy or torch)."""
    frames = _as_frames(video).astype(np.float32)  # (T, H, W, 3)
    num_frames, height, width = frames.shape[:3]
    flat = frames.reshape(num_frames, height * width, 3)  # (T, HW, 3)
    backdrop = np.median(flat, axis=1) if flat.shape[1] else np.zeros((num_frames, 3), np.float32)  # (T, 3)
    backgrounds = _background_classes(flat, backdrop, cfg)
    classes = _colour_classes(frames, backdrop, cfg)  # (T, H, W) colour index, -1 for none
    labels = _components(classes)
    present, area, box, centroid = _largest_blobs(frames, backdrop, classes, labels, cfg.min_area)
    clean = present & ~_touches_other(box, present)
    return Tracks(backgrounds, present, area, box, centroid, clean, height, width)


def _as_frames(video) -> np.ndarray:
    """A video as uint8 (T, H, W, 3); float nan/inf become black rather than garbage."""
    if hasattr(video, "detach"):  # a torch tensor
        video = video.detach().cpu().float().numpy() if video.is_floating_point() else video.detach().cpu().numpy()
    video = np.asarray(video)
    if np.issubdtype(video.dtype, np.floating):
        video = np.nan_to_num(video, nan=-1.0, posinf=1.0, neginf=-1.0)
    return to_uint8(video)


def _background_classes(flat: np.ndarray, backdrop: np.ndarray, cfg: OracleConfig) -> np.ndarray:
    """Per frame: index of the vocabulary background matching the frame's median colour, or -1; (T,)."""
    if flat.shape[0] == 0 or flat.shape[1] == 0:
        return np.full(flat.shape[0], -1, dtype=np.int64)
    distance = np.linalg.norm(backdrop[:, None, :] - _BACKDROPS[None], axis=-1)  # (T, B)
    nearest = distance.argmin(axis=1)  # (T,)
    near = _squared_norm(flat - _BACKDROPS[nearest][:, None, :]) < cfg.background**2  # (T, HW)
    fits = (distance.min(axis=1) < cfg.background) & (near.mean(axis=1) >= cfg.background_share)
    return np.where(fits, nearest, -1)


def _colour_classes(frames: np.ndarray, backdrop: np.ndarray, cfg: OracleConfig) -> np.ndarray:
    """Per pixel: index of its vocabulary colour if it is foreground and near one, else -1; (T, H, W)."""
    foreground = _squared_norm(frames - backdrop[:, None, None, :]) > cfg.foreground**2  # (T, H, W)
    pixels = frames[foreground]  # (N, 3)
    distance = _squared_norm(pixels[:, None, :] - _PALETTE)  # (N, K)
    nearest = distance.argmin(axis=1) if len(pixels) else np.zeros(0, dtype=np.int64)
    near = distance[np.arange(len(pixels)), nearest] < cfg.colour**2
    classes = np.full(frames.shape[:3], -1, dtype=np.int64)
    classes[foreground] = np.where(near, nearest, -1)
    return classes


def _squared_norm(x: np.ndarray) -> np.ndarray:
    """Squared euclidean norm over the last axis."""
    return np.einsum("...c,...c->...", x, x)


def _components(classes: np.ndarray) -> np.ndarray:
    """4-connected components of equal colour within each frame: the smallest flat pixel index of each
    pixel's component, -1 for unclassified pixels; (T, H, W)."""
    height, width = classes.shape[1:]
    flat_classes = classes.reshape(-1)
    pixels = np.flatnonzero(flat_classes >= 0)  # (N,) ascending, so a smaller position is a smaller index
    position = np.full(classes.size, -1)
    position[pixels] = np.arange(len(pixels))
    ys, xs = pixels // width % height, pixels % width
    neighbours = [np.arange(len(pixels))]  # (N,) each: position of a same-colour neighbour, or itself
    for dy, dx in ((1, 0), (-1, 0), (0, 1), (0, -1)):
        inside = (ys + dy >= 0) & (ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
        other = np.where(inside, pixels + dy * width + dx, pixels)
        same = inside & (position[other] >= 0) & (flat_classes[other] == flat_classes[pixels])
        neighbours.append(np.where(same, position[other], neighbours[0]))
    neighbours = np.stack(neighbours, axis=1)  # (N, 5)
    labels = neighbours[:, 0]
    while True:
        merged = labels[neighbours].min(axis=1)
        merged = merged[merged]  # pointer jumping: a pixel's label is a pixel whose own label is no larger
        if np.array_equal(merged, labels):
            break
        labels = merged
    out = np.full(classes.size, -1)
    out[pixels] = pixels[labels]
    return out.reshape(classes.shape)


def _largest_blobs(frames: np.ndarray, backdrop: np.ndarray, classes: np.ndarray, labels: np.ndarray, min_area: int):
    """Per colour and frame, the largest component of at least `min_area` pixels, measured softly (`_measure`):
    present (K, T), area (K, T), box (K, T, 4) and centroid (K, T, 2)."""
    num_frames = classes.shape[0]
    present = np.zeros((len(COLOURS), num_frames), dtype=bool)
    area = np.zeros((len(COLOURS), num_frames))
    box = np.zeros((len(COLOURS), num_frames, 4), dtype=np.int64)
    centroid = np.zeros((len(COLOURS), num_frames, 2))
    for k, t, ys, xs in _largest_components(classes, labels, min_area):
        present[k, t] = True
        area[k, t], box[k, t], centroid[k, t] = _measure(frames[t], backdrop[t], classes[t], k, ys, xs)
    return present, area, box, centroid


def _largest_components(classes: np.ndarray, labels: np.ndarray, min_area: int) -> list[tuple]:
    """(colour, frame, ys, xs) of the largest component of each colour in each frame, if >= `min_area` pixels."""
    height, width = classes.shape[1:]
    frame, ys, xs = np.nonzero(labels >= 0)  # (N,) each
    order = np.argsort(labels[frame, ys, xs], kind="stable")
    ys, xs = ys[order], xs[order]
    roots, starts, sizes = np.unique(labels[frame[order], ys, xs], return_index=True, return_counts=True)
    big = sizes >= min_area
    roots, starts, sizes = roots[big], starts[big], sizes[big]
    colour, time = classes.reshape(-1)[roots], roots // (height * width)
    ranked = np.lexsort((-sizes, time, colour))  # largest first within each (colour, frame)
    group = colour[ranked] * classes.shape[0] + time[ranked]
    winners = ranked[np.r_[True, group[1:] != group[:-1]]] if len(ranked) else ranked
    blobs = []
    for index in winners:
        pixels = slice(starts[index], starts[index] + sizes[index])
        blobs.append((int(colour[index]), int(time[index]), ys[pixels], xs[pixels]))
    return blobs


def _measure(frame: np.ndarray, backdrop: np.ndarray, classes: np.ndarray, k: int, ys: np.ndarray, xs: np.ndarray):
    """Soft area, box and centroid of one blob, insensitive to blur.

    Each pixel near the blob (within 2 pixels, not another colour's) gets an opacity alpha: where it lies between
    the background (0) and the blob's colour (1). Blur spreads alpha but keeps its sum (the area) and its centre
    of mass; a straight edge stays at alpha = 0.5, so the box is taken there. Returns (area, box, centroid).
    """
    pad = 2
    height, width = classes.shape
    y0, x0 = max(ys.min() - pad, 0), max(xs.min() - pad, 0)
    y1, x1 = min(ys.max() + pad + 1, height), min(xs.max() + pad + 1, width)
    near = np.zeros((y1 - y0, x1 - x0), dtype=bool)
    near[ys - y0, xs - x0] = True
    near = _grow(near, pad) & ((classes[y0:y1, x0:x1] < 0) | (classes[y0:y1, x0:x1] == k))
    direction = _PALETTE[k] - backdrop  # (3,)
    alpha = (frame[y0:y1, x0:x1] - backdrop) @ direction / max(float(direction @ direction), 1.0)  # (h, w)
    alpha = np.where(near, np.clip(alpha, -1.0, 1.0), 0.0)  # unclipped below 0: noise averages out
    solid_y, solid_x = np.nonzero(alpha > 0.5)
    if alpha.sum() < 1.0 or len(solid_y) == 0:  # the colour barely differs from the background: hard mask
        alpha = np.zeros_like(alpha)
        alpha[ys - y0, xs - x0] = 1.0
        solid_y, solid_x = ys - y0, xs - x0
    mass = alpha.sum()
    centroid = (alpha.sum(axis=0) @ np.arange(x0, x1) / mass, alpha.sum(axis=1) @ np.arange(y0, y1) / mass)
    box = (x0 + solid_x.min(), y0 + solid_y.min(), x0 + solid_x.max(), y0 + solid_y.max())
    return mass, box, centroid


def _grow(mask: np.ndarray, steps: int) -> np.ndarray:
    """Dilate a boolean mask by `steps` 4-neighbour steps."""
    for _ in range(steps):
        grown = mask.copy()
        grown[1:] |= mask[:-1]
        grown[:-1] |= mask[1:]
        grown[:, 1:] |= mask[:, :-1]
        grown[:, :-1] |= mask[:, 1:]
        mask = grown
    return mask


def _touches_other(box: np.ndarray, present: np.ndarray) -> np.ndarray:
    """Whether each blob's box, grown by one pixel, overlaps another present blob's box; (K, T) bool."""
    grown = box + np.array([-1, -1, 1, 1])  # (K, T, 4)
    a, b = grown[:, None], box[None, :]  # (K, 1, T, 4), (1, K, T, 4)
    overlap = (a[..., 0] <= b[..., 2]) & (b[..., 0] <= a[..., 2]) & (a[..., 1] <= b[..., 3]) & (b[..., 1] <= a[..., 3])
    overlap &= present[:, None] & present[None, :]  # (K, K, T)
    overlap[np.arange(len(box)), np.arange(len(box))] = False
    return overlap.any(axis=1)


# ------------------------------------------------------------------------------------------------------ attributes


def _usable(tracks: Tracks, k: int, cfg: OracleConfig) -> np.ndarray:
    """Frames to measure colour k on: its clean frames, or every frame it shows in if it is hardly ever clean."""
    clean = tracks.clean[k]
    return clean if clean.sum() > cfg.min_steps else tracks.present[k]


def _shape(tracks: Tracks, k: int, cfg: OracleConfig) -> str:
    """Shape class over clean frames: a triangle's mass sits low in its box; a square fills its box, a circle not."""
    frames = _usable(tracks, k, cfg)
    if not frames.any():
        return UNKNOWN
    box, area = tracks.box[k, frames], tracks.area[k, frames]
    width, height = box[:, 2] - box[:, 0] + 1, box[:, 3] - box[:, 1] + 1
    fill = float(np.median(area / (width * height)))
    low = float(np.median((tracks.centroid[k, frames, 1] - (box[:, 1] + box[:, 3]) / 2) / height))
    if low >= cfg.triangle_offset or fill < cfg.circle_fill:
        return "triangle"
    return "square" if fill >= cfg.square_fill else "circle"


def _size(tracks: Tracks, k: int, cfg: OracleConfig) -> str:
    """Size class nearest the median box side over clean frames."""
    frames = _usable(tracks, k, cfg)
    if not frames.any():
        return UNKNOWN
    box = tracks.box[k, frames]
    side = np.median(np.maximum(box[:, 2] - box[:, 0], box[:, 3] - box[:, 1]) + 1)
    return min(SIZES, key=lambda name: abs(SIZES[name] - side))


def _direction(tracks: Tracks, k: int, cfg: OracleConfig) -> str:
    """Initial direction: the dominant axis and sign of centroid motion over the first `early_frames` frames."""
    seen = np.flatnonzero(tracks.present[k])
    if len(seen) < 2:
        return UNKNOWN
    early = seen[seen <= seen[0] + cfg.early_frames]
    clean = early[tracks.clean[k, early]]
    frames = clean if len(clean) >= 2 else early  # occlusion moves centroids: prefer clean frames
    if len(frames) < 2:
        return UNKNOWN
    shift = tracks.centroid[k, frames[-1]] - tracks.centroid[k, frames[0]]  # (2,) as (x, y)
    axis = int(np.abs(shift).argmax())
    if abs(shift[axis]) < cfg.min_speed * (frames[-1] - frames[0]):
        return UNKNOWN
    unit = [0, 0]
    unit[axis] = int(np.sign(shift[axis]))
    return next(name for name, value in DIRECTIONS.items() if list(value) == unit)


def _motion(tracks: Tracks, k: int, cfg: OracleConfig) -> float:
    """Share of clean frame-to-frame steps of colour k that obey constant-speed bouncing motion.

    A step is good when it moves by the object's typical speed along its axis, in the direction it was going
    (any direction right after a bounce or a gap), or when it is a bounce: the box's distances to one wall
    before and after add up to that speed. Sideways drift beyond `tolerance` is never good.
    """
    usable = _usable(tracks, k, cfg)
    steps = np.flatnonzero(usable[:-1] & usable[1:])  # step t: frame t -> t + 1
    if len(steps) < cfg.min_steps:
        return 0.0
    moves = tracks.centroid[k, steps + 1] - tracks.centroid[k, steps]  # (S, 2)
    axis = int(np.abs(moves).sum(axis=0).argmax())
    speed = float(np.median(np.abs(moves[:, axis])))
    if speed < cfg.min_speed:
        return 0.0
    limit = (tracks.width, tracks.height)[axis] - 1
    gaps = np.stack([tracks.box[k, :, axis], limit - tracks.box[k, :, axis + 2]], axis=1)  # (T, 2) to each wall
    good, heading, previous = 0, 0, -2
    for step, move in zip(steps, moves):
        along, across = move[axis], move[1 - axis]
        if step != previous + 1:
            heading = 0  # a gap: the object may have bounced unseen
        previous = step
        sign = int(np.sign(along))
        steady = abs(abs(along) - speed) <= cfg.tolerance and heading in (0, sign)
        bounce = bool((np.abs(gaps[step] + gaps[step + 1] - speed) <= 2 * cfg.tolerance).any())
        good += abs(across) <= cfg.tolerance and (steady or bounce)
        heading = 0 if bounce or abs(across) > cfg.tolerance else sign
    return good / len(steps)


def _presence(tracks: Tracks, k: int) -> float:
    """Share of frames where colour k shows."""
    return float(tracks.present[k].mean()) if tracks.num_frames else 0.0


def recover(video_or_tracks, cfg: OracleConfig = OracleConfig()) -> Claim:
    """What the pixels show, as a Claim (objects in vocabulary colour order); unreadable attributes 'unknown'."""
    tracks = video_or_tracks if isinstance(video_or_tracks, Tracks) else track(video_or_tracks, cfg)
    objects = tuple(
        ObjectClaim(_size(tracks, k, cfg), colour, _shape(tracks, k, cfg), _direction(tracks, k, cfg))
        for k, colour in enumerate(COLOURS)
        if _presence(tracks, k) >= cfg.min_presence
    )
    return Claim(tracks.background or UNKNOWN, objects)


# ------------------------------------------------------------------------------------------------------ scores


def prompt_adherence(
    tracks: Tracks, claim: Claim, cfg: OracleConfig = OracleConfig(), directions: bool = True
) -> float:
    """(claimed objects recovered with every attribute + background right) / (claimed objects + 1)."""
    hits = float(tracks.background == claim.background)
    for obj in claim.objects:
        k = list(COLOURS).index(obj.colour)
        hits += (
            _presence(tracks, k) >= cfg.min_presence
            and _shape(tracks, k, cfg) == obj.shape
            and _size(tracks, k, cfg) == obj.size
            and (not directions or _direction(tracks, k, cfg) == obj.direction)
        )
    return hits / (len(claim.objects) + 1)


def motion_consistency(tracks: Tracks, claim: Claim, cfg: OracleConfig = OracleConfig()) -> float:
    """Mean over claimed objects of the share of their steps that obey the world's physics."""
    if not claim.objects:
        return 0.0
    return float(np.mean([_motion(tracks, list(COLOURS).index(obj.colour), cfg) for obj in claim.objects]))


def temporal_stability(tracks: Tracks, claim: Claim, cfg: OracleConfig = OracleConfig()) -> float:
    """Mean over frames of (claimed objects present at a steady area) / (claimed + unclaimed colours present)."""
    if tracks.num_frames == 0 or not claim.objects:
        return 0.0
    claimed = np.zeros(len(COLOURS), dtype=bool)
    claimed[[list(COLOURS).index(obj.colour) for obj in claim.objects]] = True
    typical = np.array([np.median(a[shown]) if shown.any() else 0.0 for a, shown in zip(tracks.area, tracks.present)])
    low, high = cfg.stable_area
    steady = tracks.present & (tracks.area >= low * typical[:, None]) & (tracks.area <= high * typical[:, None])
    good = (steady & claimed[:, None]).sum(axis=0)  # (T,)
    extra = (tracks.present & ~claimed[:, None]).sum(axis=0)  # (T,)
    return float(np.mean(good / (claimed.sum() + extra)))


def video_score(components: dict[str, float]) -> float:
    """Geometric mean of prompt_adherence, motion_consistency and temporal_stability (0 if any is 0)."""
    values = [min(max(float(components[name]), 0.0), 1.0) for name in COMPONENTS]
    if not all(np.isfinite(values)):
        return 0.0
    return float(np.prod(values) ** (1 / len(values)))


def score_video(video, caption: str | Claim, cfg: OracleConfig = OracleConfig()) -> dict[str, float]:
    """The three components and the video_score of a video (or its `Tracks`) against the caption it was made from."""
    claim = parse_caption(caption) if isinstance(caption, str) else caption
    tracks = video if isinstance(video, Tracks) else track(video, cfg)
    return _score(tracks, claim, cfg, directions=True)


def score_videos(
    videos: Sequence, captions: Sequence[str | Claim], cfg: OracleConfig = OracleConfig()
) -> dict[str, float]:
    """Mean of each `score_video` entry over videos; also 'num_videos'."""
    if len(videos) != len(captions):
        raise ValueError(f"got {len(videos)} videos for {len(captions)} captions")
    scores = [score_video(video, text, cfg) for video, text in zip(videos, captions)]
    names = (*COMPONENTS, "video_score")
    means = {name: float(np.mean([s[name] for s in scores])) if scores else 0.0 for name in names}
    return {**means, "num_videos": len(scores)}


def drift_vs_horizon(
    videos: Sequence,
    captions: Sequence[str | Claim] | None = None,
    window: int = 16,
    cfg: OracleConfig = OracleConfig(),
) -> dict[str, np.ndarray]:
    """Scores of consecutive `window`-frame windows, averaged over videos: {'start': (W,), component: (W,)}.

    Each window is scored like `score_video` without the initial direction (bounces change it). Without
    captions a video is scored against what its own first window shows, i.e. drift from its start. A last
    window shorter than `window` frames is dropped.
    """
    if window < 2:
        raise ValueError(f"window must be >= 2 frames, got {window}")
    if captions is not None and len(captions) != len(videos):
        raise ValueError(f"got {len(videos)} videos for {len(captions)} captions")
    all_tracks = [track(video, cfg) for video in videos]
    lengths = {tracks.num_frames for tracks in all_tracks}
    if len(lengths) > 1:
        raise ValueError(f"drift_vs_horizon needs videos of one length, got frame counts {sorted(lengths)}")
    starts = np.arange(0, (lengths.pop() if lengths else 0) - window + 1, window)
    curves = {name: np.zeros(len(starts)) for name in (*COMPONENTS, "video_score")}
    for index, tracks in enumerate(all_tracks):
        claim = recover(tracks.window(0, window), cfg) if captions is None else captions[index]
        claim = parse_caption(claim) if isinstance(claim, str) else claim
        for w, start in enumerate(starts):
            scores = _score(tracks.window(start, start + window), claim, cfg, directions=False)
            for name in curves:
                curves[name][w] += scores[name] / len(all_tracks)
    return {"start": starts, **curves}


def _score(tracks: Tracks, claim: Claim, cfg: OracleConfig, directions: bool) -> dict[str, float]:
    """Components and video_score of tracks against a claim."""
    components = {
        "prompt_adherence": prompt_adherence(tracks, claim, cfg, directions),
        "motion_consistency": motion_consistency(tracks, claim, cfg),
        "temporal_stability": temporal_stability(tracks, claim, cfg),
    }
    return {**components, "video_score": video_score(components)}
