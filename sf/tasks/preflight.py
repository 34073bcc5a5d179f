"""Before any weights load: which text encoder and codec a run uses, and everything about its inputs that can be
checked from file names, configs and headers alone.

`resolve` turns the config's `auto` choices into concrete ones (a Wan directory as `teacher.checkpoint` brings its
UMT5 text encoder and its VAE unless `text` / `codec` name others); the resolved config is what the run saves.
`preflight` then checks paths, the networks' architectures (read from configs and safetensors headers), that
the text features are as wide as every network's `text_dim`, and that there are enough shards for the ranks —
each problem one line — and returns what the run will do (`Plan`), which `trainer.dry_run` prints and stops at.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from sf.config import RANDOM_INIT, NetConfig, TrainConfig
from sf.models.dit import DiTConfig, dit_config

TABLE_FILE = "prompt_table.safetensors"  # fixed prompts' features beside prompt shards (sf-embed)


# ---------------------------------------------------------------------------------------------------- resolving


def resolve(cfg: TrainConfig) -> TrainConfig:
    """A copy of `cfg` with the text encoder and codec made concrete (kind and path)."""
    from sf.models.wan import is_model_dir, wan_files

    teacher_dir = cfg.teacher.checkpoint if is_model_dir(cfg.teacher.checkpoint) else None
    text = cfg.text
    if text.kind == "auto":
        candidate = text.pretrained if is_model_dir(text.pretrained) else None if text.pretrained else teacher_dir
        if candidate is not None and Path(candidate).name == "text_encoder":  # a Wan directory's own part
            candidate = str(Path(candidate).parent)
        has_t5 = candidate is not None and _has(candidate, "text_encoder")
        text = dataclasses.replace(text, kind="umt5" if has_t5 else "open_clip",
                                   pretrained=candidate if has_t5 else text.pretrained)
    elif text.kind == "umt5" and not text.pretrained:
        if teacher_dir is None:
            raise ValueError("text.kind=umt5 needs text.pretrained (a Wan model directory) or a Wan directory as "
                             "teacher.checkpoint")
        text = dataclasses.replace(text, pretrained=teacher_dir)
    if text.max_length is None:
        text = dataclasses.replace(text, max_length=_own_length(cfg, text))
    codec = cfg.codec
    if codec.kind == "auto" and codec.checkpoint:  # the user's own VAE (a codec file or a Wan VAE)
        codec = dataclasses.replace(codec, kind="wan")
    elif codec.kind == "auto":
        vae = teacher_dir if teacher_dir is not None and wan_files(teacher_dir).vae is not None else None
        codec = dataclasses.replace(codec, kind="wan" if vae else "identity", checkpoint=vae)
    return dataclasses.replace(cfg, text=text, codec=codec)


def _own_length(cfg: TrainConfig, text) -> int:
    """The text length a run uses when the config does not say: the cached table's, else the encoder's own."""
    from sf.models.wan import WAN_TEXT_LENGTH

    table = prompt_table_path(cfg)
    if table is not None:
        return int(_table_meta(table)["max_length"])
    if text.kind == "umt5":
        return WAN_TEXT_LENGTH
    from sf.models.text import open_clip_length

    return open_clip_length(text.model_name)


def _table_meta(table: Path) -> dict[str, str]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(table), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{table}: not a readable prompt table ({e})") from None


def _has(path: str, part: str) -> bool:
    from sf.models.wan import WanDirError, wan_files

    try:
        return getattr(wan_files(path), part) is not None
    except WanDirError:
        return False


def prompt_table_path(cfg: TrainConfig) -> Path | None:
    """The fixed prompts' feature table of a run: `text.table`, else the one sf-embed wrote beside the shards."""
    if cfg.text.table:
        return Path(cfg.text.table)
    shards = Path(cfg.data.shards) if cfg.data.shards and not cfg.data.shards.endswith(".txt") else None
    if shards is not None and shards.is_dir() and (shards / TABLE_FILE).is_file():
        return shards / TABLE_FILE
    return None


