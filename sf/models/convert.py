"""Load and save VideoDiT weights in three namings: ours, diffusers' `WanTransformer3DModel`, original Wan2.1.

`load_dit(path)` takes a diffusers directory (config.json + safetensors, sharded or not, or a pipeline folder
with `transformer/`), an original Wan2.1 checkpoint directory or file, or our own safetensors export, and
detects which. Nothing is ever unpickled: safetensors, or `torch.load(weights_only=True)` for `.pt`/`.bin`.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from sf.io import first_line, mapped_safetensors, read_json_object
from sf.models.dit import FLAVORS, DiTConfig, VideoDiT

FORMATS = ("sf", "diffusers", "wan")

# Module names in each format: (ours, diffusers, original Wan). Parameters (weight/bias) follow the module name.
_TOP_LEVEL = [
    ("patch_embed", "patch_embedding", "patch_embedding"),
    ("text_embed.fc1", "condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("text_embed.fc2", "condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("time_embed.fc1", "condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("time_embed.fc2", "condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("time_proj.1", "condition_embedder.time_proj", "time_projection.1"),
    ("head.proj", "proj_out", "head.head"),
    ("head.modulation", "scale_shift_table", "head.modulation"),
]
_PER_BLOCK = [
    ("self_attn.q", "attn1.to_q", "self_attn.q"),
    ("self_attn.k", "attn1.to_k", "self_attn.k"),
    ("self_attn.v", "attn1.to_v", "self_attn.v"),
    ("self_attn.o", "attn1.to_out.0", "self_attn.o"),
    ("self_attn.norm_q", "attn1.norm_q", "self_attn.norm_q"),
    ("self_attn.norm_k", "attn1.norm_k", "self_attn.norm_k"),
    ("cross_attn.q", "attn2.to_q", "cross_attn.q"),
    ("cross_attn.k", "attn2.to_k", "cross_attn.k"),
    ("cross_attn.v", "attn2.to_v", "cross_attn.v"),
    ("cross_attn.o", "attn2.to_out.0", "cross_attn.o"),
    ("cross_attn.norm_q", "attn2.norm_q", "cross_attn.norm_q"),
    ("cross_attn.norm_k", "attn2.norm_k", "cross_attn.norm_k"),
    ("cross_norm", "norm2", "norm3"),  # Wan names its norms in call order 1, 3, 2; diffusers renumbers them
    ("ffn.fc1", "ffn.net.0.proj", "ffn.0"),
    ("ffn.fc2", "ffn.net.2", "ffn.2"),
    ("modulation", "scale_shift_table", "modulation"),
]
# Wrappers that training frameworks put in front of parameter names.
_WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")
_BLOCK_KEY = re.compile(r"^blocks\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and every problem in one line."""


def _rename_module(name: str, table: list[tuple[str, ...]], src: int, dst: int) -> str:
    for row in table:
        if name == row[src] or name.startswith(row[src] + "."):
            return row[dst] + name[len(row[src]):]
    return name  # unknown: kept, so that loading reports it as unexpected


def convert_state_dict(state: dict[str, torch.Tensor], src: str, dst: str) -> dict[str, torch.Tensor]:
    """Rename every key from format `src` to `dst` (one of FORMATS); tensors are shared, not copied."""
    if src not in FORMATS or dst not in FORMATS:
        raise ValueError(f"formats must be among {FORMATS}, got {src!r} -> {dst!r}")
    i, j = FORMATS.index(src), FORMATS.index(dst)
    out = {}
    for key, tensor in state.items():
        match = _BLOCK_KEY.match(key)
        if match:
            new = f"blocks.{match[1]}." + _rename_module(match[2], _PER_BLOCK, i, j)
        else:
            new = _rename_module(key, _TOP_LEVEL, i, j)
        out[new] = tensor
    return out


def strip_wrappers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove prefixes such as `module.` or `model.` that wrap every key."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k[len(prefix):]: v for k, v in state.items()}
                changed = True
    return state


def detect_format(state: dict[str, torch.Tensor]) -> str:
    """Which naming a state dict uses, from marker keys."""
    keys = set(state)
    if any(k.startswith("condition_embedder.") for k in keys) or "proj_out.weight" in keys:
        return "diffusers"
    if any(k.startswith(("text_embedding.", "time_embedding.", "head.head")) for k in keys):
        return "wan"
    if any(k.startswith(("text_embed.", "time_embed.", "head.proj")) for k in keys):
        return "sf"
    raise CheckpointError(f"unrecognised DiT weights: none of the sf/diffusers/Wan marker keys in {len(keys)} keys")


