"""Attention pieces of the video DiT: 3-D RoPE at absolute frame positions, block-causal masks, and the KV cache.

Two paths must agree exactly: the full-sequence forward with a block-causal (optionally window + sink) mask, and
the chunk-by-chunk forward over a `KVCache`. Both follow one rule, `allowed_key_frames`: a query in the chunk that
ends at frame E sees key frames f with chunk(f) <= chunk(query) and, with a rolling window W and S sink frames,
f >= E - W or f < S.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class CausalConfig:
    """How the student splits time: chunks of `frames_per_block` latent frames, optional rolling window + sink."""

    frames_per_block: int = 3
    local_attn_frames: int | None = None  # None: attend to every earlier chunk (the cache grows)
    sink_frames: int = 0  # with a window: the first frames are always kept

    def __post_init__(self):
        if self.frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {self.frames_per_block}")
        if self.local_attn_frames is not None and self.local_attn_frames < self.frames_per_block:
            raise ValueError(
                f"local_attn_frames ({self.local_attn_frames}) must be >= frames_per_block ({self.frames_per_block})"
            )
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames must be >= 0, got {self.sink_frames}")

    def chunk_bounds(self, num_frames: int) -> list[tuple[int, int]]:
        """(start, end) frame ranges of the chunks of a video; the last one may be shorter."""
        return [(s, min(s + self.frames_per_block, num_frames)) for s in range(0, num_frames, self.frames_per_block)]


def allowed_key_frames(causal: CausalConfig, query_chunk_end: int, key_frames: torch.Tensor) -> torch.Tensor:
    """Which of `key_frames` (all earlier or same-chunk frames) a chunk ending at `query_chunk_end` may see."""
    allowed = key_frames < query_chunk_end
    if causal.local_attn_frames is not None:
        in_window = key_frames >= query_chunk_end - causal.local_attn_frames
        allowed = allowed & (in_window | (key_frames < causal.sink_frames))
    return allowed


# The same shape every step; callers never modify the mask. Small: a Wan-size mask is ~1 GB of bools.
@functools.lru_cache(maxsize=2)
def block_causal_mask(causal: CausalConfig, num_frames: int, tokens_per_frame: int, device=None) -> torch.Tensor:
    """Boolean (L, L) mask, True = attend, for the full-sequence block-causal forward; L = frames * tokens."""
    frames = torch.arange(num_frames, device=device)
    chunk_end = torch.clamp((frames // causal.frames_per_block + 1) * causal.frames_per_block, max=num_frames)
    frame_mask = torch.stack([allowed_key_frames(causal, int(end), frames) for end in chunk_end])  # (F, F)
    return frame_mask.repeat_interleave(tokens_per_frame, 0).repeat_interleave(tokens_per_frame, 1)


class RoPE3D:
    """Rotary embedding splitting head_dim over (frame, height, width), computed for any absolute frame index.

    The split and frequencies follow Wan: h and w get 2*(head_dim//6) channels each, frames the rest; each axis
    uses theta^(-2i/d). Angles are computed in float64 and cast once, so arbitrary offsets stay exact.
    """

    def __init__(self, head_dim: int, theta: float = 10000.0):
        if head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
        self.hw_dim = 2 * (head_dim // 6)
        self.t_dim = head_dim - 2 * self.hw_dim
        self.theta = theta

    def _axis(self, positions: torch.Tensor, dim: int) -> torch.Tensor:
        inv_freq = 1.0 / self.theta ** (torch.arange(0, dim, 2, dtype=torch.float64)[: dim // 2] / dim)
        angles = positions.to(torch.float64)[:, None] * inv_freq[None, :]  # (N, dim/2)
        return angles.repeat_interleave(2, dim=-1)  # (N, dim): pairs share an angle

    def __call__(self, start_frame: int, num_frames: int, height: int, width: int, device=None):
        """cos, sin of shape (1, frames*height*width, 1, head_dim) for frames start_frame.. (float32)."""
        # Every denoising step of a chunk asks for the same angles: compute (on the CPU, in float64) and move
        # them to the device once per (chunk position, shape, device), not once per forward. 16 entries hold
        # a 21-frame rollout's chunks (~5 MB each at Wan size) without growing with streaming length.
        device = None if device is None else torch.device(device)
        return self._cached(start_frame, num_frames, height, width, device)

    @functools.lru_cache(maxsize=16)
    def _cached(self, start_frame: int, num_frames: int, height: int, width: int, device):
        t = self._axis(torch.arange(start_frame, start_frame + num_frames), self.t_dim)
        h = self._axis(torch.arange(height), self.hw_dim)
        w = self._axis(torch.arange(width), self.hw_dim)
        angles = torch.cat(
            [
                t[:, None, None].expand(num_frames, height, width, -1),
                h[None, :, None].expand(num_frames, height, width, -1),
                w[None, None, :].expand(num_frames, height, width, -1),
            ],
            dim=-1,
        ).reshape(1, num_frames * height * width, 1, -1)
        return angles.cos().float().to(device), angles.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) of x (B, L, H, D) by the given angles."""
    x_even, x_odd = x.float().unflatten(-1, (-1, 2)).unbind(-1)  # (B, L, H, D/2) each
    cos, sin = cos[..., 0::2], sin[..., 0::2]
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).type_as(x)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Multi-head attention on (B, L, H, D) tensors through SDPA; mask is boolean (Lq, Lk), True = attend."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)  # (B, Lq, H, D)