# ---------------------------------------------------------------------------------------------------- the plan


@dataclass
class Plan:
    """What a run will do, found without loading weights."""

    architectures: dict[str, DiTConfig] = field(default_factory=dict)
    text: str = ""  # the text features' source, in words
    text_width: int | None = None
    codec: str = ""
    shards: int = 0
    lines: list[str] = field(default_factory=list)

    def describe(self) -> str:
        return "\n".join(self.lines)


def net_architecture(net: NetConfig, what: str) -> DiTConfig:
    """A network's architecture: its checkpoint's (config / headers only), else its flavor's."""
    from sf.models.convert import read_dit_config

    if net.checkpoint and net.checkpoint != RANDOM_INIT:
        if not Path(net.checkpoint).exists():
            raise FileNotFoundError(f"{what}.checkpoint {net.checkpoint}: no such file or directory")
        return read_dit_config(net.checkpoint)
    return dit_config(net.flavor, **net.overrides)


def _check_rollout_latents(cfg: TrainConfig, shards: list[str], channels: int) -> None:
    """The first readable sample of the first latent shard has the shape the student's rollout generates (the
    forcing baselines put these real latents into its cache); the job's own check covers the rest."""
    from sf.data.latents import decode_latent_sample
    from sf.data.shards import CorruptSample, iter_samples

    task = cfg.task
    expected = (task.rollout.num_frames, channels, task.latent_height, task.latent_width)
    for raw in iter_samples(shards[:1]):
        try:
            shape = tuple(decode_latent_sample(raw)["latents"].shape)
        except CorruptSample:
            continue  # counted and skipped by the run itself
        if shape != expected:
            raise ValueError(f"data.shards: latents of {cfg.data.shards} are {shape} (F, C, h, w), the "
                             f"{task.context} rollout needs {expected} (task.rollout.num_frames, the model's "
                             f"in_channels, task.latent_height, task.latent_width)")
        return


def preflight(cfg: TrainConfig, world_size: int, networks: tuple[str, ...], data: str) -> Plan:
    """Check a resolved config against the files it names; `networks` are the config sections the task builds
    (teacher, model, critic), `data` what its shards hold (prompts, latents, pixels, captions)."""
    from sf.data.shards import list_shards

    plan = Plan()
    # -- networks: architectures from configs and headers
    if "teacher" in networks:
        plan.architectures["teacher"] = net_architecture(cfg.teacher, "teacher")
    if "model" in networks:
        if cfg.model.checkpoint or "teacher" not in networks:
            plan.architectures["model"] = net_architecture(cfg.model, "model")
        else:
            plan.architectures["model"] = plan.architectures["teacher"]  # the student starts as the teacher
    if "critic" in networks:
        source = cfg.teacher if cfg.critic.init_from_teacher else cfg.critic
        plan.architectures["critic"] = net_architecture(source, "teacher" if cfg.critic.init_from_teacher else "critic")
    for name, arch in plan.architectures.items():
        plan.lines.append(f"{name}: {arch.num_layers} layers, dim {arch.dim}, text_dim {arch.text_dim}, "
                          f"{parameter_count(arch) / 1e6:.1f} M parameters ({_source(cfg, name)})")

    # -- data: enough shards for every rank
    if cfg.data.shards.endswith(".txt") and data in ("prompts", "captions"):
        from sf.data.prompts import read_prompt_file

        try:
            prompts = read_prompt_file(cfg.data.shards)
        except (ValueError, FileNotFoundError) as e:
            raise type(e)(f"data.shards: {e}") from None
        plan.lines.append(f"data: {len(prompts)} prompts of {cfg.data.shards}, written into shards in the run dir")
    else:
        from sf.data.embed import completeness

        unfinished = completeness(cfg.data.shards) if Path(cfg.data.shards).is_dir() else None
        if unfinished:
            raise ValueError(f"data.shards {cfg.data.shards} is an unfinished sf-embed output: {unfinished}; rerun "
                             f"the same sf-embed command to finish it")
        shards = list_shards(cfg.data.shards)
        plan.shards = len(shards)
        workers = max(1, cfg.data.num_workers)
        if data == "prompts" and len(shards) < world_size * workers:
            raise ValueError(f"data.shards {cfg.data.shards} holds {len(shards)} shards, fewer than the {world_size} "
                             f"ranks x {workers} workers that each read their own: write smaller shards")
        plan.lines.append(f"data: {len(shards)} shards of {data} ({cfg.data.shards})")
        if data == "latents" and hasattr(cfg.task, "rollout") and "model" in plan.architectures:
            _check_rollout_latents(cfg, shards, plan.architectures["model"].in_channels)

    # -- text: a width every network takes
    if data in ("prompts", "captions", "latents"):
        plan.text, plan.text_width = text_width(cfg)
        plan.lines.append(f"text: {plan.text}, {plan.text_width} wide")
        for name, arch in plan.architectures.items():
            if arch.text_dim != plan.text_width:
                raise ValueError(f"the text features are {plan.text_width} wide ({plan.text}), the {name} takes "
                                 f"text_dim={arch.text_dim} ({_source(cfg, name)}): use that network's own text "
                                 f"encoder (text.kind / text.pretrained), or cached features of it")

    # -- codec
    if cfg.codec.kind == "wan" and cfg.codec.checkpoint is not None and not Path(cfg.codec.checkpoint).exists():
        raise FileNotFoundError(f"codec.checkpoint {cfg.codec.checkpoint}: no such file or directory")
    plan.codec = f"{cfg.codec.kind} ({cfg.codec.checkpoint or cfg.codec.flavor if cfg.codec.kind == 'wan' else 'latent previews'})"
    plan.lines.append(f"codec: {plan.codec}")
    return plan


