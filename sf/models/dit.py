"""VideoDiT: the Wan2.1 transformer layout, run bidirectionally (teacher, critic) or block-causally (student).

One network, three ways to call it (all through `VideoDiT.forward`):
  bidirectional      model(x, t, ctx)                         every token sees every token
  block-causal       model(x, t, ctx, causal=CausalConfig(3))  one forward over the whole video, masked
  incremental        model(x_chunk, t_chunk, ctx, cache=kv)    one chunk over the KV cache of earlier chunks
The last two agree exactly; `update_cache=True` writes the chunk's keys/values into the cache afterwards.
Latents are (B, F, C, H, W); timesteps are per sample (B,) or per frame (B, F), in [0, 1000].
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from sf.models.attention import CausalConfig, KVCache, RoPE3D, apply_rope, attention, block_causal_mask


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of a VideoDiT; the names of the Wan2.1 fields, in our words."""

    dim: int
    num_layers: int
    num_heads: int
    ffn_dim: int
    text_dim: int = 4096
    freq_dim: int = 256
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if tuple(self.patch_size)[0] != 1:
            raise ValueError(f"temporal patch size must be 1 (chunks are whole frames), got {self.patch_size}")
        object.__setattr__(self, "patch_size", tuple(self.patch_size))

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict) -> DiTConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DiT config keys: {unknown}")
        return cls(**d)


# Named sizes. `debug` runs a step on CPU in well under a second; the Wan sizes load the released weights.
FLAVORS: dict[str, DiTConfig] = {
    "debug": DiTConfig(dim=48, num_layers=2, num_heads=2, ffn_dim=96, text_dim=32, freq_dim=32, in_channels=4,
                       out_channels=4),
    "tiny": DiTConfig(dim=128, num_layers=4, num_heads=4, ffn_dim=384, text_dim=64, freq_dim=64, in_channels=16,
                      out_channels=16),
    "wan-1.3b": DiTConfig(dim=1536, num_layers=30, num_heads=12, ffn_dim=8960),
    "wan-14b": DiTConfig(dim=5120, num_layers=40, num_heads=40, ffn_dim=13824),
}


def dit_config(flavor: str, **overrides) -> DiTConfig:
    """The config of a named flavor, with fields overridden (e.g. `in_channels` for another VAE)."""
    if flavor not in FLAVORS:
        raise ValueError(f"unknown DiT flavor {flavor!r}; choose from {sorted(FLAVORS)}")
    return DiTConfig.from_dict({**FLAVORS[flavor].to_dict(), **overrides})


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input dtype (as Wan does for its modulated norms)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.float() if self.weight is not None else None
        bias = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, weight, bias, self.eps).type_as(x)


