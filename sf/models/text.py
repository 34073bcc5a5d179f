"""Text encoders: prompts -> token-level features (B, L, D) and a mask (B, L) that is True on real tokens.

Three implementations behind one interface (`TextEncoder`), so training code calls the same methods either way:

  UMT5TextEncoder     Wan's text encoder: transformers' UMT5EncoderModel and its tokenizer, from a Wan model
                      directory in either layout (`sf.models.wan`); Wan's conditioning exactly: the prompt cleaned
                      (HTML entities, whitespace), 512 tokens, the features zeroed past the mask
  OpenCLIPTextEncoder an open_clip text tower (the per-token output after its final LayerNorm): the embedded
                      world's, and CLIP scores
  CachedTextEncoder   features cached in prompt shards (`sf-embed`), a table of fixed prompts (the negative
                      prompt, the sample prompts), and an encoder for anything else, built only when first needed

Features are zero wherever the mask is False; `max_length` pads/truncates to a fixed length the way Wan pads its
text to 512 tokens (cross-attention then sees every position, the padding as zeros). Encoders are frozen and never
download anything.
"""

from __future__ import annotations

import html
import json
import os
import re
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from sf.io import first_line

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


def open_clip_config(model_name: str) -> dict[str, Any]:
    """The architecture of an open_clip model (ours or open_clip's own), without building it."""
    import open_clip

    register_open_clip_configs()
    config = open_clip.get_model_config(model_name)
    if config is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; ours are {sorted(OPEN_CLIP_CONFIGS)}")
    return config


def open_clip_width(model_name: str) -> int:
    """The width of an open_clip text tower's token features."""
    return int(open_clip_config(model_name)["text_cfg"]["width"])


def open_clip_length(model_name: str) -> int:
    """The tokens an open_clip text tower reads (its context length)."""
    return int(open_clip_config(model_name)["text_cfg"].get("context_length", 77))


def _check_open_clip_source(open_clip: Any, model_name: str, pretrained: str | None) -> None:
    """Only local sources: a known or local-dir architecture, and weights from a file."""
    if model_name.startswith("hf-hub:"):
        raise ValueError(f"open_clip model {model_name!r} would be downloaded; use a local checkpoint file")
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"unknown open_clip model {model_name!r}; ours are {sorted(OPEN_CLIP_CONFIGS)}")
    if pretrained is not None and not os.path.isfile(pretrained):
        raise ValueError(f"pretrained must be a local checkpoint file (nothing is downloaded), got {pretrained!r}")


class UMT5TextEncoder(TextEncoder):
    """Wan's UMT5 encoder (transformers) with its tokenizer, loaded from local folders only."""

    def __init__(self, encoder: nn.Module, tokenizer: Any, max_length: int | None = 512, source: str = ""):
        super().__init__()
        check_vocab(len(tokenizer), encoder.config.vocab_size, source)
        self.encoder = encoder.requires_grad_(False).eval()
        self.tokenizer = tokenizer
        self.max_length = max_length or 512
        self.source = source

    @property
    def feature_dim(self) -> int:
        return self.encoder.config.d_model

    @property
    def device(self) -> torch.device:
        return self.encoder.shared.weight.device

    @torch.no_grad()
    def forward(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (B, max_length, D) zeroed past each prompt's tokens (its end token included), and the mask."""
        if isinstance(prompts, str):
            raise ValueError("text encoders take a list of prompts, got a single string")
        tokens = self.tokenizer([clean_prompt(p) for p in prompts], padding="max_length", max_length=self.max_length,
                                truncation=True, add_special_tokens=True, return_attention_mask=True,
                                return_tensors="pt")
        ids, mask = tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)
        features = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, D)
        return fit_length(features.float(), mask.bool(), self.max_length)


def check_vocab(tokens: int, vocab: int, source: str) -> None:
    """A tokenizer with more tokens than its encoder embeds belongs to another model (its ids would index past
    the embedding table)."""
    if tokens > vocab:
        raise ValueError(f"{source}: the tokenizer has {tokens} tokens, the text encoder embeds {vocab}: they do "
                         f"not belong together")


