"""Every experiment composes; unknown keys and a missing teacher checkpoint fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from sf.config import TrainConfig, compose_config, to_train_config

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(*overrides):
    return compose_config(list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_to_typed_config(experiment):
    overrides = [f"experiment={experiment}"]
    if experiment != "smoke":  # real experiments need real paths
        overrides += ["teacher.checkpoint=/path/to/teacher", "data.shards=/path/to/shards"]
    if experiment == "demo" or experiment.startswith("world_"):  # the world's weights come from `make assets`
        overrides += ["text.pretrained=/path/to/text", "codec.checkpoint=/path/to/vae", "model.checkpoint=/path/to/m"]
    if experiment == "wan1.3b_selfforcing_14b_teacher":  # values the recipe requires
        overrides += ["model.checkpoint=/path/to/ode_init.pt", "critic.checkpoint=/path/to/Wan2.1-T2V-1.3B"]
    cfg = to_train_config(composed(*overrides))
    assert isinstance(cfg, TrainConfig)
    assert cfg.trainer.max_steps > 0
    if hasattr(cfg.task, "rollout"):
        assert cfg.task.rollout.num_frames > 0


def test_a_recipe_s_required_values_are_named_when_missing():
    with pytest.raises(ValueError, match=r"^missing mandatory value: model.checkpoint \(the ODE-initialised"):
        to_train_config(composed("experiment=wan1.3b_selfforcing_14b_teacher", "teacher.checkpoint=/t",
                                 "data.shards=/d"))
    with pytest.raises(ValueError, match=r"^missing mandatory value: critic.checkpoint"):
        to_train_config(composed("experiment=wan1.3b_selfforcing_14b_teacher", "teacher.checkpoint=/t",
                                 "data.shards=/d", "model.checkpoint=/m"))


def test_groups_select_deepspeed_and_logger():
    cfg = to_train_config(composed("experiment=smoke", "deepspeed=zero3", "logger=wandb", "trainer.max_steps=7", "seed=3"))
    assert cfg.deepspeed.stage == 3 and cfg.logger.backend == "wandb"
    assert cfg.trainer.max_steps == 7 and cfg.seed == 3
    assert Path(cfg.data.shards).is_file()  # ${sf.asset:...} resolved to the shipped prompt list


def test_unknown_key_fails_at_compose_time_naming_it():
    with pytest.raises(Exception, match="trainer.max_stepz"):
        composed("experiment=smoke", "trainer.max_stepz=3")
    with pytest.raises(Exception, match="Could not find 'deepspeed/zero9'"):
        composed("experiment=smoke", "deepspeed=zero9")


def test_wrong_type_fails():
    with pytest.raises(Exception, match="max_steps"):
        composed("experiment=smoke", "trainer.max_steps=many")


def run_cli(*overrides):
    return subprocess.run([sys.executable, "-m", "sf.train", *overrides], capture_output=True, text=True, timeout=120)


@pytest.mark.slow
def test_cli_errors_are_one_clear_line(tmp_path):
    missing = run_cli("data.shards=x.tar", f"hydra.run.dir={tmp_path}")
    assert missing.returncode != 0
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert lines == ["error: missing mandatory value: teacher.checkpoint (set it as an override, e.g. teacher.checkpoint=...)"]
    unknown = run_cli("experiment=smoke", "trainer.bogus=1", f"hydra.run.dir={tmp_path}")
    assert unknown.returncode != 0
    assert "trainer.bogus" in unknown.stderr.splitlines()[0]


@pytest.mark.slow
def test_bad_inputs_at_start_are_one_line(tmp_path):
    absent = run_cli("experiment=smoke", "teacher.checkpoint=/nonexistent/teacher", f"hydra.run.dir={tmp_path / 'a'}")
    assert absent.returncode == 1
    assert absent.stderr.strip().splitlines()[-1] == "error: teacher.checkpoint /nonexistent/teacher: no such file or directory"
    # brace patterns must be quoted for Hydra's override grammar: 'data.shards="/x/shards-{000..009}.tar"'
    shards = run_cli("experiment=smoke", 'data.shards="/nonexistent/shards-{000..009}.tar"',
                     f"hydra.run.dir={tmp_path / 'b'}")
    assert shards.returncode == 1
    last = shards.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/shards-{000..009}.tar" in last


@pytest.mark.slow
def test_help_explains_usage_and_lists_groups():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("sf-train: self-forcing DMD distillation")
    assert "deepspeed: zero0, zero1, zero2, zero3" in result.stdout and "teacher:" in result.stdout


def test_tasks_own_their_config_and_check_its_keys():
    teacher = to_train_config(composed("task=teacher", "data.shards=x"))
    assert teacher.task.name == "teacher" and teacher.teacher.checkpoint is None  # trains from data alone
    assert teacher.task.optim.teacher.lr > 0 and not hasattr(teacher.task, "rollout")
    with pytest.raises(Exception, match="task.gen_update_every"):  # a distill key is not a teacher key
        composed("task=teacher", "data.shards=x", "task.gen_update_every=3")
    with pytest.raises(ValueError, match="task.name is 'teacher' but the task config is a DistillTask"):
        to_train_config(composed("experiment=smoke", "task.name=teacher"))


def test_keys_appended_with_plus_must_exist_in_a_schema():
    for key in ("+trainer.max_stepz=3", "+task.gen_update_everyy=3", "+bogus=1"):
        with pytest.raises(ValueError, match=r"unknown config key " + key[1:].split("=")[0].replace(".", r"\.")):
            to_train_config(composed("experiment=smoke", key))
    assert to_train_config(composed("experiment=smoke", "+model.overrides.ffn_dim=64")).model.overrides == {
        "text_dim": 64, "ffn_dim": 64}  # free-form dicts take new keys


def test_a_saved_config_reads_back_as_the_typed_config(tmp_path):
    from omegaconf import OmegaConf

    from sf.config import read_run_config

    dict_cfg = composed("experiment=smoke", "task.cfg_scale=2.5")
    (tmp_path / "config.yaml").write_text(OmegaConf.to_yaml(dict_cfg, resolve=True))
    assert read_run_config(tmp_path) == to_train_config(dict_cfg)


def test_a_version_1_config_is_migrated():
    from sf.config import migrate

    old = {"task": "teacher", "flow": {"caption_dropout": 0.2, "ema_decay": 0.9}, "distill": {"cfg_scale": 2.0},
           "optim": {"generator": {"lr": 1e-3}, "critic": {"lr": 1.0}, "warmup_steps": 5, "grad_clip": 1.0},
           "trainer": {"max_steps": 7}, "rollout": {"num_frames": 3}}
    new = migrate(old)
    assert new["task_name"] == "teacher" and new["config_version"] == 2
    assert new["task"] == {"name": "teacher", "caption_dropout": 0.2, "sample_cfg_scale": 2.0, "ema": {"decay": 0.9},
                           "optim": {"teacher": {"lr": 1e-3}}}
    assert new["trainer"] == {"max_steps": 7, "warmup_steps": 5, "grad_clip": 1.0}
    assert not {"flow", "distill", "optim", "rollout"} & set(new)


@pytest.mark.slow
def test_an_unknown_task_is_one_line_listing_the_known_ones(tmp_path):
    result = run_cli("task=bogus", "data.shards=x", f"hydra.run.dir={tmp_path}")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: unknown task 'bogus'; the known tasks are distill, ode, "
                                                  "teacher, vae"]


def test_a_codec_the_user_names_is_kept_when_the_kind_is_auto():
    from sf.tasks.preflight import resolve

    cfg = resolve(to_train_config(composed("experiment=smoke", "codec.checkpoint=/path/to/vae.safetensors")))
    assert (cfg.codec.kind, cfg.codec.checkpoint) == ("wan", "/path/to/vae.safetensors")
    plain = resolve(to_train_config(composed("experiment=smoke")))
    assert (plain.codec.kind, plain.codec.checkpoint) == ("identity", None)  # random teacher: latent previews
