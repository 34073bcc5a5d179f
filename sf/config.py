"""Typed configuration: the sections every task shares, composed into `TrainConfig` and registered with Hydra.

`conf/config.yaml` starts from the `train_schema` registered here; `task` is filled by the `task` group
(`conf/task/<name>.yaml`), whose files start from the task's own schema (`schema/task/<name>`, the dataclass
beside its job in `sf/tasks/<name>.py`). So every YAML group and every CLI override is checked against these
types at compose time: an unknown key or a wrong type fails with Hydra's message naming it, and a key added with
`+` that no schema knows fails in `to_train_config`. Nothing below `main()` sees a DictConfig.

The resolved config saved with every checkpoint carries `config_version`; `read_run_config` reads any saved
version back as typed objects (`migrate` turns the older layouts into this one).
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

from sf.data.prompts import PromptDataConfig
from sf.distributed import DeepSpeedConfig
from sf.logging import LoggerConfig
from sf.models.dit import FLAVORS
from sf.models.vae import CodecConfig
from sf.schema import above, at_least, one_of, range_errors

CONFIG_VERSION = 2
RANDOM_INIT = "random"  # a checkpoint value for smoke tests: seeded random weights
CONF_ENV = "SF_CONF_DIR"  # a folder of the user's own config groups, searched after sf's own


@dataclass
class NetConfig:
    """A VideoDiT: a named flavor, field overrides (e.g. in_channels of another VAE), optional weights."""

    flavor: str = field(default="debug", metadata=one_of(*FLAVORS))
    checkpoint: Optional[str] = None
    overrides: dict = field(default_factory=dict)
    gradient_checkpointing: bool = False


@dataclass
class TeacherConfig(NetConfig):
    """The frozen bidirectional teacher (the real score). Required by the tasks that sample or score with it."""

    checkpoint: Optional[str] = MISSING


@dataclass
class CriticConfig(NetConfig):
    """The trainable fake score; initialised from the teacher's weights unless it has its own."""

    init_from_teacher: bool = True


@dataclass
class TextConfig:
    """Text features: Wan's UMT5 or an open_clip tower, each from local files; features cached in the shards (and a
    table of fixed prompts, `sf-embed`) are used instead whenever they are there."""

    # auto: UMT5 when `pretrained`, else the teacher's checkpoint, is a Wan directory with a text encoder;
    # open_clip otherwise
    kind: str = field(default="auto", metadata=one_of("auto", "umt5", "open_clip"))
    model_name: str = "sf-tiny-clip"  # open_clip: the architecture
    pretrained: Optional[str] = None  # open_clip: a weights file; umt5: a Wan model directory (or its text_encoder/)
    # fixed length (zero-padded, so batching never changes results); null: the encoder's own (UMT5 512, open_clip 77)
    max_length: Optional[int] = field(default=None, metadata=at_least(1))
    table: Optional[str] = None  # fixed prompts' features (sf-embed); null: <data.shards>/prompt_table.safetensors
    negative_prompt: str = ""


@dataclass
class TrainerConfig:
    """The loop every task shares: length, accumulation, precision, LR schedule, clipping, checkpoints."""

    max_steps: int = field(default=1000, metadata=at_least(1))
    grad_accum_steps: int = field(default=1, metadata=at_least(1))
    precision: str = field(default="auto", metadata=one_of("auto", "fp32", "bf16"))  # auto: bf16 on GPU, fp32 on CPU
    warmup_steps: int = field(default=0, metadata=at_least(0))  # linear LR warm-up from 0 (iterations)
    # linear LR decay to ~0 over the last N of max_steps (0: flat to the end; longer than the run: from below)
    cooldown_steps: int = field(default=0, metadata=at_least(0))
    grad_clip: float = field(default=10.0, metadata=above(0))  # global gradient norm, per trained role
    checkpoint_every: int = field(default=100, metadata=at_least(1))
    keep_last: int = field(default=2, metadata=at_least(0))
    export_on_checkpoint: bool = True
    timeout_minutes: int = field(default=30, metadata=at_least(1))
    dry_run: bool = False  # check everything that can be checked without loading weights, say what would run, exit


