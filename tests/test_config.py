"""Every experiment composes; unknown keys and a missing teacher checkpoint fail with one clear line."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sf.config import TrainConfig, to_train_config

CONF = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def composed(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base=None):
        return compose(config_name="config", overrides=list(overrides))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes_to_typed_config(experiment):
    overrides = [f"experiment={experiment}"]
    if experiment != "smoke":  # real experiments need real paths
        overrides += ["teacher.checkpoint=/path/to/teacher", "data.shards=/path/to/shards"]
    if experiment == "demo" or experiment.startswith("world_"):  # the world's weights come from `make assets`
        overrides += ["text.pretrained=/path/to/text", "codec.checkpoint=/path/to/vae", "model.checkpoint=/path/to/m"]
    cfg = to_train_config(composed(*overrides))
    assert isinstance(cfg, TrainConfig)
    assert cfg.trainer.max_steps > 0 and cfg.rollout.num_frames > 0


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


def test_cli_errors_are_one_clear_line(tmp_path):
    missing = run_cli("data.shards=x.tar", f"hydra.run.dir={tmp_path}")
    assert missing.returncode != 0
    lines = [line for line in missing.stderr.splitlines() if line.strip()]
    assert lines == ["error: missing mandatory value: teacher.checkpoint (set it as an override, e.g. teacher.checkpoint=...)"]
    unknown = run_cli("experiment=smoke", "trainer.bogus=1", f"hydra.run.dir={tmp_path}")
    assert unknown.returncode != 0
    assert "trainer.bogus" in unknown.stderr.splitlines()[0]


def test_bad_inputs_at_start_are_one_line(tmp_path):
    absent = run_cli("experiment=smoke", "teacher.checkpoint=/nonexistent/teacher", f"hydra.run.dir={tmp_path / 'a'}")
    assert absent.returncode == 1
    assert absent.stderr.strip().splitlines()[-1] == "error: /nonexistent/teacher: no such file or directory"
    # brace patterns must be quoted for Hydra's override grammar: 'data.shards="/x/shards-{000..009}.tar"'
    shards = run_cli("experiment=smoke", 'data.shards="/nonexistent/shards-{000..009}.tar"',
                     f"hydra.run.dir={tmp_path / 'b'}")
    assert shards.returncode == 1
    last = shards.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "/nonexistent/shards-{000..009}.tar" in last


def test_help_explains_usage_and_lists_groups():
    result = run_cli("--help")
    assert result.returncode == 0
    assert result.stdout.startswith("sf-train: self-forcing DMD distillation")
    assert "deepspeed: zero0, zero1, zero2, zero3" in result.stdout and "teacher:" in result.stdout
