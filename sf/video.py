"""Videos on disk and in memory (mp4, gif, H.264 bytes) and tiling several videos into one (teacher vs student)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

LABEL_HEIGHT = 12  # pixels of the caption strip that `side_by_side` adds above the videos when given labels


def to_uint8(video: np.ndarray | torch.Tensor) -> np.ndarray:
    """Convert a uint8 (T, H, W, 3) array or a float (T, C, H, W) video in [-1, 1] to uint8 (T, H, W, 3)."""
    if isinstance(video, torch.Tensor):
        video = video.detach().cpu()
        video = video.numpy() if video.dtype == torch.uint8 else video.float().numpy()
    video = np.asarray(video)
    if video.ndim != 4:
        raise ValueError(f"a video must have 4 dims, (T, H, W, 3) uint8 or (T, C, H, W) float; got shape {video.shape}")
    if video.dtype == np.uint8:
        frames = video  # (T, H, W, C)
    elif np.issubdtype(video.dtype, np.floating):
        frames = np.clip(np.rint((video + 1.0) * 127.5), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)  # (T, H, W, C)
    else:
        raise ValueError(f"a video must be uint8 (T, H, W, 3) or float (T, C, H, W) in [-1, 1]; got dtype {video.dtype}")
    if frames.shape[-1] == 1:
        frames = np.repeat(frames, 3, axis=-1)
    if frames.shape[-1] != 3:
        raise ValueError(f"a video must have 1 or 3 channels; got frames of shape {frames.shape[1:]} (H, W, C)")
    return np.ascontiguousarray(frames)


def save_video(frames: np.ndarray | torch.Tensor, path: str | Path, fps: int = 8) -> Path:
    """Write a video as .mp4 (H.264) or .gif, chosen by the file suffix; returns the path."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".mp4", ".gif"):
        raise ValueError(f"save_video writes .mp4 or .gif files; got {path.name!r}")
    if fps <= 0:
        raise ValueError(f"fps must be positive; got {fps}")
    frames = to_uint8(frames)  # (T, H, W, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".gif":
        import imageio.v3 as iio

        # the pillow plugin takes the frame duration in milliseconds; loop=0 repeats forever
        iio.imwrite(path, frames, extension=".gif", duration=1000.0 / fps, loop=0)
        return path
    with VideoWriter(path, fps) as writer:
        writer.append(frames)
    return path


class VideoWriter:
    """An H.264 mp4 written frame batch by frame batch (a stream that is being generated): `append` takes any
    layout `to_uint8` accepts; every batch must have the first one's height and width."""

    def __init__(self, path: str | Path, fps: int = 16):
        import imageio.v2 as imageio

        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise ValueError(f"VideoWriter writes .mp4 files; got {self.path.name!r}")
        if fps <= 0:
            raise ValueError(f"fps must be positive; got {fps}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.num_frames, self._size = 0, None
        # macro_block_size=1: no rescaling to a multiple of 16 (odd sides are padded in `append` instead)
        self._writer = imageio.get_writer(
            self.path, format="FFMPEG", mode="I", fps=fps, codec="libx264", pixelformat="yuv420p",
            macro_block_size=1, ffmpeg_log_level="error",
        )

    def append(self, frames: np.ndarray | torch.Tensor) -> None:
        """Write frames (T, H, W, 3) uint8 or (T, C, H, W) float in [-1, 1]."""
        frames = to_uint8(frames)
        if self._size is None:
            self._size = frames.shape[1:3]
        elif frames.shape[1:3] != self._size:
            raise ValueError(f"frames of {frames.shape[1:3]} (H, W) appended to a video of {self._size}")
        # yuv420p (the pixel format every player reads) needs even sides: pad by one edge pixel where odd
        pad_h, pad_w = frames.shape[1] % 2, frames.shape[2] % 2
        if pad_h or pad_w:
            frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)), mode="edge")
        for frame in frames:
            self._writer.append_data(frame)
        self.num_frames += len(frames)

    def close(self) -> None:
        """Finish the file (the mp4 is complete only after this)."""
        self._writer.close()

    def __enter__(self) -> VideoWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def encode_mp4(video: np.ndarray | torch.Tensor, fps: int = 16) -> bytes:
    """H.264 bytes of a video (lossy; see `save_video` for the accepted layouts)."""
    with tempfile.TemporaryDirectory() as tmp:
        return save_video(video, os.path.join(tmp, "video.mp4"), fps=fps).read_bytes()


