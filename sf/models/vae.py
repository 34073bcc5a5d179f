"""Video codecs: pixels (B, T, 3, H, W) in [-1, 1] <-> normalised latents (B, F, C, h, w), the DiT's layout.

`VideoCodec` is the interface everything else uses; its per-channel latent statistics are buffers, so
``encode`` returns (z - mean) / std and ``decode`` undoes that first. Two codecs:

  WanVAE         diffusers' `AutoencoderKLWan` behind the interface: causal 3-D convolutions, the first frame
                 encoded alone, then 4 frames per latent frame, 8x spatial (81 x 64 x 64 -> 21 x 8 x 8)
  IdentityCodec  latents = pixels (for tests of code that only needs *a* codec)

Named Wan configs live in `WAN_VAE_CONFIGS`: ``world`` (tiny, trained on the embedded world by the project's
recipe, `task=vae`) and ``wan2.1`` (the released VAE's layout and latent statistics). Facts about diffusers'
implementation that shape this module:
  - its encoder runs frame 0, then chunks of 4 frames, carrying a feature cache between chunks: a clip whose length
    is not 1 + 4k loses its last frames silently, so we refuse such clips;
  - its decoder runs one latent frame at a time (frame 0 -> 1 frame, every other -> 4) and clamps to [-1, 1];
    the clamp zeroes the gradient of overshooting pixels, so training decodes through `WanVAE.decode_raw`
    with ``clamp=False`` (the same loop without the clamp, checked against diffusers in the tests).

Codecs are saved as one safetensors file carrying their kind, config and latent statistics (`save_codec`,
`load_codec`); `sf.data.latents.cache_latents` turns pixel shards into latent shards with them.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file

from sf.io import first_line, read_json_object, read_safetensors

_FORMAT_KEY = "sf_codec"  # safetensors metadata: the codec kind; its presence marks a codec file
_CONFIG_KEY = "sf_codec_config"  # safetensors metadata: json of the codec's constructor config

# AutoencoderKLWan arguments; `latents_mean`/`latents_std` only seed the codec's stat buffers.
WAN_VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # the embedded world's codec (0.67M params): 81 x 64 x 64 -> 21 x 16 x 8 x 8, encode 0.7 s + decode 1.4 s (1 thread)
    "world": dict(
        base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
    ),
    # the released Wan2.1 VAE (also used by Wan2.1-T2V-1.3B/14B), with its published latent statistics
    "wan2.1": dict(
        base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
        temperal_downsample=[False, True, True], dropout=0.0,
        latents_mean=[
            -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
            0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
        ],
        latents_std=[
            2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
            3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
        ],
    ),
}
_WAN_KEYS = frozenset(
    ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales", "temperal_downsample",
     "dropout", "latents_mean", "latents_std")
)


def video_from_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 (T, H, W, 3) frames -> float (T, 3, H, W) video in [-1, 1]."""
    frames = torch.as_tensor(np.asarray(frames))
    if frames.dtype != torch.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"expected uint8 frames (T, H, W, 3), got {frames.dtype} {tuple(frames.shape)}")
    return frames.permute(0, 3, 1, 2).float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------ interface