@dataclass
class TrainConfig:
    """Everything a training run needs; the resolved copy is saved beside every checkpoint."""

    config_version: int = CONFIG_VERSION
    seed: int = 0
    name: str = "sf"
    task: Any = MISSING  # the task's own config: conf/task/<name>.yaml, schema in sf/tasks/<name>.py
    model: NetConfig = field(default_factory=NetConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    text: TextConfig = field(default_factory=TextConfig)
    codec: CodecConfig = field(default_factory=lambda: CodecConfig(kind="auto"))
    data: PromptDataConfig = field(default_factory=lambda: PromptDataConfig(shards=MISSING))
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# ---------------------------------------------------------------------------------------------------- Hydra


ASSETS = Path(__file__).resolve().parent / "assets"


def asset_path(relative: str) -> str:
    """Absolute path of a file shipped in sf/assets (the `${sf.asset:prompts/smoke.txt}` resolver)."""
    path = ASSETS / relative
    if not path.exists():
        hint = " (the world's weights are built by `make assets`)" if relative.startswith("world/") else ""
        raise ValueError(f"no shipped asset {relative!r} under {ASSETS}{hint}")
    return str(path)


def register_configs() -> None:
    """Make `train_schema` and every task's schema known to Hydra, and the `sf.asset` resolver (idempotent)."""
    from sf.tasks import TASKS

    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for name, (schema, _) in TASKS.items():
        store.store(group="schema/task", name=name, node=schema)
    if not OmegaConf.has_resolver("sf.asset"):
        OmegaConf.register_new_resolver("sf.asset", asset_path)
    if not OmegaConf.has_resolver("sf.wan_negative_prompt"):  # ${sf.wan_negative_prompt:}: Wan's standard one
        from sf.models.wan import WAN_NEGATIVE_PROMPT

        OmegaConf.register_new_resolver("sf.wan_negative_prompt", lambda: WAN_NEGATIVE_PROMPT)
    if not OmegaConf.has_resolver("sf.required"):  # ${sf.required:key,what}: a recipe's value the user must give
        OmegaConf.register_new_resolver("sf.required", _required)


def _required(key: str, what: str = "") -> None:
    """A recipe value without a default (`???` cannot override a schema's default): resolving it is the error."""
    raise ValueError(f"missing mandatory value: {key}" + (f" ({what})" if what else "") + f"; set {key}=...")


def search_path_overrides() -> list[str]:
    """`hydra.searchpath` override adding the user's config folder ($SF_CONF_DIR) after sf's own, if set."""
    user_dir = os.environ.get(CONF_ENV)
    if not user_dir:
        return []
    if not Path(user_dir).is_dir():
        raise ValueError(f"{CONF_ENV}={user_dir} is not a directory")
    return [f"hydra.searchpath=[file://{Path(user_dir).resolve()}]"]


def compose_config(overrides: list[str] | tuple[str, ...] = ()) -> DictConfig:
    """The config `sf-train <overrides>` would run, composed without running it (notebooks, tests, tools)."""
    from hydra import compose, initialize_config_module

    register_configs()
    with initialize_config_module("sf.conf", version_base=None):
        return compose(config_name="config", overrides=[*search_path_overrides(), *overrides])


def task_choices() -> list[str]:
    """The options of the `task` group: sf's conf/task/ files and those of $SF_CONF_DIR/task/."""
    import importlib.resources

    folders = [Path(str(importlib.resources.files("sf.conf"))) / "task"]
    if os.environ.get(CONF_ENV):
        folders.append(Path(os.environ[CONF_ENV]) / "task")
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


# ---------------------------------------------------------------------------------------------------- typed


def to_train_config(cfg: DictConfig | Any) -> TrainConfig:
    """The composed config as typed objects; ValueError naming the key for a missing value or an unknown key."""
    if isinstance(cfg, TrainConfig):
        return cfg
    if OmegaConf.is_missing(cfg, "task"):
        raise ValueError("missing mandatory value: task (choose one with task=<name>)")
    schema = OmegaConf.get_type(cfg.task)
    check_task_name(cfg.task.name, schema)
    if not getattr(schema, "needs_teacher", True) and OmegaConf.is_missing(cfg.teacher, "checkpoint"):
        cfg = cfg.copy()
        cfg.teacher.checkpoint = None  # this task trains from data alone
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))  # resolves every value: sf.required says what is missing
    except InterpolationResolutionError as e:
        raise ValueError(str(e).splitlines()[0].split("interpolation: ", 1)[-1]) from None
    if missing:
        raise ValueError(f"missing mandatory value: {', '.join(missing)} (set it as an override, e.g. {missing[0]}=...)")
    unknown = unknown_keys(cfg)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]} (not in the schema; check the spelling)"
                         + (f", and {len(unknown) - 1} more: {', '.join(unknown[1:4])}" if len(unknown) > 1 else ""))
    try:
        typed = OmegaConf.to_object(cfg)
    except ValueError as e:  # a section's own checks (__post_init__): say which section
        where = failing_section(cfg)
        raise ValueError(f"{where}: {e}" if where else str(e)) from None
    errors = range_errors(typed)
    if errors:
        raise ValueError(errors[0] + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""))
    return typed