def decode_mp4(data: bytes) -> np.ndarray:
    """Frames of mp4 bytes; uint8 (T, H, W, 3)."""
    import imageio.v2 as imageio

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "video.mp4")
        with open(path, "wb") as f:
            f.write(data)
        with imageio.get_reader(path, format="FFMPEG") as reader:
            return np.stack([np.asarray(frame)[..., :3] for frame in reader])


def side_by_side(
    videos: Sequence[np.ndarray | torch.Tensor], labels: Sequence[str] | None = None, gap: int = 2
) -> np.ndarray:
    """Tile videos left to right with `gap` black pixels between them, optionally captioned; uint8 (T, H, W, 3)."""
    if len(videos) == 0:
        raise ValueError("side_by_side needs at least one video")
    if labels is not None and len(labels) != len(videos):
        raise ValueError(f"got {len(labels)} labels for {len(videos)} videos")
    clips = [to_uint8(v) for v in videos]
    num_frames, height = clips[0].shape[0], clips[0].shape[1]
    for clip in clips:
        if clip.shape[:2] != (num_frames, height):
            shapes = [tuple(c.shape[:2]) for c in clips]
            raise ValueError(f"side_by_side needs the same frame count and height for all videos; got (T, H) {shapes}")
    pieces = []
    for i, clip in enumerate(clips):
        if i > 0 and gap > 0:
            pieces.append(np.zeros((num_frames, height, gap, 3), dtype=np.uint8))
        pieces.append(clip)
    tiled = np.concatenate(pieces, axis=2)  # (T, H, sum(W) + gap * (n - 1), 3)
    if labels is None:
        return tiled
    offsets = np.cumsum([0] + [c.shape[2] + gap for c in clips[:-1]]).tolist()
    strip = _caption_strip(tiled.shape[2], list(labels), offsets)  # (LABEL_HEIGHT, W, 3)
    return np.concatenate([np.broadcast_to(strip, (num_frames, *strip.shape)), tiled], axis=1)


def grid(videos: Sequence[np.ndarray | torch.Tensor], num_cols: int, gap: int = 2) -> np.ndarray:
    """Tile same-size videos into rows of `num_cols`, padding the last row with black; uint8 (T, H, W, 3)."""
    if num_cols <= 0:
        raise ValueError(f"num_cols must be positive; got {num_cols}")
    clips = [to_uint8(v) for v in videos]
    if len(clips) == 0:
        raise ValueError("grid needs at least one video")
    if any(c.shape != clips[0].shape for c in clips):
        raise ValueError(f"grid needs videos of one shape; got {sorted({tuple(c.shape) for c in clips})}")
    clips += [np.zeros_like(clips[0])] * (-len(clips) % num_cols)
    rows = [side_by_side(clips[i : i + num_cols], gap=gap) for i in range(0, len(clips), num_cols)]
    pieces = []
    for i, row in enumerate(rows):
        if i > 0 and gap > 0:
            pieces.append(np.zeros((row.shape[0], gap, row.shape[2], 3), dtype=np.uint8))
        pieces.append(row)
    return np.concatenate(pieces, axis=1)


def _caption_strip(width: int, labels: list[str], offsets: list[int]) -> np.ndarray:
    """Render labels in white on a black strip at the given x offsets; uint8 (LABEL_HEIGHT, width, 3)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (width, LABEL_HEIGHT))
    draw = ImageDraw.Draw(image)
    for label, x in zip(labels, offsets):
        draw.text((x + 1, 0), label, fill=(255, 255, 255))
    return np.asarray(image)


def latent_preview(latents: torch.Tensor, min_size: int = 64) -> torch.Tensor:
    """A viewable video (T, 3, H', W') in [-1, 1] from latents (T, C, H, W) without a VAE: first 3 channels,
    normalised per channel over the clip, upscaled (nearest) to at least `min_size` pixels."""
    x = latents.detach().float()[:, :3]
    if x.shape[1] < 3:
        x = torch.cat([x, x[:, :1].expand(-1, 3 - x.shape[1], -1, -1)], dim=1)
    lo = x.amin(dim=(0, 2, 3), keepdim=True)
    hi = x.amax(dim=(0, 2, 3), keepdim=True)
    x = 2 * (x - lo) / (hi - lo).clamp_min(1e-6) - 1
    scale = max(1, -(-min_size // max(x.shape[-2:])))
    return torch.nn.functional.interpolate(x, scale_factor=scale, mode="nearest")
