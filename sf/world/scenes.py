"""The embedded world: crisp shapes bouncing over a flat background, with captions made from the known truth.

A scene is 1-2 objects, each a (size, colour, shape) moving along one axis at a fixed integer speed and bouncing
off the frame walls (a bounce flips the velocity; the caption names the *initial* direction), over one of a few
backgrounds. Everything is integer pixels, so a video is an exact function of its `Scene`:

    "a large red circle moves left while a small blue square moves down on a grey background"

Vocabulary: 6 colours x 3 shapes x 4 directions x 2 sizes, 3 backgrounds (see the tables below). The 6
(colour, shape, direction) triples in `HELDOUT` never appear in ``train``/``val`` scenes and are the only ones in
``heldout`` scenes, while each colour, shape and direction alone is seen in training (a test of composition).
Scenes are deterministic: ``make_scene(seed, split, index)`` always returns the same scene; ``val`` and ``train``
draw from the same distribution with different seed streams.

Shards (webdataset, keys ``<split>-<seed>-<index>``) hold ``txt`` (the caption), ``json`` (the truth:
`Scene.to_dict` plus split/seed/index/num_frames) and the pixels as ``npy`` (raw uint8 (T, H, W, 3), exact; the
default, ~1 MB per 81-frame video) and/or ``mp4`` (H.264, ~6 KB: 150x smaller but lossy, colours bleed at edges).
Prompt-only shards (``pixels="none"``) carry ``txt`` + ``json`` and are what data-free DMD training reads; the
pixels can always be re-rendered from the json.

    python -c "from sf.world.scenes import main; main()" --out data/world/train --split train --num-videos 1024
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from sf.data.shards import ShardWriter, encode_npy
from sf.rng import seed_for
from sf.video import encode_mp4

# ------------------------------------------------------------------------------------------------------ vocabulary

COLOURS: dict[str, tuple[int, int, int]] = {  # >= 180 apart from each other and >= 130 from every background
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (40, 90, 240),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "magenta": (220, 50, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"grey": (128, 128, 128), "black": (10, 10, 10), "navy": (25, 30, 90)}
SHAPES = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 10, "large": 16}  # side of the object's square box, pixels
DIRECTIONS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}  # (x, y)
SPLITS = ("train", "val", "heldout")

# one triple per colour, cycling through shapes and directions, so every single attribute stays in training
HELDOUT: frozenset[tuple[str, str, str]] = frozenset(
    (colour, SHAPES[i % len(SHAPES)], list(DIRECTIONS)[i % len(DIRECTIONS)]) for i, colour in enumerate(COLOURS)
)  # red circle left, green square right, blue triangle up, yellow circle down, white square left, magenta tri. right


@dataclass(frozen=True)
class WorldSpec:
    """How scenes are drawn: frame size, clip length, speed and how many objects."""

    size: int = 64  # frame side, pixels
    num_frames: int = 81  # 21 latent frames after a 4x temporal causal VAE
    speed: int = 2  # pixels per frame along the object's axis
    min_objects: int = 1
    max_objects: int = 2
    min_run: int = 8  # frames an object moves before its first bounce, so the initial direction shows
    # starts are redrawn until every object keeps this share of its area visible in every frame ...
    min_visible: float = 0.6
    # ... and its box touches another object's box in at most this share of frames (so the truth can be read back)
    max_contact: float = 0.25

    def __post_init__(self):
        if not 1 <= self.min_objects <= self.max_objects <= len(COLOURS):
            raise ValueError(f"need 1 <= min_objects <= max_objects <= {len(COLOURS)}, got {self}")
        if self.size < max(SIZES.values()) + self.speed * self.min_run:
            raise ValueError(f"size {self.size} leaves no room for a large object's first {self.min_run} frames")
        if self.num_frames < 1 or self.speed < 1:
            raise ValueError(f"num_frames and speed must be >= 1, got {self.num_frames}, {self.speed}")


# ------------------------------------------------------------------------------------------------------ the truth


@dataclass(frozen=True)
class ObjectClaim:
    """What a caption says about one object."""

    size: str
    colour: str
    shape: str
    direction: str

    def phrase(self) -> str:
        """'a large red circle moves left'."""
        return f"a {self.size} {self.colour} {self.shape} moves {self.direction}"


@dataclass(frozen=True)
class Claim:
    """What a caption says about a scene: its background and its objects."""

    background: str
    objects: tuple[ObjectClaim, ...]


@dataclass(frozen=True)
class SceneObject:
    """One moving object: what it is, where its box starts (top-left corner) and its velocity at frame 0."""

    colour: str
    shape: str
    size: str
    position: tuple[int, int]  # (x, y) of the box's top-left pixel at frame 0
    velocity: tuple[int, int]  # (vx, vy) pixels per frame; exactly one of them is non-zero

    @property
    def extent(self) -> int:
        """Side of the object's box in pixels."""
        return SIZES[self.size]

    @property
    def direction(self) -> str:
        """Initial direction name, from the velocity's sign."""
        sign = (int(np.sign(self.velocity[0])), int(np.sign(self.velocity[1])))
        return next(name for name, unit in DIRECTIONS.items() if unit == sign)

    def claim(self) -> ObjectClaim:
        """The caption's view of this object."""
        return ObjectClaim(self.size, self.colour, self.shape, self.direction)