def unknown_keys(node: DictConfig, prefix: str = "") -> list[str]:
    """Keys of a composed config that its dataclass schemas do not have (e.g. added with `+key=value`)."""
    found = []
    schema = OmegaConf.get_type(node)
    known = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        path = f"{prefix}{key}"
        if known is not None and key not in known:
            found.append(path)
            continue
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            if dataclasses.is_dataclass(OmegaConf.get_type(child)):
                found.extend(unknown_keys(child, f"{path}."))
    return found


def failing_section(node: DictConfig, prefix: str = "") -> str | None:
    """The key of the deepest dataclass section of a composed config whose construction raises ValueError."""
    for key in node.keys():
        child = node._get_node(key)
        if isinstance(child, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(child)):
            found = failing_section(child, f"{prefix}{key}.")
            if found:
                return found
    if prefix:
        try:
            OmegaConf.to_object(node)
        except ValueError:
            return prefix[:-1]
    return None


def config_to_yaml(cfg: TrainConfig) -> str:
    """The YAML of a typed config (what a checkpoint's config.yaml holds; `read_run_config` reads it back)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


RUN_CONFIG_KEY = "sf_run_config"  # the metadata entry of an exported weights file holding its run's config.yaml


def read_run_config(path: str | Path) -> TrainConfig:
    """The typed config of a run, from a checkpoint's (or a run dir's) resolved `config.yaml`, of any version."""
    path = Path(path)
    if path.is_dir():
        path = path / "config.yaml" if (path / "config.yaml").exists() else path / ".hydra" / "config.yaml"
    try:
        text = path.read_text()
    except OSError as exn:
        raise ValueError(f"{path}: not a readable run config ({exn})") from None
    return parse_run_config(text, str(path))


def parse_run_config(text: str, where: str = "run config") -> TrainConfig:
    """The typed config of a run's config.yaml text (any version; `where` names it in errors)."""
    try:
        raw = OmegaConf.to_container(OmegaConf.create(text), resolve=False)
    except ValueError as exn:
        raise ValueError(f"{where}: not a readable run config ({exn})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: not a readable run config (not a mapping)")
    register_configs()
    migrated = migrate(raw)
    from sf.tasks import TASKS

    task_name = migrated.pop("task_name")
    schema = OmegaConf.structured(TrainConfig)
    schema.task = OmegaConf.structured(TASKS[task_name][0])
    merged = OmegaConf.merge(schema, migrated)
    if OmegaConf.is_missing(merged.teacher, "checkpoint"):
        merged.teacher.checkpoint = None
    return OmegaConf.to_object(merged)