def text_width(cfg: TrainConfig) -> tuple[str, int]:
    """(the source in words, the feature width) of a resolved config's text features, without loading weights:
    a feature table or cached shard features when there are some, else the encoder's config."""
    from safetensors import safe_open

    from sf.models.text import open_clip_width, umt5_width

    if cfg.text.kind == "umt5":  # the encoder for prompts the cache lacks: present, and its tokenizer its own
        encoder, width = f"UMT5 of {cfg.text.pretrained}", umt5_width(cfg.text.pretrained)
    else:
        encoder, width = f"open_clip {cfg.text.model_name}", open_clip_width(cfg.text.model_name)
    table = prompt_table_path(cfg)
    if table is None:
        return encoder, width
    meta = _table_meta(table)
    if cfg.text.max_length is not None and int(meta.get("max_length", cfg.text.max_length)) != cfg.text.max_length:
        raise ValueError(f"{table} holds features of {meta['max_length']} tokens, text.max_length is "
                         f"{cfg.text.max_length}: re-embed, or set text.max_length={meta['max_length']}")
    with safe_open(str(table), framework="pt") as f:
        cached = int(f.get_slice("0.features").get_shape()[-1])
    if cached != width:
        raise ValueError(f"{table} holds features {cached} wide ({meta.get('encoder', '?')}), the {encoder} gives "
                         f"{width}: the cache was made by another text encoder")
    return f"features cached in {table.parent} ({meta.get('encoder', '?')})", cached


def _source(cfg: TrainConfig, name: str) -> str:
    net = {"teacher": cfg.teacher, "model": cfg.model, "critic": cfg.critic}[name]
    if net.checkpoint and net.checkpoint != RANDOM_INIT:
        return net.checkpoint
    if name != "teacher" and (name == "model" or cfg.critic.init_from_teacher):
        return f"the teacher's weights ({cfg.teacher.checkpoint})"
    return f"random {net.flavor}"


def parameter_count(arch: DiTConfig) -> int:
    """Parameters of a VideoDiT of `arch`, counted on the meta device (nothing allocated)."""
    import torch

    from sf.models.dit import VideoDiT

    with torch.device("meta"):
        return sum(p.numel() for p in VideoDiT(arch).parameters())