class RMSNorm32(nn.Module):
    """RMSNorm over the last dim, computed in float32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).type_as(x)


class MLP(nn.Module):
    """Linear -> activation -> Linear."""

    def __init__(self, dim_in: int, dim_hidden: int, dim_out: int, activation: nn.Module):
        super().__init__()
        self.fc1 = nn.Linear(dim_in, dim_hidden)
        self.act = activation
        self.fc2 = nn.Linear(dim_hidden, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos, sin] of (fractional) timesteps t (N,) -> (N, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)


class Attention(nn.Module):
    """Multi-head attention with RMSNorm on q and k (over all heads), as in Wan."""

    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.norm_q = RMSNorm32(dim, eps)
        self.norm_k = RMSNorm32(dim, eps)

    def project_kv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised keys and values (B, L, H, D) of x (B, L, dim)."""
        return self.norm_k(self.k(x)).unflatten(-1, (self.num_heads, -1)), self.v(x).unflatten(-1, (self.num_heads, -1))

    def project_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm_q(self.q(x)).unflatten(-1, (self.num_heads, -1))

    def out(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(x.flatten(-2))


class Block(nn.Module):
    """Modulated self-attention (with RoPE), cross-attention to text, modulated GELU-tanh FFN."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.self_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.cross_norm = LayerNorm32(cfg.dim, cfg.eps) if cfg.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(cfg.dim, cfg.num_heads, cfg.eps)
        self.norm2 = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.ffn = MLP(cfg.dim, cfg.ffn_dim, cfg.dim, nn.GELU(approximate="tanh"))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)

    def forward(self, x, mod, rope, text_kv, past_kv=None, mask=None):
        """x (B, F, T, dim) tokens grouped by frame; mod (B, F, 6, dim). Returns x and this call's (k, v)."""
        shift_sa, scale_sa, gate_sa, shift_ff, scale_ff, gate_ff = (self.modulation.unsqueeze(0) + mod.float()).unbind(2)
        B, num_frames, T, dim = x.shape

        def modulated(norm, shift, scale):  # per-frame shift/scale broadcast over the frame's tokens
            return (norm(x.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x).flatten(1, 2)

        h = modulated(self.norm1, shift_sa, scale_sa)  # (B, L, dim)
        q = apply_rope(self.self_attn.project_q(h), *rope)
        k, v = self.self_attn.project_kv(h)
        k = apply_rope(k, *rope)
        k_all, v_all = (k, v) if past_kv is None else (torch.cat([past_kv[0], k], 1), torch.cat([past_kv[1], v], 1))
        h = self.self_attn.out(attention(q, k_all, v_all, mask)).unflatten(1, (num_frames, T))
        x = (x.float() + h * gate_sa[:, :, None]).type_as(x)

        h = self.cross_norm(x.flatten(1, 2))
        h = self.cross_attn.out(attention(self.cross_attn.project_q(h), *text_kv))
        x = x + h.unflatten(1, (num_frames, T))

        h = self.ffn(modulated(self.norm2, shift_ff, scale_ff)).unflatten(1, (num_frames, T))
        x = (x.float() + h.float() * gate_ff[:, :, None]).type_as(x)
        return x, (k, v)


class Head(nn.Module):
    """Final modulated norm and projection to patch pixels."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.norm = LayerNorm32(cfg.dim, cfg.eps, elementwise_affine=False)
        self.proj = nn.Linear(cfg.dim, cfg.out_channels * math.prod(cfg.patch_size))
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim**0.5)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """x (B, F, T, dim), temb (B, F, dim) -> (B, F, T, out * patch)."""
        shift, scale = (self.modulation.unsqueeze(0) + temb.float()[:, :, None]).unbind(2)
        return self.proj((self.norm(x.float()) * (1 + scale[:, :, None]) + shift[:, :, None]).type_as(x))


class VideoDiT(nn.Module):
    """Wan2.1-layout video diffusion transformer predicting the flow v = noise - x0."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = nn.Conv3d(cfg.in_channels, cfg.dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embed = MLP(cfg.text_dim, cfg.dim, cfg.dim, nn.GELU(approximate="tanh"))
        self.time_embed = MLP(cfg.freq_dim, cfg.dim, cfg.dim, nn.SiLU())
        self.time_proj = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        self.head = Head(cfg)
        self.rope = RoPE3D(cfg.head_dim, cfg.rope_theta)
        self.gradient_checkpointing = False

    def new_cache(self, causal: CausalConfig, keep_grad: bool = False) -> KVCache:
        """An empty KV cache for chunk-by-chunk generation with this network."""
        return KVCache(causal=causal, num_layers=self.cfg.num_layers, keep_grad=keep_grad)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        context: torch.Tensor,
        *,
        causal: CausalConfig | None = None,
        cache: KVCache | None = None,
        update_cache: bool = False,
    ) -> torch.Tensor:
        """Flow prediction (B, F, C, H, W) for latents x (B, F, C, H, W) at timesteps (B,) or (B, F)."""
        B, num_frames, C, H, W = x.shape
        _, ph, pw = self.cfg.patch_size
        if C != self.cfg.in_channels or H % ph or W % pw:
            raise ValueError(
                f"latents (B, F, C, H, W)={tuple(x.shape)} need C={self.cfg.in_channels} and H, W divisible by {ph}"
            )
        if context.shape[-1] != self.cfg.text_dim:
            raise ValueError(f"text features have dim {context.shape[-1]}, the model expects {self.cfg.text_dim}")
        if causal is not None and cache is not None:
            raise ValueError("pass either causal= (masked full sequence) or cache= (incremental), not both")
        if update_cache and cache is None:
            raise ValueError("update_cache=True needs a cache")
        h, w = H // ph, W // pw
        tokens_per_frame = h * w
        start_frame = cache.next_frame if cache is not None else 0

        timestep = timestep.expand(B, num_frames) if timestep.ndim == 2 else timestep[:, None].expand(B, num_frames)
        temb = self.time_embed(timestep_embedding(timestep.flatten(), self.cfg.freq_dim).to(x.dtype))
        temb = temb.unflatten(0, (B, num_frames))  # (B, F, dim)
        mod = self.time_proj(temb).unflatten(-1, (6, -1))  # (B, F, 6, dim)

        tokens = self.patch_embed(x.transpose(1, 2))  # (B, dim, F, h, w)
        tokens = tokens.flatten(3).permute(0, 2, 3, 1).contiguous()  # (B, F, h*w, dim)
        rope = self.rope(start_frame, num_frames, h, w, device=x.device)
        mask = None if causal is None else block_causal_mask(causal, num_frames, tokens_per_frame, device=x.device)
        text_kv = self._text_kv(context, cache)
        visible = cache.visible_slice(start_frame + num_frames) if cache is not None else None

        new_kv = []
        for i, block in enumerate(self.blocks):
            past_kv = cache.read(i, visible) if cache is not None else None
            if self.gradient_checkpointing and torch.is_grad_enabled():
                tokens, kv = checkpoint(block, tokens, mod, rope, text_kv[i], past_kv, mask, use_reentrant=False)
            else:
                tokens, kv = block(tokens, mod, rope, text_kv[i], past_kv, mask)
            new_kv.append(kv)
        if update_cache:
            cache.write(new_kv, start_frame, num_frames)

        out = self.head(tokens, temb)  # (B, F, h*w, C*ph*pw)
        out = out.reshape(B, num_frames, h, w, ph, pw, self.cfg.out_channels)
        return out.permute(0, 1, 6, 2, 4, 3, 5).reshape(B, num_frames, self.cfg.out_channels, H, W)

    def _text_kv(self, context: torch.Tensor, cache: KVCache | None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention K/V of every layer; cached per prompt, recomputed when gradients must reach them."""
        needs_grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        if cache is not None and cache.text[0] is not None and not needs_grad:
            return cache.text
        text = self.text_embed(context)  # (B, L, dim)
        text_kv = [block.cross_attn.project_kv(text) for block in self.blocks]
        if cache is not None and cache.text[0] is None:
            cache.text = [(k.detach(), v.detach()) for k, v in text_kv]
        return text_kv
