"""The shipped world weights (sf/assets/world, what `make demo` starts from): all there, each the product of the
committed recipe it names, and the VAE keeps the world's objects."""

import json

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from eval.assets import SHIPPED
from eval.bench_vae import evaluate
from sf.config import compose_config, migrate
from sf.world.evaluate import ASSETS, load_net
from sf.world.scenes import make_scene, render
from sf.models.vae import load_codec, video_from_uint8

RECIPES = {"vae": "world_vae", "teacher": "world_teacher", "ode_init": "world_ode"}
# where the build put its inputs: the only fields allowed to differ from a fresh composition of the command
PATHS = {"data.shards", "text.pretrained", "codec.checkpoint", "teacher.checkpoint", "model.checkpoint"}


def test_every_shipped_file_is_there_with_its_provenance():
    for name in SHIPPED:
        assert (ASSETS / name).stat().st_size > 0, name
    for name in ("text_encoder", "vae", "teacher", "ode_init", "classifier"):
        record = json.loads((ASSETS / f"{name}.json").read_text())
        assert record["file"] == f"{name}.safetensors" and record["bytes"] == (ASSETS / record["file"]).stat().st_size


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_shipped_weights_come_from_the_committed_recipe(name):
    """Composing the recorded command with today's conf/ gives the config the weights were trained with (read in
    today's layout, `sf.config.migrate`): a recipe edited without rebuilding the assets (`make assets`) fails here."""
    record = json.loads((ASSETS / f"{name}.json").read_text())
    overrides = [o for o in record["command"].split()[1:] if not o.startswith("hydra.")]
    assert overrides[0] == f"experiment={RECIPES[name]}"
    fresh = _flatten(OmegaConf.to_container(compose_config(overrides), resolve=True))
    trained = migrate(yaml.safe_load(record["config_yaml"]))
    assert trained.pop("task_name") == fresh["task.name"]
    trained = _flatten(trained)
    # fields added to the schema since are not compared: a new field must default to the old behaviour
    differ = {key: (value, fresh.get(key, "<removed>")) for key, value in trained.items()
              if key not in PATHS and fresh.get(key, "<removed>") != value}
    assert not differ, f"{name}: shipped weights were trained with (value, recipe now): {differ}"
    assert record["steps"] == fresh["trainer.max_steps"]


def test_shipped_vae_keeps_the_objects():
    codec = load_codec(ASSETS / "vae.safetensors").eval()
    scene = make_scene(0, "val", 0)
    frames = render(scene)
    with torch.no_grad():
        assert codec.encode(video_from_uint8(frames)[None]).shape[1:3] == (21, 16)
    scores = evaluate(codec, [(frames, scene.background)], "cpu", per_frame=True)
    # an untrained codec or one decoding the background only scores < 8 dB on object pixels (docs/benchmarks.md)
    assert scores["object_psnr"] > 11 and min(scores["object_psnr_per_frame"]) > 8, scores


def test_shipped_networks_load():
    teacher, student = load_net(ASSETS / "teacher.safetensors"), load_net(ASSETS / "ode_init.safetensors")
    assert teacher.cfg == student.cfg
    assert not torch.equal(next(teacher.parameters()), next(student.parameters()))