@dataclass
class KVCache:
    """Self-attention keys/values of already generated frames, per layer, plus cached text K/V per layer.

    Keys are stored after RoPE, so a chunk only needs its own absolute frame index. Storage is functional:
    a write replaces the stored tensors (concatenate, then drop what no future chunk can see) and never
    modifies a tensor in place, so no autograd graph that read the cache is invalidated. Writes detach unless
    `keep_grad` (a study option: gradient through the context to earlier chunks, `RolloutConfig.context_grad`).
    """

    causal: CausalConfig
    num_layers: int
    tokens_per_frame: int | None = None
    keep_grad: bool = False
    keys: list[torch.Tensor | None] = field(default_factory=list)
    values: list[torch.Tensor | None] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)  # absolute frame index of each cached frame, in order
    text: list[tuple[torch.Tensor, torch.Tensor] | None] = field(default_factory=list)

    def __post_init__(self):
        self.keys = [None] * self.num_layers
        self.values = [None] * self.num_layers
        self.text = [None] * self.num_layers

    @property
    def next_frame(self) -> int:
        """Absolute index of the first frame not yet written."""
        return self.frames[-1] + 1 if self.frames else 0

    @property
    def num_cached_frames(self) -> int:
        return len(self.frames)

    def visible_slice(self, chunk_end: int) -> list[slice]:
        """Token slices of the cache visible to a chunk ending at `chunk_end` (sink prefix, then recent frames)."""
        if not self.frames:
            return []
        visible = allowed_key_frames(self.causal, chunk_end, torch.tensor(self.frames))
        tpf = self.tokens_per_frame
        # Cached frames are sorted, and visibility is "sink prefix or recent suffix": at most two ranges.
        slices, start = [], None
        for i, ok in enumerate(visible.tolist() + [False]):
            if ok and start is None:
                start = i
            elif not ok and start is not None:
                slices.append(slice(start * tpf, i * tpf))
                start = None
        return slices

    def read(self, layer: int, slices: list[slice]) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Cached (k, v) of shape (B, N, H, D) in `slices` (from `visible_slice`), or None when nothing is visible."""
        if self.keys[layer] is None or not slices:
            return None
        k, v = self.keys[layer], self.values[layer]
        if len(slices) == 1 and slices[0] == slice(0, k.shape[1]):
            return k, v
        return torch.cat([k[:, s] for s in slices], dim=1), torch.cat([v[:, s] for s in slices], dim=1)

    def write(self, new: list[tuple[torch.Tensor, torch.Tensor]], start_frame: int, num_frames: int) -> None:
        """Append one chunk's (k, v) for every layer, then evict frames that no later chunk can attend to."""
        if start_frame != self.next_frame:
            raise ValueError(f"cache holds frames up to {self.next_frame}, cannot write a chunk at {start_frame}")
        if len(new) != self.num_layers:
            raise ValueError(f"expected K/V for {self.num_layers} layers, got {len(new)}")
        self.tokens_per_frame = new[0][0].shape[1] // num_frames
        for layer, (k, v) in enumerate(new):
            if not self.keep_grad:
                k, v = k.detach(), v.detach()
            if self.keys[layer] is not None:
                k = torch.cat([self.keys[layer], k], dim=1)
                v = torch.cat([self.values[layer], v], dim=1)
            self.keys[layer], self.values[layer] = k, v
        self.frames.extend(range(start_frame, start_frame + num_frames))
        self._evict(start_frame + num_frames)

    def _evict(self, end: int) -> None:
        """Drop frames outside the window of the smallest possible next chunk (one frame ending at end + 1)."""
        if self.causal.local_attn_frames is None:
            return
        keep = allowed_key_frames(self.causal, end + 1, torch.tensor(self.frames))
        if bool(keep.all()):
            return
        token_keep = keep.repeat_interleave(self.tokens_per_frame).to(self.keys[0].device)
        self.keys = [k[:, token_keep] for k in self.keys]
        self.values = [v[:, token_keep] for v in self.values]
        self.frames = [f for f, ok in zip(self.frames, keep.tolist()) if ok]