@dataclass(frozen=True)
class Scene:
    """The full truth of a video: background, objects (later ones drawn on top) and the frame side."""

    background: str
    objects: tuple[SceneObject, ...]
    size: int = 64

    def claim(self) -> Claim:
        """The caption's view of this scene."""
        return Claim(self.background, tuple(obj.claim() for obj in self.objects))

    def to_dict(self) -> dict[str, Any]:
        """JSON-able truth; derived fields (extent, direction) are included for readers, ignored by from_dict."""
        objects = [
            {"colour": o.colour, "shape": o.shape, "size": o.size, "extent": o.extent, "direction": o.direction,
             "position": list(o.position), "velocity": list(o.velocity)}
            for o in self.objects
        ]
        return {"background": self.background, "size": self.size, "objects": objects}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of `to_dict`."""
        objects = tuple(
            SceneObject(o["colour"], o["shape"], o["size"], tuple(o["position"]), tuple(o["velocity"]))
            for o in data["objects"]
        )
        return cls(data["background"], objects, int(data["size"]))


# ------------------------------------------------------------------------------------------------------ captions


def caption(scene: Scene | Claim) -> str:
    """'a large red circle moves left while a small blue square moves down on a grey background'."""
    claim = scene.claim() if isinstance(scene, Scene) else scene
    objects = " while ".join(obj.phrase() for obj in claim.objects)
    return f"{objects} on a {claim.background} background"


_OBJECT = re.compile(r"an? (\w+) (\w+) (\w+) moves (\w+)")
_SCENE = re.compile(r"(.+) on an? (\w+) background\.?")


def parse_caption(text: str) -> Claim:
    """Inverse of `caption`: the claimed background and objects; ValueError for text outside the vocabulary."""
    match = _SCENE.fullmatch(text.strip().lower())
    if match is None or match.group(2) not in BACKGROUNDS:
        raise ValueError(f"not a world caption (expected '... on a <{'|'.join(BACKGROUNDS)}> background'): {text!r}")
    objects = []
    for phrase in match.group(1).split(" while "):
        found = _OBJECT.fullmatch(phrase.strip())
        if found is None:
            raise ValueError(f"not an object phrase ('a <size> <colour> <shape> moves <direction>'): {phrase!r}")
        claim = ObjectClaim(*found.groups())
        for value, vocabulary in zip(found.groups(), (SIZES, COLOURS, SHAPES, DIRECTIONS)):
            if value not in vocabulary:
                raise ValueError(f"{value!r} in {phrase!r} is not one of {list(vocabulary)}")
        objects.append(claim)
    return Claim(match.group(2), tuple(objects))


# ------------------------------------------------------------------------------------------------------ sampling


def allowed_triples(split: str) -> list[tuple[str, str, str]]:
    """The (colour, shape, direction) triples a split draws objects from, in a fixed order."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    every = itertools.product(COLOURS, SHAPES, DIRECTIONS)
    return [triple for triple in every if (triple in HELDOUT) == (split == "heldout")]