class VideoCodec(nn.Module):
    """Video (B, T, 3, H, W) in [-1, 1] <-> normalised latents (B, F, C, h, w); subclasses implement the raw maps.

    Time is compressed causally: frame 0 alone, then `temporal_compression` frames per latent frame, so a clip
    needs 1 + k * temporal_compression frames. The stat buffers (C,) are float32 unless the whole module is cast.
    """

    kind: str  # the name `save_codec` records and `codec_from_config` accepts

    def __init__(
        self,
        latent_channels: int,
        temporal_compression: int,
        spatial_compression: int,
        latents_mean: Iterable[float] | None = None,
        latents_std: Iterable[float] | None = None,
    ):
        super().__init__()
        self.latent_channels = latent_channels
        self.temporal_compression = temporal_compression
        self.spatial_compression = spatial_compression
        self.register_buffer("latents_mean", torch.zeros(latent_channels))
        self.register_buffer("latents_std", torch.ones(latent_channels))
        if latents_mean is not None or latents_std is not None:
            mean = torch.zeros(latent_channels) if latents_mean is None else latents_mean
            std = torch.ones(latent_channels) if latents_std is None else latents_std
            self.set_latent_stats(mean, std)

    # ---- what subclasses provide

    def encode_raw(self, video: torch.Tensor, sample: bool = False, rng: torch.Generator | None = None):
        """Unnormalised latents (B, F, C, h, w) of a checked video (B, T, 3, H, W)."""
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        """Video (B, T, 3, H, W) of unnormalised latents (B, F, C, h, w)."""
        raise NotImplementedError

    def codec_config(self) -> dict[str, Any]:
        """JSON-able constructor arguments (without the latent stats, which are buffers)."""
        raise NotImplementedError

    # ---- the interface

    def encode(
        self, video: torch.Tensor, sample: bool = False, rng: torch.Generator | None = None
    ) -> torch.Tensor:
        """Normalised latents (B, F, C, h, w) of a video (B, T, 3, H, W); the posterior mean unless `sample`."""
        self.check_video(video)
        return self.normalize(self.encode_raw(video, sample=sample, rng=rng))

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Video (B, T, 3, H, W) in [-1, 1] of normalised latents (B, F, C, h, w)."""
        self.check_latents(latents)
        return self.decode_raw(self.denormalize(latents))

    def stream_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """A decoder for latents that arrive chunk by chunk (B, f, C, h, w), normalised: each call returns the
        frames (B, T, 3, H, W) its chunk adds, and together they are `decode` of the whole. This one decodes each
        chunk on its own, which is exact only without temporal compression; codecs with causal temporal state
        (WanVAE) carry it from call to call."""
        if self.temporal_compression != 1:
            raise NotImplementedError(f"{type(self).__name__} compresses time and has no streaming decoder")
        return self.decode

    def latent_frames(self, num_frames: int) -> int:
        """Latent frames of a clip of `num_frames` frames (1 + k * temporal_compression, else ValueError)."""
        if num_frames < 1 or (num_frames - 1) % self.temporal_compression:
            raise ValueError(
                f"a clip needs 1 + k * {self.temporal_compression} frames (first frame alone, then "
                f"{self.temporal_compression} per latent frame), got {num_frames}"
            )
        return 1 + (num_frames - 1) // self.temporal_compression

    def video_frames(self, latent_frames: int) -> int:
        """Frames decoded from `latent_frames` latent frames."""
        if latent_frames < 1:
            raise ValueError(f"latent_frames must be >= 1, got {latent_frames}")
        return 1 + (latent_frames - 1) * self.temporal_compression

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        """(F, C, h, w) of a (num_frames, 3, height, width) video."""
        self._check_size(height, width)
        s = self.spatial_compression
        return self.latent_frames(num_frames), self.latent_channels, height // s, width // s

    def check_video(self, video: torch.Tensor) -> None:
        """ValueError unless video is (B, T, 3, H, W) with an encodable T, H and W."""
        if video.ndim != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be (B, T, 3, H, W), got shape {tuple(video.shape)}")
        _, num_frames, _, height, width = video.shape
        self.latent_shape(num_frames, height, width)

    def check_latents(self, latents: torch.Tensor) -> None:
        """ValueError unless latents are (B, F, C, h, w) with this codec's C."""
        if latents.ndim != 5 or latents.shape[2] != self.latent_channels:
            raise ValueError(f"latents must be (B, F, {self.latent_channels}, h, w), got {tuple(latents.shape)}")

    def _check_size(self, height: int, width: int) -> None:
        s = self.spatial_compression
        if height % s or width % s:
            raise ValueError(f"frame height and width must be multiples of {s}, got {height}x{width}")

    # ---- latent statistics

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """(z - mean) / std per channel of (B, F, C, h, w), computed in float32, returned in z's dtype."""
        mean, std = self._stats()
        return ((z.float() - mean) / std).to(z.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Inverse of `normalize`."""
        mean, std = self._stats()
        return (latents.float() * std + mean).to(latents.dtype)

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (self.latent_channels, 1, 1)  # broadcasts over (B, F, C, h, w)
        return self.latents_mean.float().view(shape), self.latents_std.float().view(shape)

    @torch.no_grad()
    def set_latent_stats(self, mean: Iterable[float] | torch.Tensor, std: Iterable[float] | torch.Tensor) -> None:
        """Set the per-channel mean and std (C,) that `encode` removes and `decode` restores."""
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.shape != (self.latent_channels,) or std.shape != (self.latent_channels,):
            raise ValueError(
                f"latent stats need {self.latent_channels} values each, got {mean.numel()} means and {std.numel()} stds"
            )
        if not (torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
            raise ValueError(f"latent stats must be finite with std > 0, got mean {mean.tolist()}, std {std.tolist()}")
        self.latents_mean.copy_(mean)
        self.latents_std.copy_(std)

    @torch.no_grad()
    def fit_latent_stats(self, videos: Iterable[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Set the stats to the per-channel mean/std of the posterior means of `videos` (each (B, T, 3, H, W)).

        Accumulates in float64 over every latent position of every video; returns (mean, std), each (C,).
        """
        total = torch.zeros(self.latent_channels, dtype=torch.float64)
        total_sq = torch.zeros(self.latent_channels, dtype=torch.float64)
        count = 0
        for video in videos:
            self.check_video(video)
            z = self.encode_raw(video.to(self.latents_mean.device), sample=False).double().cpu()  # (B, F, C, h, w)
            total += z.sum(dim=(0, 1, 3, 4))
            total_sq += z.square().sum(dim=(0, 1, 3, 4))
            count += z.numel() // self.latent_channels
        if count == 0:
            raise ValueError("fit_latent_stats got no videos")
        mean = total / count
        std = (total_sq / count - mean.square()).clamp_min(0).sqrt()
        if (std == 0).any():
            raise ValueError(f"latent channels {(std == 0).nonzero().flatten().tolist()} are constant over the videos")
        self.set_latent_stats(mean, std)
        return self.latents_mean.clone(), self.latents_std.clone()


# ------------------------------------------------------------------------------------------------------ Wan VAE


class WanVAE(VideoCodec):
    """diffusers' AutoencoderKLWan (in ``self.vae``) behind the VideoCodec interface; see `WAN_VAE_CONFIGS`."""

    kind = "wan"

    def __init__(self, config: dict[str, Any], model: nn.Module | None = None):
        """Build the VAE of `config` (AutoencoderKLWan arguments), or wrap `model`, an AutoencoderKLWan of it."""
        from diffusers import AutoencoderKLWan
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d

        config = _check_wan_config(config)
        arch = {k: v for k, v in config.items() if k not in ("latents_mean", "latents_std")}
        num_downsamples = len(arch["dim_mult"]) - 1
        super().__init__(
            latent_channels=arch["z_dim"],
            temporal_compression=2 ** sum(arch["temperal_downsample"]),
            spatial_compression=2**num_downsamples,
            latents_mean=config.get("latents_mean"),
            latents_std=config.get("latents_std"),
        )
        self.arch = arch
        if model is None:
            model = AutoencoderKLWan(
                **arch, latents_mean=self.latents_mean.tolist(), latents_std=self.latents_std.tolist(),
                scale_factor_temporal=self.temporal_compression, scale_factor_spatial=self.spatial_compression,
            )
        else:
            mismatched = {k: (v, model.config[k]) for k, v in arch.items() if _plain(model.config[k]) != v}
            if mismatched:
                raise ValueError(f"the model's config differs from the codec config at (ours, model's): {mismatched}")
        self.vae = model
        # causal convolutions in the decoder = slots of its feature cache (for `_decode_unclamped`)
        self._num_decoder_convs = sum(isinstance(m, WanCausalConv3d) for m in model.decoder.modules())

    @classmethod
    def from_flavor(cls, flavor: str, **overrides) -> WanVAE:
        """A freshly initialised VAE of a named config in WAN_VAE_CONFIGS, with fields overridden."""
        if flavor not in WAN_VAE_CONFIGS:
            raise ValueError(f"unknown Wan VAE config {flavor!r}; choose from {sorted(WAN_VAE_CONFIGS)}")
        return cls({**WAN_VAE_CONFIGS[flavor], **overrides})

    @classmethod
    def from_diffusers(cls, model: nn.Module) -> WanVAE:
        """Wrap an AutoencoderKLWan (e.g. from ``from_pretrained``); its config's latent stats become ours."""
        config = model.config
        if config.get("is_residual") or config.get("patch_size") is not None:
            raise ValueError("Wan2.2-style VAEs (is_residual / patch_size) are not supported by WanVAE")
        if config.get("in_channels", 3) != 3 or config.get("out_channels", 3) != 3:
            raise ValueError("WanVAE needs an RGB VAE (in_channels = out_channels = 3)")
        return cls({k: _plain(config[k]) for k in _WAN_KEYS if k in config}, model=model)

    @classmethod
    def from_pretrained(cls, path: str, subfolder: str | None = None, **kwargs) -> WanVAE:
        """A diffusers-format VAE directory (config.json + safetensors), e.g. a Wan2.1 pipeline's ``vae`` folder."""
        from diffusers import AutoencoderKLWan

        return cls.from_diffusers(AutoencoderKLWan.from_pretrained(path, subfolder=subfolder, **kwargs))

    def codec_config(self) -> dict[str, Any]:
        return dict(self.arch)

    def posterior(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance (B, F, C, h, w) each, unnormalised, of the posterior of a video (B, T, 3, H, W)."""
        self.check_video(video)
        dist = self._distribution(video)
        return _to_ours(dist.mean), _to_ours(dist.logvar)

    def encode_raw(self, video, sample=False, rng=None):
        dist = self._distribution(video)
        return _to_ours(dist.sample(generator=rng) if sample else dist.mode())

    def decode_raw(self, z: torch.Tensor, clamp: bool = True) -> torch.Tensor:
        """Video (B, T, 3, H, W) of unnormalised latents; ``clamp=False`` skips diffusers' final clamp to [-1, 1]."""
        z = _to_diffusers(z).to(self.vae.dtype)  # (B, C, F, h, w)
        video = self.vae.decode(z).sample if clamp else self._decode_unclamped(z)
        return _to_ours(video)

    def _distribution(self, video: torch.Tensor):
        return self.vae.encode(_to_diffusers(video).to(self.vae.dtype)).latent_dist  # on (B, 2C, F, h, w)

    def _decode_unclamped(self, z: torch.Tensor) -> torch.Tensor:
        """diffusers' decode loop (a latent frame at a time over a feature cache) minus the clamp; (B, 3, T, H, W)."""
        return self._decode_frames(z, [None] * self._num_decoder_convs, first=True)

    def _decode_frames(self, z: torch.Tensor, cache: list[Any], first: bool) -> torch.Tensor:
        """Latent frames (B, C, f, h, w) decoded one by one over `cache`, the causal convolutions' last inputs
        (updated in place); `first`: z starts the video (its first frame decodes to one frame, not
        `temporal_compression`)."""
        x = self.vae.post_quant_conv(z)  # a 1x1x1 convolution: frame-wise
        frames = [
            self.vae.decoder(x[:, :, i : i + 1], feat_cache=cache, feat_idx=[0], first_chunk=first and i == 0)
            for i in range(x.shape[2])
        ]
        return torch.cat(frames, dim=2)

    def stream_decoder(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Each chunk of latents decoded as it arrives, the decoder's causal feature cache carried across calls:
        the frames equal `decode` of the whole latent video (a real-time stream's decoder)."""
        cache: list[Any] = [None] * self._num_decoder_convs
        started = False

        def decode_chunk(latents: torch.Tensor) -> torch.Tensor:
            nonlocal started
            self.check_latents(latents)
            z = _to_diffusers(self.denormalize(latents)).to(self.vae.dtype)  # (B, C, f, h, w)
            video = self._decode_frames(z, cache, first=not started).clamp(-1.0, 1.0)
            started = True
            return _to_ours(video)

        return decode_chunk

    @torch.no_grad()
    def set_latent_stats(self, mean, std) -> None:
        super().set_latent_stats(mean, std)
        if hasattr(self, "vae"):  # keep the diffusers config (what save_pretrained writes) in step
            self.vae.register_to_config(latents_mean=self.latents_mean.tolist(), latents_std=self.latents_std.tolist())


def _check_wan_config(config: dict[str, Any]) -> dict[str, Any]:
    """A copy of a WanVAE config (lists, not tuples) after checking what diffusers assumes."""
    unknown = sorted(set(config) - _WAN_KEYS)
    if unknown:
        raise ValueError(f"unknown Wan VAE config keys {unknown}; known: {sorted(_WAN_KEYS)}")
    missing = sorted({"base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample"} - set(config))
    if missing:
        raise ValueError(f"Wan VAE config lacks {missing}")
    config = {k: _plain(v) for k, v in config.items()}
    config.setdefault("attn_scales", [])
    config.setdefault("dropout", 0.0)
    if len(config["temperal_downsample"]) != len(config["dim_mult"]) - 1:
        raise ValueError(
            f"temperal_downsample needs one entry per downsampling (len(dim_mult) - 1 = {len(config['dim_mult']) - 1}),"
            f" got {config['temperal_downsample']}"
        )
    if sum(map(bool, config["temperal_downsample"])) != 2:
        # diffusers' encoder feeds frame 0, then chunks of exactly 4 frames, whatever the config says
        raise ValueError(f"diffusers' Wan VAE assumes 4x temporal compression (two True in temperal_downsample), "
                         f"got {config['temperal_downsample']}")
    return config


def _plain(value: Any) -> Any:
    """Tuples (and nested ones, as diffusers' FrozenDict stores lists) -> lists, for configs compared as json."""
    return [_plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _to_diffusers(x: torch.Tensor) -> torch.Tensor:
    """(B, T, C, H, W) -> diffusers' (B, C, T, H, W)."""
    return x.permute(0, 2, 1, 3, 4)


def _to_ours(x: torch.Tensor) -> torch.Tensor:
    """diffusers' (B, C, T, H, W) -> (B, T, C, H, W)."""
    return x.permute(0, 2, 1, 3, 4)


# ------------------------------------------------------------------------------------------------------ identity


class IdentityCodec(VideoCodec):
    """Latents = pixels: 3 channels, no compression (tests of code that needs a codec, not a good one)."""

    kind = "identity"

    def __init__(self, latents_mean: Iterable[float] | None = None, latents_std: Iterable[float] | None = None):
        super().__init__(3, 1, 1, latents_mean, latents_std)

    def encode_raw(self, video, sample=False, rng=None):
        return video

    def decode_raw(self, z):
        return z

    def codec_config(self) -> dict[str, Any]:
        return {}


# ------------------------------------------------------------------------------------------------------ building

_CODECS: dict[str, type[VideoCodec]] = {"wan": WanVAE, "identity": IdentityCodec}


@dataclass
class CodecConfig:
    """Which codec: a kind, a named Wan config with overrides, or saved weights (a codec file or diffusers dir)."""

    # auto: the teacher's VAE when its checkpoint is a Wan directory, else identity (latent previews)
    kind: str = field(default="wan", metadata={"choices": ("auto", "wan", "identity")})
    flavor: str = "world"  # a key of WAN_VAE_CONFIGS (kind wan, no checkpoint)
    checkpoint: Optional[str] = None  # a save_codec file, a Wan model directory or its VAE (either layout)
    overrides: dict = field(default_factory=dict)  # WAN_VAE_CONFIGS fields (fresh codecs only)


def codec_from_config(cfg: CodecConfig | dict) -> VideoCodec:
    """The codec a CodecConfig (or a dict of its fields) describes."""
    if isinstance(cfg, dict):
        cfg = CodecConfig(**cfg)
    if cfg.kind not in _CODECS:
        raise ValueError(f"unknown codec kind {cfg.kind!r}; choose from {sorted(_CODECS)}")
    if cfg.checkpoint is not None:
        if cfg.overrides:
            raise ValueError(f"codec overrides {cfg.overrides} cannot apply to the saved codec {cfg.checkpoint}")
        path = Path(cfg.checkpoint)
        codec = load_wan_vae(path) if path.is_dir() or path.suffix == ".pth" else load_codec(path)
        if codec.kind != cfg.kind:
            raise ValueError(f"{cfg.checkpoint} holds a {codec.kind!r} codec, the config asks for {cfg.kind!r}")
        return codec
    if cfg.kind == "identity":
        if cfg.overrides:
            raise ValueError(f"the identity codec takes no overrides, got {cfg.overrides}")
        return IdentityCodec()
    return WanVAE.from_flavor(cfg.flavor, **cfg.overrides)


def read_json_or_empty(path: Path) -> dict:
    """A JSON object file, or {} when it is missing or not one."""
    try:
        return read_json_object(path)
    except (OSError, ValueError):
        return {}


def load_wan_vae(path: str | Path) -> WanVAE:
    """The VAE of a Wan model directory (diffusers `vae/` or the original `Wan2.1_VAE.pth`), a diffusers
    AutoencoderKLWan folder, or an original VAE file. Latent statistics: the diffusers config's, else (original
    files, which do not hold them) the released Wan2.1 VAE's when the architecture is that one."""
    from diffusers import AutoencoderKLWan

    from sf.models.wan import (
        read_torch_weights,
        wan_files,
        wan_vae_config,
        wan_vae_to_diffusers,
    )

    path = Path(path)
    if path.is_dir() and read_json_or_empty(path / "config.json").get("_class_name") == "AutoencoderKLWan":
        folder = path  # a diffusers AutoencoderKLWan folder itself
    else:
        folder = wan_files(path).need("vae") if path.is_dir() else path
    if folder.is_dir():
        try:
            return WanVAE.from_diffusers(AutoencoderKLWan.from_pretrained(str(folder), local_files_only=True))
        except (OSError, ValueError) as e:
            raise ValueError(f"{folder}: not a loadable AutoencoderKLWan ({first_line(e)})") from None
    state = read_torch_weights(folder)
    try:
        config = wan_vae_config(state)
        released = WAN_VAE_CONFIGS["wan2.1"]
        if all(config[k] == released[k] for k in ("base_dim", "z_dim", "num_res_blocks")):
            config.update(latents_mean=released["latents_mean"], latents_std=released["latents_std"])
        codec = WanVAE(config)
        codec.vae.load_state_dict(wan_vae_to_diffusers(state), strict=True)
    except (KeyError, RuntimeError) as e:  # names or shapes of something else
        raise ValueError(f"{folder}: not a Wan VAE state dict ({first_line(e)})") from None
    return codec


# ------------------------------------------------------------------------------------------------------ save / load


def save_codec(codec: VideoCodec, path: str | Path) -> Path:
    """Write weights and latent stats as safetensors, with the codec's kind and config in the metadata."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in codec.state_dict().items()}
    metadata = {"format": "pt", _FORMAT_KEY: codec.kind, _CONFIG_KEY: json.dumps(codec.codec_config())}
    save_file(state, str(path), metadata=metadata)
    return path


def load_codec(path: str | Path, device: torch.device | str = "cpu") -> VideoCodec:
    """The codec `save_codec` wrote at `path` (safetensors only; nothing is unpickled)."""
    path = Path(path)
    state, metadata = read_safetensors(path)
    kind = metadata.get(_FORMAT_KEY)
    if kind is None or _CONFIG_KEY not in metadata:
        raise ValueError(f"{path}: not a video codec file (no {_FORMAT_KEY!r} metadata; save_codec writes them)")
    if kind not in _CODECS:
        raise ValueError(f"{path}: unknown codec kind {kind!r}; known: {sorted(_CODECS)}")
    config = json.loads(metadata[_CONFIG_KEY])
    codec = WanVAE(config) if kind == "wan" else IdentityCodec(**config)  # IdentityCodec's config is {}
    try:
        codec.load_state_dict(state, strict=True)
    except RuntimeError as exn:  # missing/unexpected keys or wrong shapes; torch lists every one
        details = str(exn).splitlines()
        raise ValueError(f"{path}: weights do not match its {kind} config: {' '.join(details[1:3]).strip()} "
                         f"({len(details) - 1} problems)") from None
    codec.set_latent_stats(codec.latents_mean, codec.latents_std)  # validates them, syncs diffusers' config
    return codec.to(device)