def _read_weights_file(path: Path, lazy: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of one file; never unpickles arbitrary objects. `lazy`: meta tensors of the right
    shapes and dtypes (safetensors: the header alone), or a memory-mapped .pt (nothing read until used)."""
    if path.suffix == ".safetensors":
        if lazy:
            return _safetensors_shapes(path)
        return mapped_safetensors(path, CheckpointError)
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True, mmap=lazy)
    except pickle.UnpicklingError as e:
        first = first_line(e)
        raise CheckpointError(f"{path}: refusing to unpickle arbitrary objects ({first}); convert it to safetensors") from None
    except Exception as e:  # torch raises several types for files that are not checkpoints at all
        raise CheckpointError(f"{path}: not a loadable checkpoint ({type(e).__name__}: {first_line(e)})") from None
    for key in ("state_dict", "generator_ema", "generator", "model"):  # common training-checkpoint nestings
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj, {}


def _safetensors_shapes(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            shapes = {}
            for name in f.keys():
                part = f.get_slice(name)
                dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}.get(part.get_dtype(),
                                                                                              torch.float32)
                shapes[name] = torch.empty(part.get_shape(), dtype=dtype, device="meta")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    return shapes, metadata


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such file or directory")
    if (path / "transformer").is_dir() and not list(path.glob("*.safetensors")):
        path = path / "transformer"  # a diffusers pipeline folder
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:
        weight_map = json.loads(index[0].read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    files = sorted(path.glob("*.safetensors")) or sorted(path.glob("*.pt")) + sorted(path.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors (or .pt/.bin) weights in this directory")
    return files


def read_weights_metadata(path: str | Path) -> dict[str, str]:
    """The safetensors metadata of the DiT weights at `path` (a file or folder), headers only; {} for .pt files."""
    metadata: dict[str, str] = {}
    for file in _weight_files(Path(path)):
        if file.suffix == ".safetensors":
            metadata.update(_safetensors_shapes(file)[1])
    return metadata


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], str, DiTConfig | None]:
    """Weights in our naming, the format they came in, and the config found beside or inside them (or None)."""
    path = Path(path)
    state, metadata = {}, {}
    for file in _weight_files(path):
        tensors, meta = _read_weights_file(file)
        state.update(tensors)
        metadata.update(meta)
    state = strip_wrappers(state)
    if "sf_codec" in metadata:
        raise CheckpointError(f"{path}: a video codec ({metadata['sf_codec']} VAE) file, not DiT weights")
    try:
        fmt = detect_format(state)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    state = convert_state_dict(state, fmt, "sf")
    config = _config_of(path, state, metadata)
    return state, fmt, config


def _config_of(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> DiTConfig | None:
    """The config carried by our metadata, else the config.json beside the weights, else None."""
    if "sf_config" in metadata:
        try:
            return DiTConfig.from_dict(json.loads(metadata["sf_config"]))
        except (ValueError, TypeError) as e:
            raise CheckpointError(f"{path}: its sf_config metadata is not a DiT config ({e})") from None
    config_file = (path if path.is_dir() else path.parent) / "config.json"
    if (path / "transformer" / "config.json").exists():
        config_file = path / "transformer" / "config.json"
    if not config_file.exists():
        return None
    return config_from_json(read_json_object(config_file, CheckpointError), state)


def config_from_json(raw: dict, state: dict[str, torch.Tensor]) -> DiTConfig:
    """DiTConfig from a diffusers or Wan config.json (missing fields are read off the weights)."""
    inferred = infer_config(state, num_heads=raw.get("num_attention_heads", raw.get("num_heads")))
    fields = inferred.to_dict()
    if "num_attention_heads" in raw:  # diffusers
        fields.update(dim=raw["num_attention_heads"] * raw["attention_head_dim"], num_heads=raw["num_attention_heads"])
        for ours, theirs in [("in_channels", "in_channels"), ("out_channels", "out_channels"), ("eps", "eps"),
                             ("text_dim", "text_dim"), ("freq_dim", "freq_dim"), ("ffn_dim", "ffn_dim"),
                             ("num_layers", "num_layers"), ("cross_attn_norm", "cross_attn_norm")]:
            fields[ours] = raw.get(theirs, fields[ours])
        fields["patch_size"] = list(raw.get("patch_size", fields["patch_size"]))
    else:  # original Wan
        for ours, theirs in [("dim", "dim"), ("num_heads", "num_heads"), ("ffn_dim", "ffn_dim"), ("eps", "eps"),
                             ("freq_dim", "freq_dim"), ("in_channels", "in_dim"), ("out_channels", "out_dim"),
                             ("num_layers", "num_layers"), ("text_dim", "text_dim"), ("cross_attn_norm", "cross_attn_norm")]:
            fields[ours] = raw.get(theirs, fields[ours])
    return DiTConfig.from_dict(fields)


def infer_config(state: dict[str, torch.Tensor], num_heads: int | None = None) -> DiTConfig:
    """Read a DiTConfig off our-format weights; the head count comes from a flavor of the same width if not given."""
    try:
        patch = state["patch_embed.weight"]  # (dim, C, pt, ph, pw)
        dim, in_channels, patch_size = patch.shape[0], patch.shape[1], tuple(patch.shape[2:])
        if num_heads is None:
            widths = {cfg.dim: cfg.num_heads for cfg in FLAVORS.values()}
            if dim not in widths:
                raise CheckpointError(f"cannot tell the number of heads of a width-{dim} DiT: pass a config")
            num_heads = widths[dim]
        num_layers = 1 + max(int(m[1]) for k in state if (m := _BLOCK_KEY.match(k)))
        return DiTConfig(
            dim=dim, num_layers=num_layers, num_heads=num_heads,
            ffn_dim=state["blocks.0.ffn.fc1.weight"].shape[0],
            text_dim=state["text_embed.fc1.weight"].shape[1],
            freq_dim=state["time_embed.fc1.weight"].shape[1],
            in_channels=in_channels,
            out_channels=state["head.proj.weight"].shape[0] // (patch_size[0] * patch_size[1] * patch_size[2]),
            patch_size=patch_size,
            cross_attn_norm="blocks.0.cross_norm.weight" in state,
        )
    except KeyError as e:
        raise CheckpointError(f"cannot infer the DiT config: missing key {e.args[0]}") from None


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise one CheckpointError listing every missing key, unexpected key and shape mismatch."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected)) if state[k].shape != expected[k].shape
    ]
    problems = []
    for label, items in [("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)]:
        if items:
            shown = ", ".join(items[:8]) + (f", ... ({len(items) - 8} more)" if len(items) > 8 else "")
            problems.append(f"{len(items)} {label} ({shown})")
    if problems:
        raise CheckpointError(f"{source}: " + "; ".join(problems))


def load_dit(
    path: str | Path, config: DiTConfig | None = None, dtype: torch.dtype = torch.float32, device="cpu"
) -> VideoDiT:
    """A VideoDiT with the weights at `path` (any supported format; see the module docstring).

    The network is built on the meta device and takes the file's tensors as its parameters: one copy of the
    weights in memory, never a random init beside them (and, when `dtype` is the file's, no cast either)."""
    state, _, found = read_checkpoint(path)
    return dit_from_state(state, config or found or infer_config(state), str(path), dtype, device)


def dit_from_state(state: dict[str, torch.Tensor], config: DiTConfig, what: str, dtype: torch.dtype = torch.float32,
                   device="cpu") -> VideoDiT:
    """A VideoDiT of `config` holding `state` (our naming) as its parameters, built on the meta device: no random
    init and no second copy. `what` names the weights in the error that lists every mismatch."""
    with torch.device("meta"):
        model = VideoDiT(config)
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=device, dtype=dtype)


def read_dit_config(path: str | Path) -> DiTConfig:
    """The architecture of the DiT weights at `path`, from their config or metadata, else their tensor shapes;
    no weights are read (safetensors headers, memory-mapped .pt files)."""
    path = Path(path)
    shapes: dict[str, torch.Tensor] = {}
    metadata: dict[str, str] = {}
    for file in _weight_files(path):
        tensors, meta = _read_weights_file(file, lazy=True)
        shapes.update(tensors)
        metadata.update(meta)
    if "sf_codec" in metadata:
        raise CheckpointError(f"{path}: a video codec ({metadata['sf_codec']} VAE) file, not DiT weights")
    shapes = strip_wrappers(shapes)
    try:
        shapes = convert_state_dict(shapes, detect_format(shapes), "sf")
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    return _config_of(path, shapes, metadata) or infer_config(shapes)


def save_dit(model: VideoDiT, path: str | Path, fmt: str = "sf", extra_metadata: dict | None = None) -> Path:
    """Write weights as one safetensors file (our format carries its config); diffusers/wan also get config.json."""
    return save_state_dict(model.state_dict(), model.cfg, path, fmt, extra_metadata)


def save_state_dict(
    state: dict[str, torch.Tensor], cfg: DiTConfig, path: str | Path, fmt: str = "sf", extra_metadata: dict | None = None
) -> Path:
    """Write a VideoDiT state dict (our naming) in `fmt`; returns the weights file written."""
    path = Path(path)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    state = convert_state_dict(state, "sf", fmt)
    metadata = {"format": "pt", "sf_format": fmt, "sf_config": json.dumps(cfg.to_dict())}
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    if fmt != "sf":
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(_external_config(cfg, fmt), indent=2))
        path = path / "diffusion_pytorch_model.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def _external_config(cfg: DiTConfig, fmt: str) -> dict:
    if fmt == "diffusers":
        return {
            "_class_name": "WanTransformer3DModel", "patch_size": list(cfg.patch_size),
            "num_attention_heads": cfg.num_heads, "attention_head_dim": cfg.head_dim,
            "in_channels": cfg.in_channels, "out_channels": cfg.out_channels, "text_dim": cfg.text_dim,
            "freq_dim": cfg.freq_dim, "ffn_dim": cfg.ffn_dim, "num_layers": cfg.num_layers,
            "cross_attn_norm": cfg.cross_attn_norm, "qk_norm": "rms_norm_across_heads", "eps": cfg.eps,
        }
    return {
        "_class_name": "WanModel", "model_type": "t2v", "dim": cfg.dim, "num_heads": cfg.num_heads,
        "ffn_dim": cfg.ffn_dim, "freq_dim": cfg.freq_dim, "in_dim": cfg.in_channels, "out_dim": cfg.out_channels,
        "num_layers": cfg.num_layers, "text_dim": cfg.text_dim, "eps": cfg.eps, "cross_attn_norm": cfg.cross_attn_norm,
    }
