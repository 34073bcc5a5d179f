"""Single-device networks: the video DiT, its attention pieces, text encoders and the VAE adapter."""

from sf.models.attention import CausalConfig, KVCache
from sf.models.dit import FLAVORS, DiTConfig, VideoDiT, dit_config

__all__ = ["FLAVORS", "CausalConfig", "DiTConfig", "KVCache", "VideoDiT", "dit_config"]