def sample_scene(rng: np.random.Generator, split: str = "train", spec: WorldSpec = WorldSpec()) -> Scene:
    """Draw a scene's background and objects, then their starts until the objects stay apart (`separable`)."""
    triples = allowed_triples(split)
    num_objects = int(rng.integers(spec.min_objects, spec.max_objects + 1))
    background = list(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    kinds: list[tuple[str, str, str, str]] = []  # (colour, shape, direction, size), colours distinct
    for _ in range(num_objects):
        candidates = [triple for triple in triples if triple[0] not in {kind[0] for kind in kinds}]
        kinds.append((*candidates[int(rng.integers(len(candidates)))], list(SIZES)[int(rng.integers(len(SIZES)))]))
    for _ in range(1000):  # redrawing only the starts keeps the counts and attributes uniform
        scene = Scene(background, tuple(_place(rng, *kind, spec) for kind in kinds), spec.size)
        if separable(scene, spec):
            return scene
    raise RuntimeError(f"no starts keep {kinds} visible in 1000 draws for {spec}")


def make_scene(seed: int, split: str, index: int, spec: WorldSpec = WorldSpec()) -> Scene:
    """The scene number `index` of a split's seed stream (the same for the same arguments, on any machine)."""
    return sample_scene(np.random.default_rng(seed_for("sf.world", split, seed, index)), split, spec)


def _place(
    rng: np.random.Generator, colour: str, shape: str, direction: str, size: str, spec: WorldSpec
) -> SceneObject:
    """A SceneObject at a random start whose first bounce is at least `spec.min_run` frames away."""
    unit = DIRECTIONS[direction]
    room = spec.size - SIZES[size]  # positions run over [0, room]
    run = spec.speed * spec.min_run
    position = []
    for step in unit:  # x then y
        low, high = (run, room) if step < 0 else (0, room - run) if step > 0 else (0, room)
        position.append(int(rng.integers(low, high + 1)))
    velocity = (unit[0] * spec.speed, unit[1] * spec.speed)
    return SceneObject(colour, shape, size, tuple(position), velocity)


# ------------------------------------------------------------------------------------------------------ physics


def positions(scene: Scene, num_frames: int = 81) -> np.ndarray:
    """Top-left corners of every object's box over time, bounced off the walls; int (objects, T, 2) as (x, y)."""
    if num_frames < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    time = np.arange(num_frames)[:, None]  # (T, 1)
    tracks = []
    for obj in scene.objects:
        room = scene.size - obj.extent
        free = np.asarray(obj.position) + np.asarray(obj.velocity) * time  # (T, 2) unbounded path
        # bouncing between 0 and room is the unbounded path folded with period 2 * room
        tracks.append(room - np.abs(room - np.mod(free, 2 * room)))
    return np.stack(tracks).astype(np.int64) if tracks else np.zeros((0, num_frames, 2), np.int64)


def sprite(shape: str, extent: int) -> np.ndarray:
    """Boolean mask of a shape filling an extent x extent box (every box side touched); (extent, extent)."""
    centre = (extent - 1) / 2
    rows, cols = np.mgrid[0:extent, 0:extent]
    if shape == "square":
        return np.ones((extent, extent), dtype=bool)
    if shape == "circle":
        return (rows - centre) ** 2 + (cols - centre) ** 2 <= (extent / 2) ** 2
    if shape == "triangle":  # apex up: row r spans (r + 1) / 2 either side of the centre column
        return np.abs(cols - centre) <= (rows + 1) / 2
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def render(scene: Scene, num_frames: int = 81) -> np.ndarray:
    """The scene's video, crisp (no anti-aliasing); uint8 (T, H, W, 3)."""
    frames = np.empty((num_frames, scene.size, scene.size, 3), dtype=np.uint8)
    frames[:] = BACKGROUNDS[scene.background]
    for obj, track in zip(scene.objects, positions(scene, num_frames)):
        _paint(frames, obj, track, COLOURS[obj.colour])
    return frames


def min_visible_fraction(scene: Scene, num_frames: int = 81) -> float:
    """Smallest fraction of any object's area left visible (not drawn over) in any frame."""
    ids = np.full((num_frames, scene.size, scene.size), -1, dtype=np.int64)  # (T, H, W) object on top, -1: none
    for index, (obj, track) in enumerate(zip(scene.objects, positions(scene, num_frames))):
        _paint(ids, obj, track, index)
    fractions = [
        (ids == index).sum(axis=(1, 2)).min() / sprite(obj.shape, obj.extent).sum()
        for index, obj in enumerate(scene.objects)
    ]
    return float(min(fractions, default=1.0))


def contact_fraction(scene: Scene, num_frames: int = 81) -> float:
    """Largest share of frames in which an object's box touches (or overlaps) another object's box."""
    tracks = positions(scene, num_frames)  # (N, T, 2)
    extent = np.array([obj.extent for obj in scene.objects])[:, None, None]  # (N, 1, 1)
    low, high = tracks - 1, tracks + extent  # (N, T, 2) each: the box grown by one pixel, exclusive end
    touch = (low[:, None] < tracks[None] + extent[None]) & (tracks[None] < high[:, None])  # (N, N, T, 2)
    touch = touch.all(axis=-1)  # (N, N, T)
    touch[np.arange(len(tracks)), np.arange(len(tracks))] = False
    return float(touch.any(axis=1).mean(axis=1).max(initial=0.0))


def separable(scene: Scene, spec: WorldSpec = WorldSpec()) -> bool:
    """Whether every object stays `min_visible` visible and in contact for at most `max_contact` of the frames."""
    return (
        min_visible_fraction(scene, spec.num_frames) >= spec.min_visible
        and contact_fraction(scene, spec.num_frames) <= spec.max_contact
    )


def _paint(canvas: np.ndarray, obj: SceneObject, track: np.ndarray, value) -> None:
    """Draw one object into every frame of a (T, H, W, ...) canvas at its (T, 2) track."""
    mask = sprite(obj.shape, obj.extent)
    for frame, (x, y) in zip(canvas, track):
        frame[y : y + obj.extent, x : x + obj.extent][mask] = value


# ------------------------------------------------------------------------------------------------------ shards

PIXEL_FORMATS = ("npy", "mp4", "both", "none")


def world_sample(seed: int, split: str, index: int, spec: WorldSpec = WorldSpec(), pixels: str = "npy") -> dict:
    """One webdataset sample (``__key__``, ``txt``, ``json`` and the chosen pixel members) of the world."""
    if pixels not in PIXEL_FORMATS:
        raise ValueError(f"pixels must be one of {PIXEL_FORMATS}, got {pixels!r}")
    scene = make_scene(seed, split, index, spec)
    meta = {**scene.to_dict(), "split": split, "seed": seed, "index": index, "num_frames": spec.num_frames}
    sample = {"__key__": f"{split}-{seed}-{index:07d}", "txt": caption(scene), "json": meta}
    if pixels != "none":
        video = render(scene, spec.num_frames)
        if pixels in ("npy", "both"):
            sample["npy"] = encode_npy(video)
        if pixels in ("mp4", "both"):
            sample["mp4"] = encode_mp4(video)
    return sample


def write_world_shards(
    out_dir: str,
    split: str,
    num_videos: int,
    seed: int = 0,
    samples_per_shard: int = 256,
    pixels: str = "npy",
    spec: WorldSpec = WorldSpec(),
    progress: bool = True,
) -> list[str]:
    """Write videos 0..num_videos-1 of a split's seed stream into ``world-<split>-%06d.tar``; returns the paths."""
    if num_videos < 1:
        raise ValueError(f"num_videos must be >= 1, got {num_videos}")
    allowed_triples(split)  # validates the split before any file is made
    with ShardWriter(out_dir, f"world-{split}", samples_per_shard, total=num_videos, progress=progress) as writer:
        for index in range(num_videos):
            writer.write(world_sample(seed, split, index, spec, pixels))
    return writer.paths


# ------------------------------------------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    """Write embedded-world shards (captions, truth json and pixels) for one split."""
    parser = argparse.ArgumentParser(
        prog="sf-world", description=main.__doc__,
        epilog=f"held-out (colour, shape, direction) triples, never in train/val: {sorted(HELDOUT)}",
    )
    parser.add_argument("--out", required=True, help="output directory for world-<split>-%%06d.tar shards")
    parser.add_argument("--split", default="train", choices=SPLITS, help="heldout: only the held-out triples")
    parser.add_argument("--num-videos", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0, help="seed stream (videos are seed x split x index)")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--pixels", default="npy", choices=PIXEL_FORMATS, help="npy: exact; mp4: small, lossy")
    parser.add_argument("--prompts-only", action="store_true", help="captions + truth only (same as --pixels none)")
    parser.add_argument("--num-frames", type=int, default=WorldSpec.num_frames)
    parser.add_argument("--preview", type=int, default=0, metavar="N", help="also write preview.mp4 of N videos")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    spec = WorldSpec(num_frames=args.num_frames)
    pixels = "none" if args.prompts_only else args.pixels
    paths = write_world_shards(
        args.out, args.split, args.num_videos, args.seed, args.samples_per_shard, pixels, spec, not args.no_progress
    )
    print(f"wrote {args.num_videos} {args.split} videos ({pixels} pixels) into {len(paths)} shards in {args.out}")
    if args.preview > 0:
        print(f"preview: {write_preview(args.out, args.split, args.seed, args.preview, spec)}")


def write_preview(out_dir: str, split: str, seed: int, num_videos: int, spec: WorldSpec = WorldSpec()) -> str:
    """A grid video of the first videos of a split (preview.mp4) and their captions (preview.txt)."""
    from sf.video import grid, save_video

    scenes = [make_scene(seed, split, index, spec) for index in range(num_videos)]
    tiles = grid([render(scene, spec.num_frames) for scene in scenes], num_cols=min(4, num_videos))
    path = save_video(tiles, os.path.join(out_dir, "preview.mp4"), fps=16)
    with open(os.path.join(out_dir, "preview.txt"), "w", encoding="utf-8") as f:
        f.writelines(f"{index}: {caption(scene)}\n" for index, scene in enumerate(scenes))
    return str(path)
