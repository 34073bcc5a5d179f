"""Latent shards: the pixels of video shards (``npy``/``mp4`` + ``txt`` + ``json``) encoded once by a codec, so that
training reads latents (``latent.safetensors``: {"latents": (F, C, h, w)}) instead of running the VAE every step.
`cache_latents` writes them, `decode_latent_sample` reads one back."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch

from sf.data.shards import (
    CorruptSample,
    ShardWriter,
    SkipCounter,
    decode_or_skip,
    decode_pixels,
    decode_tensors,
    decode_text,
    iter_samples,
    list_shards,
)
from sf.models.vae import VideoCodec, video_from_uint8

LATENT_MEMBER = "latent.safetensors"  # shard member holding {"latents": (F, C, h, w)}


class CachedLatents(NamedTuple):
    """What `cache_latents` wrote."""

    paths: list[str]
    num_samples: int
    num_skipped: int


class _Clip(NamedTuple):
    key: str
    members: dict[str, bytes]  # txt / json, copied as they are
    video: torch.Tensor  # (T, 3, H, W) in [-1, 1]


@torch.no_grad()
def cache_latents(
    in_shards: str | Iterable[str],
    codec: VideoCodec,
    out_dir: str,
    batch_size: int = 8,
    samples_per_shard: int = 256,
    prefix: str = "latents",
    sample: bool = False,
    latent_dtype: torch.dtype = torch.float16,
    rng: torch.Generator | None = None,
    progress: bool = True,
) -> CachedLatents:
    """Encode the pixels (``npy``, else ``mp4``) of video shards into ``<prefix>-%06d.tar`` latent shards.

    Each output sample keeps the input's key, ``txt`` and ``json`` and adds ``latent.safetensors`` with
    ``latents``: the codec's normalised latents (F, C, h, w) as `latent_dtype`. Samples that cannot be decoded
    or whose clip the codec cannot encode are counted, logged and skipped. Batches hold clips of one shape.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    skipped = SkipCounter()
    device = codec.latents_mean.device

    def decode(raw: dict[str, Any]) -> _Clip:
        clip = _decode_clip(raw)
        try:
            codec.check_video(clip.video[None])
        except ValueError as exn:
            raise CorruptSample(str(exn)) from exn
        return clip

    def flush(batch: list[_Clip], writer: ShardWriter) -> None:
        video = torch.stack([clip.video for clip in batch]).to(device)  # (B, T, 3, H, W)
        latents = codec.encode(video, sample=sample, rng=rng).to(latent_dtype).cpu()  # (B, F, C, h, w)
        for clip, row in zip(batch, latents):
            writer.write({"__key__": clip.key, **clip.members, LATENT_MEMBER: {"latents": row}})
        batch.clear()

    clips = decode_or_skip(iter_samples(list_shards(in_shards)), decode, skipped)
    with ShardWriter(out_dir, prefix, samples_per_shard, progress=progress) as writer:
        batch: list[_Clip] = []
        for clip in clips:
            if batch and (len(batch) == batch_size or clip.video.shape != batch[0].video.shape):
                flush(batch, writer)
            batch.append(clip)
        if batch:
            flush(batch, writer)
    return CachedLatents(writer.paths, writer.num_samples, skipped.count)


def _decode_clip(raw: dict[str, Any]) -> _Clip:
    """Raw shard sample -> _Clip; CorruptSample on missing or bad pixels."""
    video = video_from_uint8(decode_pixels(raw))
    members = {name: bytes(raw[name]) for name in ("txt", "json") if name in raw}
    return _Clip(str(raw["__key__"]), members, video)


def decode_latent_sample(raw: dict[str, Any]) -> dict[str, Any]:
    """A latent shard sample -> {"key", "prompt", "latents" (F, C, h, w) fp32}; CorruptSample on bad data."""
    if LATENT_MEMBER not in raw:
        raise CorruptSample(f"sample {raw.get('__key__')!r} has no {LATENT_MEMBER}")
    latents = decode_tensors(raw[LATENT_MEMBER]).get("latents")
    if latents is None or latents.ndim != 4:
        raise CorruptSample(f"{LATENT_MEMBER} must hold 'latents' (F, C, h, w)")
    latents = latents.float()
    if not torch.isfinite(latents).all():
        raise CorruptSample("latents contain inf or nan")
    return {"key": raw["__key__"], "prompt": decode_text(raw).strip(), "latents": latents}
