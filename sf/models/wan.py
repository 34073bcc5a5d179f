"""Wan2.1 model directories as users download them, and the original checkpoints' key names.

Two layouts hold the same models (`wan_files` tells which, from file names alone; nothing is loaded):

    diffusers (Wan-AI/Wan2.1-T2V-1.3B-Diffusers)    original (Wan-AI/Wan2.1-T2V-1.3B)
      model_index.json                                config.json                       the transformer's config
      transformer/ config.json + safetensors          diffusion_pytorch_model*.safetensors
      vae/         AutoencoderKLWan                   Wan2.1_VAE.pth                    the causal 3-D VAE
      text_encoder/ UMT5EncoderModel                  models_t5_umt5-xxl-enc-bf16.pth   UMT5-XXL encoder
      tokenizer/                                      google/umt5-xxl/                  its tokenizer
      scheduler/

The original VAE and T5 files are plain state dicts in Wan's own module names; `wan_vae_to_diffusers` and
`wan_t5_to_transformers` rename them to diffusers' `AutoencoderKLWan` and transformers' `UMT5EncoderModel`
(no tensor changes shape), so both layouts load into the same classes. The transformer's names are handled by
`sf.models.convert`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sf.io import first_line, read_json_object

# Wan's standard negative prompt (wan_shared_cfg.sample_neg_prompt; the Self-Forcing recipe uses the same)
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走"
)
WAN_TEXT_LENGTH = 512  # tokens: Wan zero-pads its text features to 512 and cross-attends to all of them
ORIGINAL_VAE = "Wan2.1_VAE.pth"
ORIGINAL_T5_GLOB = "models_t5*.pth"


class WanDirError(ValueError):
    """A Wan model directory that lacks a part the run needs; the message names the directory and the part."""


@dataclass(frozen=True)
class WanFiles:
    """Where the parts of a Wan model are (None: this directory does not have that part)."""

    path: Path
    layout: str  # diffusers | original | file
    transformer: Path
    vae: Path | None
    text_encoder: Path | None
    tokenizer: Path | None

    def need(self, part: str) -> Path:
        """The path of `part` (vae, text_encoder, tokenizer), or WanDirError naming what is missing."""
        found = getattr(self, part)
        if found is None:
            expected = {"diffusers": {"vae": "vae/", "text_encoder": "text_encoder/", "tokenizer": "tokenizer/"},
                        "original": {"vae": ORIGINAL_VAE, "text_encoder": "models_t5_umt5-xxl-enc-bf16.pth",
                                     "tokenizer": "google/umt5-xxl/"}}.get(self.layout, {}).get(part, part)
            raise WanDirError(f"{self.path} has no {part.replace('_', ' ')} ({expected} expected in a {self.layout} "
                              f"Wan directory)")
        return found


def wan_files(path: str | Path) -> WanFiles:
    """The parts of a Wan2.1 model at `path` (a directory in either layout, or a single weights file)."""
    path = Path(path)
    if path.is_file():
        return WanFiles(path, "file", path, None, None, None)
    if not path.is_dir():
        raise WanDirError(f"{path}: no such file or directory")
    if (path / "model_index.json").exists() or (path / "transformer").is_dir():

        def part(name: str) -> Path | None:
            return path / name if (path / name).is_dir() else None

        return WanFiles(path, "diffusers", part("transformer") or path, part("vae"), part("text_encoder"),
                        part("tokenizer"))
    t5 = sorted(path.glob(ORIGINAL_T5_GLOB))
    tokenizers = [p.parent for p in sorted(path.glob("*/*/tokenizer_config.json")) + sorted(path.glob(
        "*/*/spiece.model"))]
    return WanFiles(path, "original", path, path / ORIGINAL_VAE if (path / ORIGINAL_VAE).exists() else None,
                    t5[0] if t5 else None, tokenizers[0] if tokenizers else None)


def is_model_dir(path: str | Path | None) -> bool:
    """Whether `path` names a directory (the form a Wan model takes, as opposed to a single weights file); what
    it holds is `wan_files`'s to check."""
    return path is not None and Path(path).is_dir()


# ------------------------------------------------------------------------------------------------------ T5


def wan_t5_to_transformers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's T5Encoder names -> transformers' UMT5EncoderModel names (the same tensors)."""
    out = {}
    for key, tensor in state.items():
        new = _rename(key, _T5_RULES)
        out[new] = tensor
        if new == "shared.weight":
            out["encoder.embed_tokens.weight"] = tensor  # tied
    return out


def transformers_t5_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `wan_t5_to_transformers` (the tied embedding once)."""
    return {_rename(k, _T5_INVERSE): v for k, v in state.items() if k != "encoder.embed_tokens.weight"}