def check_task_name(name: str, schema: type) -> None:
    """`task.name` must be the registry name of the task's schema (it says which job runs)."""
    from sf.tasks import TASKS

    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; the known tasks are {', '.join(sorted(TASKS))}")
    if TASKS[name][0] is not schema:
        raise ValueError(f"task.name is {name!r} but the task config is a {schema.__name__}: set the task with "
                         f"task=<name>, not task.name")


def migrate(raw: dict) -> dict:
    """A saved config (a plain dict) in this version's layout, plus its `task_name`.

    Version 1 (no `config_version`) had one section per task (`distill`, `flow`, `ode`, `vae`), a shared
    `rollout` and `optim`, and `task` as a string. Since version 2 the task's section is `task` itself, with its
    own rollout, EMA and optimizers (named after the roles it trains); the LR schedule and clipping are in
    `trainer`; `logger.job_type` "distill", version 1's default for every task, became null (the task's name);
    `text.max_length` 77 of the sf-tiny-clip tower, whose own length is 77, became null (the encoder's own).
    """
    raw = copy.deepcopy(_plain(raw))
    version = raw.get("config_version", 1)
    if version == CONFIG_VERSION:
        return {**raw, "task_name": raw["task"]["name"]}
    if version != 1:
        raise ValueError(f"config_version {version} is newer than this sf ({CONFIG_VERSION}): upgrade sf")
    name = raw.pop("task", "distill")
    sections = {key: raw.pop(key, {}) for key in ("distill", "flow", "ode", "vae", "rollout", "optim")}
    distill, flow, ode, vae, rollout, optim = (sections[k] for k in ("distill", "flow", "ode", "vae", "rollout", "optim"))
    raw["trainer"] = {**raw.get("trainer", {}), **{k: optim[k] for k in ("warmup_steps", "cooldown_steps", "grad_clip")
                                                   if k in optim}}
    if raw.get("logger", {}).get("job_type") == "distill":  # the old default, whatever the task: now the task's name
        raw["logger"] = {**raw["logger"], "job_type": None}
    text = raw.get("text", {})
    if text.get("max_length") == 77 and text.get("model_name") == "sf-tiny-clip":  # = the tower's own length
        raw["text"] = {**text, "max_length": None}
    first_role = optim.get("generator", {})
    if name == "distill":
        task = {k: v for k, v in distill.items() if k not in ("ema_decay", "ema_start_step")}
        task.update(name=name, rollout=rollout, ema={"decay": distill.get("ema_decay", 0.99),
                                          "start_step": distill.get("ema_start_step", 200)},
                    optim={"generator": first_role, "critic": optim.get("critic", {})})
    elif name == "teacher":
        task = {k: v for k, v in flow.items() if k != "ema_decay"}
        task.update(name=name, sample_cfg_scale=distill.get("cfg_scale", 3.0), ema={"decay": flow.get("ema_decay", 0.999)},
                    optim={"teacher": first_role})
    elif name == "ode":
        task = {k: v for k, v in ode.items() if k != "ema_decay"}
        task.update(name=name, latent_height=distill.get("latent_height", 4), latent_width=distill.get("latent_width", 4),
                    rollout=rollout, ema={"decay": ode.get("ema_decay", 0.99)}, optim={"generator": first_role})
    elif name == "vae":
        task = {"name": name, **vae, "optim": {"vae": first_role}}
    else:
        raise ValueError(f"unknown task {name!r} in a version-1 config")
    return {"config_version": CONFIG_VERSION, **raw, "task": task, "task_name": name}


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=False)
    return value