def clean_prompt(text: str) -> str:
    """Wan's prompt cleaning: mojibake fixed (with ftfy when installed), HTML entities unescaped (twice), runs of
    whitespace collapsed to one space, ends stripped."""
    try:
        import ftfy

        text = ftfy.fix_text(text)
    except ImportError:
        pass
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def load_umt5(path: str | Path, device="cpu", dtype: torch.dtype = torch.float32,
              max_length: int | None = 512) -> UMT5TextEncoder:
    """The UMT5 text encoder of a Wan model directory (diffusers or original layout), or of a diffusers
    `text_encoder` folder with a `tokenizer` folder beside it. Nothing is downloaded."""
    from transformers import UMT5EncoderModel

    from sf.models.wan import read_torch_weights, umt5_config_from_wan, wan_t5_to_transformers

    path, encoder_path, tokenizer = _umt5_parts(path)
    if encoder_path.is_dir():
        try:
            encoder = UMT5EncoderModel.from_pretrained(str(encoder_path), local_files_only=True, dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:  # RuntimeError: weights of other shapes than its config
            raise ValueError(f"{encoder_path}: not a loadable UMT5 encoder ({first_line(e)})") from None
    else:  # the original layout: Wan's own T5 module names
        state = read_torch_weights(encoder_path)
        try:
            with torch.device("meta"):
                encoder = UMT5EncoderModel(umt5_config_from_wan(state))
            encoder.load_state_dict(wan_t5_to_transformers(state), assign=True, strict=True)
        except (KeyError, RuntimeError) as e:  # names or shapes of something else
            raise ValueError(f"{encoder_path}: not a Wan T5 encoder state dict ({first_line(e)})") from None
        encoder = encoder.to(dtype)
    return UMT5TextEncoder(encoder.to(device), tokenizer, max_length, source=str(path))


def umt5_width(path: str | Path) -> int:
    """The feature width of the UMT5 encoder at `path`, read from its config or tensor shapes, after checking that
    its tokenizer belongs to it (the tokenizer loads; no encoder weights do)."""
    from sf.models.wan import read_json, read_torch_weights

    path, encoder, tokenizer = _umt5_parts(path)
    if encoder.is_dir():
        config = read_json(encoder / "config.json")
        vocab, width = int(config["vocab_size"]), int(config["d_model"])
    else:
        state = read_torch_weights(encoder)  # memory-mapped: shapes only
        if "token_embedding.weight" not in state:
            raise ValueError(f"{encoder}: not a Wan T5 encoder state dict (no token_embedding.weight)")
        vocab, width = state["token_embedding.weight"].shape
    check_vocab(len(tokenizer), int(vocab), str(path))
    return int(width)


def _umt5_parts(path: str | Path) -> tuple[Path, Path, Any]:
    """(the model directory, its encoder's file or folder, its tokenizer, loaded)."""
    from transformers import AutoTokenizer

    from sf.models.wan import wan_files

    path = Path(path)
    if path.name == "text_encoder" and (path.parent / "tokenizer").is_dir():
        path = path.parent
    files = wan_files(path)
    encoder_path, tokenizer_path = files.need("text_encoder"), files.need("tokenizer")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise ValueError(f"{tokenizer_path}: not a loadable tokenizer ({first_line(e)})") from None
    return path, encoder_path, tokenizer


class CachedTextEncoder(TextEncoder):
    """Serves precomputed features: those carried by a batch, a table of fixed prompts, else a fallback encoder
    (an encoder, or a function building one: then it is built only if a prompt is not in the table)."""

    def __init__(
        self,
        embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
        fallback: TextEncoder | Callable[[], TextEncoder] | None = None,
        max_length: int | None = None,
        sample_prompts: list[str] = (),
    ):
        super().__init__()
        self.table = {prompt: _unbatched(*pair) for prompt, pair in (embeddings or {}).items()}
        self._fallback = fallback
        self.max_length = max_length
        self.sample_prompts = list(sample_prompts)  # what a run's sample videos show (the table's choice)

    @property
    def fallback(self) -> TextEncoder | None:
        if self._fallback is not None and not isinstance(self._fallback, nn.Module):
            self._fallback = self._fallback()  # the first prompt the table does not hold
        return self._fallback

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
        if missing and self._fallback is None:
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