# Wan's T5Encoder name prefixes and transformers' UMT5EncoderModel ones, as templates read both ways: {n} is a block
# index, {p} one of the attention projections q, k, v, o
_T5_NAMES = [
    ("token_embedding.", "shared."),
    ("blocks.{n}.norm1.", "encoder.block.{n}.layer.0.layer_norm."),
    ("blocks.{n}.attn.{p}.", "encoder.block.{n}.layer.0.SelfAttention.{p}."),
    ("blocks.{n}.pos_embedding.embedding.", "encoder.block.{n}.layer.0.SelfAttention.relative_attention_bias."),
    ("blocks.{n}.norm2.", "encoder.block.{n}.layer.1.layer_norm."),
    ("blocks.{n}.ffn.gate.0.", "encoder.block.{n}.layer.1.DenseReluDense.wi_0."),  # the GELU branch
    ("blocks.{n}.ffn.fc1.", "encoder.block.{n}.layer.1.DenseReluDense.wi_1."),  # the linear branch
    ("blocks.{n}.ffn.fc2.", "encoder.block.{n}.layer.1.DenseReluDense.wo."),
    ("norm.", "encoder.final_layer_norm."),
]


def _prefix_rules(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """(from template, to template) pairs as `_rename` rules: an anchored prefix regex and its replacement."""
    fields = {"n": r"(?P<n>\d+)", "p": r"(?P<p>[qkvo])"}

    def pattern(template: str) -> str:
        return "^" + re.sub(r"\\\{(\w)\\\}", lambda m: fields[m[1]], re.escape(template))

    return [(pattern(a), re.sub(r"\{(\w)\}", r"\\g<\1>", b)) for a, b in pairs]


_T5_RULES = _prefix_rules(_T5_NAMES)  # Wan -> transformers
_T5_INVERSE = _prefix_rules([(b, a) for a, b in _T5_NAMES])  # transformers -> Wan


def umt5_config_from_wan(state: dict[str, torch.Tensor]):
    """The transformers UMT5Config of an original Wan T5 state dict, read off its tensor shapes."""
    from transformers import UMT5Config

    vocab, d_model = state["token_embedding.weight"].shape
    layers = 1 + max(int(m[1]) for k in state if (m := re.match(r"^blocks\.(\d+)\.", k)))
    buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=state["blocks.0.attn.q.weight"].shape[0] // heads,
                      d_ff=state["blocks.0.ffn.fc1.weight"].shape[0], num_layers=layers, num_heads=heads,
                      relative_attention_num_buckets=buckets, relative_attention_max_distance=128,
                      feed_forward_proj="gated-gelu", layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1)


# ------------------------------------------------------------------------------------------------------ VAE


