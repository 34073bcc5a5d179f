"""Text encoders: prompts -> token-level features (B, L, D) and a mask (B, L) that is True on real tokens.

Two implementations behind one interface (`TextEncoder`), so training code calls the same methods either way:
`OpenCLIPTextEncoder` runs an open_clip text tower (the per-token output after its final LayerNorm);
`CachedTextEncoder` serves features cached in the prompt shards, plus a table of fixed prompts (e.g. the
negative prompt). Features are zero wherever the mask is False; `max_length` pads/truncates to a fixed length
the way Wan pads its text to 512 tokens. Encoders are frozen and never download anything.
"""

from __future__ import annotations

import json
import os
import tempfile
import weakref
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

TINY_CLIP = "sf-tiny-clip"

# Our open_clip architectures (open_clip's JSON config format); registered on first use.
OPEN_CLIP_CONFIGS: dict[str, dict[str, Any]] = {
    TINY_CLIP: {
        "embed_dim": 32,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
}

_config_dir: tempfile.TemporaryDirectory | None = None  # lives as long as the process (open_clip rescans it)


def register_open_clip_configs() -> None:
    """Make the architectures of OPEN_CLIP_CONFIGS known to open_clip (idempotent)."""
    global _config_dir
    if _config_dir is not None:
        return
    import open_clip

    _config_dir = tempfile.TemporaryDirectory(prefix="sf-open-clip-")
    for name, config in OPEN_CLIP_CONFIGS.items():
        with open(os.path.join(_config_dir.name, f"{name}.json"), "w") as f:
            json.dump(config, f)
    open_clip.add_model_config(_config_dir.name)  # a directory: open_clip registers every *.json by file stem


def fit_length(features: torch.Tensor, mask: torch.Tensor, max_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero features at padding and pad/truncate (B, L, D)/(B, L) to `max_length` tokens (unchanged when None)."""
    features = features.masked_fill(~mask[..., None], 0)  # (B, L, D)
    if max_length is None or features.shape[1] == max_length:
        return features, mask
    if features.shape[1] > max_length:
        return features[:, :max_length], mask[:, :max_length]
    extra = max_length - features.shape[1]
    return F.pad(features, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


class TextEncoder(nn.Module):
    """Frozen prompts -> (features (B, L, D) float, mask (B, L) bool); subclasses implement `forward`."""

    max_length: int | None = None

    @property
    def feature_dim(self) -> int:
        raise NotImplementedError

    def train(self, mode: bool = True) -> TextEncoder:
        """Stay in eval mode whatever the parent module does: the encoder is frozen."""
        return super().train(False)


class OpenCLIPTextEncoder(TextEncoder):
    """The text tower of an open_clip model; weights from a local checkpoint file or random init."""

    def __init__(
        self,
        model_name: str,
        pretrained: str | None = None,
        max_length: int | None = None,
        device: str | torch.device = "cpu",
    ):
        super().__init__()
        import open_clip

        register_open_clip_configs()
        _check_open_clip_source(open_clip, model_name, pretrained)
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        # custom-text layout: the tower is one module that can return its per-token output; standard CLIP
        # checkpoints are converted by open_clip on load
        model = open_clip.create_model(
            model_name, pretrained=pretrained, device=device, force_custom_text=True, pretrained_text=False
        )
        if not hasattr(model.text, "output_tokens"):
            raise ValueError(f"open_clip model {model_name!r} has a text tower without token outputs")
        self.text = model.text  # the vision tower is dropped with `model`
        self.text.output_tokens = True
        self.text.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        self.model_name = model_name
        self.max_length = max_length
        self.eval()

    @property
    def feature_dim(self) -> int:
        return self.text.width

    @property
    def device(self) -> torch.device:
        return self.text.positional_embedding.device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Token features after the final LayerNorm (B, L, D) and the mask of real tokens (start..end)."""
        tokens = self._tokenize(prompts)  # (B, C)
        _, features = self.text(tokens)  # (B, C, D)
        return fit_length(features.float(), self._token_mask(tokens), self.max_length)

    @torch.no_grad()
    def pooled(self, prompts: list[str]) -> torch.Tensor:
        """L2-normalised pooled (projected) text embedding (B, E), the one CLIP scores compare to images."""
        pooled, _ = self.text(self._tokenize(prompts))  # (B, E)
        return F.normalize(pooled.float(), dim=-1)

    def _tokenize(self, prompts: list[str]) -> torch.Tensor:
        """Token ids (B, C) on the encoder's device."""
        if isinstance(prompts, str):
            raise ValueError("text encoders take a list of prompts, got a single string")
        return self.tokenizer(list(prompts)).to(self.device)

    def _token_mask(self, tokens: torch.Tensor) -> torch.Tensor:
        """True from the start token through the first end-of-text token (B, C)."""
        eot = getattr(self.tokenizer, "eot_token_id", None)
        if eot is None:  # tokenizers without an end token id: everything but padding
            return tokens != getattr(self.text, "pad_id", 0)
        is_eot = tokens == eot  # (B, C)
        assert is_eot.any(dim=1).all(), "the tokenizer always ends a prompt with its end-of-text token"
        last = is_eot.int().argmax(dim=1)  # (B,) first end token
        positions = torch.arange(tokens.shape[1], device=tokens.device)  # (C,)
        return positions[None] <= last[:, None]


def _check_open_clip_source(open_clip: Any, model_name: str, pretrained: str | None) -> None:
    """Only local sources: a known or local-dir architecture, and weights from a file."""
    if model_name.startswith("hf-hub:"):
        raise ValueError(f"open_clip model {model_name!r} would be downloaded; use a local checkpoint file")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; ours are {sorted(OPEN_CLIP_CONFIGS)}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"pretrained must be a local checkpoint file (nothing is downloaded), got {pretrained!r}")


class CachedTextEncoder(TextEncoder):
    """Serves precomputed features: those carried by a batch, a table of fixed prompts, else a fallback encoder."""

    def __init__(
        self,
        embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        fallback: TextEncoder | None = None,
        max_length: int | None = None,
    ):
        super().__init__()
        self.table = {prompt: _unbatched(*pair) for prompt, pair in (embeddings or {}).items()}
        self.fallback = fallback
        self.max_length = max_length

    @property
    def feature_dim(self) -> int:
        if self.table:
            return next(iter(self.table.values()))[0].shape[-1]
        if self.fallback is not None:
            return self.fallback.feature_dim
        raise ValueError("CachedTextEncoder without table or fallback does not know its feature_dim")

    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features of prompts from the table (all of them) or else from the fallback encoder."""
        if isinstance(prompts, str):
            raise ValueError("text encoders take a list of prompts, got a single string")
        missing = [prompt for prompt in prompts if prompt not in self.table]
        if missing and self.fallback is None:
            raise ValueError(f"no cached features for prompts {missing[:3]} and no fallback encoder")
        if missing:
            features, mask = self.fallback(list(prompts))
        else:
            features, mask = _pad_rows([self.table[prompt] for prompt in prompts])
        return fit_length(features, mask, self.max_length)


def _unbatched(features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D), (L,) from either that or a batch of one."""
    if features.ndim == 3:
        if features.shape[0] != 1:
            raise ValueError(f"a table entry holds one prompt, got features {tuple(features.shape)}")
        features, mask = features[0], mask[0]
    if features.ndim != 2 or mask.shape != features.shape[:1] or mask.dtype != torch.bool:
        raise ValueError(f"table entries are features (L, D) and a bool mask (L,), got {tuple(features.shape)}, "
                         f"{tuple(mask.shape)} {mask.dtype}")
    return features.float(), mask


def _pad_rows(rows: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack (L_i, D)/(L_i,) rows into (B, L, D)/(B, L), padding with zeros and False."""
    length = max(features.shape[0] for features, _ in rows)
    features = torch.stack([F.pad(f, (0, 0, 0, length - f.shape[0])) for f, _ in rows])  # (B, L, D)
    mask = torch.stack([F.pad(m, (0, length - m.shape[0]), value=False) for _, m in rows])  # (B, L)
    return features, mask


_negative_cache: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def encode_negative_prompt(encoder: TextEncoder, text: str, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedding of `text`, computed once per encoder and device, expanded (a view) to `batch` rows."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(encoder.parameters(), torch.empty(0)).device
    per_encoder = _negative_cache.setdefault(encoder, {})
    if (text, device) not in per_encoder:
        per_encoder[(text, device)] = encoder([text])  # (1, L, D), (1, L)
    features, mask = per_encoder[(text, device)]
    return features.expand(batch, -1, -1), mask.expand(batch, -1)