def wan_vae_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Wan's WanVAE_ names (Wan2.1_VAE.pth) -> diffusers' AutoencoderKLWan names (the same tensors)."""
    ups = _decoder_layout(state)
    return {_vae_key(k, ups): v for k, v in state.items()}


def diffusers_vae_to_wan(state: dict[str, torch.Tensor], num_res_blocks: int, num_levels: int = 4) -> dict:
    """The inverse of `wan_vae_to_diffusers`, for a VAE of `num_res_blocks` per level."""
    ups = _up_table(num_res_blocks, num_levels)
    inverse = {f"decoder.up_blocks.{level}.{slot}": f"decoder.upsamples.{flat}" for flat, (level, slot) in ups.items()}
    out = {}
    for key, tensor in state.items():
        new = key
        for ours, theirs in _VAE_TOP:
            if key == theirs or key.startswith(theirs + "."):
                new = ours + key[len(theirs):]
                break
        else:
            for diffusers_prefix, wan_prefix in inverse.items():
                if key.startswith(diffusers_prefix + "."):
                    new = wan_prefix + _resblock_to_wan(key[len(diffusers_prefix):])
                    break
            else:
                match = re.match(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)(\..*)$", key)
                if match:
                    index = {"resnets": {"0": 0, "1": 2}, "attentions": {"0": 1}}[match[2]][match[3]]
                    rest = _resblock_to_wan(match[4]) if match[2] == "resnets" else match[4]
                    new = f"{match[1]}.middle.{index}{rest}"
                elif (m := re.match(r"^encoder\.down_blocks\.(\d+)(\..*)$", key)):
                    new = f"encoder.downsamples.{m[1]}{_resblock_to_wan(m[2])}"
        out[new] = tensor
    return out


# (Wan name, diffusers name) of the parts outside the down/up/mid blocks
_VAE_TOP = [
    ("conv1", "quant_conv"), ("conv2", "post_quant_conv"),
    ("encoder.conv1", "encoder.conv_in"), ("decoder.conv1", "decoder.conv_in"),
    ("encoder.head.0", "encoder.norm_out"), ("encoder.head.2", "encoder.conv_out"),
    ("decoder.head.0", "decoder.norm_out"), ("decoder.head.2", "decoder.conv_out"),
]
# ResidualBlock: Sequential(RMS_norm, SiLU, CausalConv3d, RMS_norm, SiLU, Dropout, CausalConv3d) in Wan
_RESBLOCK = [(".residual.0.", ".norm1."), (".residual.2.", ".conv1."), (".residual.3.", ".norm2."),
             (".residual.6.", ".conv2."), (".shortcut.", ".conv_shortcut.")]


def _resblock_to_diffusers(rest: str) -> str:
    for wan, diffusers in _RESBLOCK:
        if rest.startswith(wan):
            return diffusers + rest[len(wan):]
    return rest  # resample.* and time_conv.* keep their names


def _resblock_to_wan(rest: str) -> str:
    for wan, diffusers in _RESBLOCK:
        if rest.startswith(diffusers):
            return wan + rest[len(diffusers):]
    return rest


def _up_table(num_res_blocks: int, num_levels: int) -> dict[int, tuple[int, str]]:
    """Wan's flat decoder.upsamples index -> (diffusers up_blocks level, 'resnets.j' or 'upsamplers.0'): each level
    has num_res_blocks + 1 residual blocks, then an upsampler (but the last level)."""
    table, flat = {}, 0
    for level in range(num_levels):
        for j in range(num_res_blocks + 1):
            table[flat] = (level, f"resnets.{j}")
            flat += 1
        if level < num_levels - 1:
            table[flat] = (level, "upsamplers.0")
            flat += 1
    return table


def _decoder_layout(state: dict[str, torch.Tensor]) -> dict[int, tuple[int, str]]:
    """The up table of a Wan VAE state dict (its residual blocks per level, read off the encoder)."""
    flat = {int(m[1]) for k in state if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))}
    # encoder: num_levels * num_res_blocks residual blocks + (num_levels - 1) downsamplers, num_levels = 4
    num_res_blocks = (len(flat) - 3) // 4
    return _up_table(num_res_blocks, 4)


def _vae_key(key: str, ups: dict[int, tuple[int, str]]) -> str:
    for wan, diffusers in _VAE_TOP:
        if key == wan or key.startswith(wan + "."):
            return diffusers + key[len(wan):]
    if (m := re.match(r"^(encoder|decoder)\.middle\.(\d)(\..*)$", key)):
        part = {"0": "resnets.0", "1": "attentions.0", "2": "resnets.1"}[m[2]]
        rest = _resblock_to_diffusers(m[3]) if part.startswith("resnets") else m[3]
        return f"{m[1]}.mid_block.{part}{rest}"
    if (m := re.match(r"^encoder\.downsamples\.(\d+)(\..*)$", key)):
        return f"encoder.down_blocks.{m[1]}{_resblock_to_diffusers(m[2])}"
    if (m := re.match(r"^decoder\.upsamples\.(\d+)(\..*)$", key)):
        level, slot = ups[int(m[1])]
        return f"decoder.up_blocks.{level}.{slot}{_resblock_to_diffusers(m[2])}"
    return key


def wan_vae_config(state: dict[str, torch.Tensor]) -> dict:
    """AutoencoderKLWan arguments of a Wan VAE state dict (Wan2.1's fixed layout; widths read off the weights)."""
    flat = {int(m[1]) for k in state if (m := re.match(r"^encoder\.downsamples\.(\d+)\.", k))}
    return dict(base_dim=int(state["encoder.conv1.weight"].shape[0]), z_dim=int(state["conv2.weight"].shape[0]),
                dim_mult=[1, 2, 4, 4], num_res_blocks=(len(flat) - 3) // 4, attn_scales=[],
                temperal_downsample=[False, True, True], dropout=0.0)


def _rename(key: str, rules: list[tuple[str, str]]) -> str:
    for pattern, replacement in rules:
        new, count = re.subn(pattern, replacement, key)
        if count:
            return new
    return key


def read_torch_weights(path: Path) -> dict[str, torch.Tensor]:
    """A .pth/.pt state dict, memory-mapped (nothing is read until used), never unpickling arbitrary objects."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # torch raises several types for files that are not checkpoints
        raise WanDirError(f"{path}: not a loadable state dict ({type(e).__name__}: {first_line(e)})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WanDirError(f"{path}: expected a dict of tensors")
    return state


def read_json(path: Path) -> dict:
    """A config.json of a Wan directory (WanDirError naming it when it is not a JSON object)."""
    return read_json_object(path, WanDirError)
