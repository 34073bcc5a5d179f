"""One call loads a DiT from diffusers, original-Wan or our own files; bad files fail in one clear line."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import perturb_
from sf.models import VideoDiT, dit_config
from sf.models.convert import CheckpointError, convert_state_dict, load_dit, read_checkpoint, save_dit
from test_dit_oracle import CFG, diffusers_model


def same_output(a: VideoDiT, b: VideoDiT) -> bool:
    x, t, ctx = torch.randn(1, 3, 4, 4, 4), torch.rand(1, 3) * 1000, torch.randn(1, 2, a.cfg.text_dim)
    with torch.no_grad():
        return torch.equal(a(x, t, ctx), b(x, t, ctx))


@pytest.fixture
def model():
    return perturb_(VideoDiT(dit_config("debug")).eval())


def test_diffusers_directory_sharded_and_pipeline_layout(tmp_path):
    ref = diffusers_model(CFG)
    ref.save_pretrained(tmp_path / "pipe" / "transformer", max_shard_size="20KB")
    assert len(list((tmp_path / "pipe" / "transformer").glob("*.safetensors"))) > 1  # really sharded
    for path in (tmp_path / "pipe" / "transformer", tmp_path / "pipe"):
        state, fmt, cfg = read_checkpoint(path)
        assert fmt == "diffusers" and cfg == CFG
        loaded = load_dit(path)
        expected = convert_state_dict(ref.state_dict(), "diffusers", "sf")
        assert all(torch.equal(loaded.state_dict()[k], v) for k, v in expected.items())


def test_original_wan_directory(tmp_path, model):
    wan_dir = save_dit(model, tmp_path / "wan", fmt="wan").parent
    raw = json.loads((wan_dir / "config.json").read_text())
    assert raw["in_dim"] == 4 and raw["_class_name"] == "WanModel"
    # a Wan release carries no sf metadata: drop it to load through config.json like a real checkpoint
    state = load_file(str(wan_dir / "diffusion_pytorch_model.safetensors"))
    save_file(state, str(wan_dir / "diffusion_pytorch_model.safetensors"))
    state, fmt, _ = read_checkpoint(wan_dir)
    assert fmt == "wan"
    assert same_output(load_dit(wan_dir), model)


def test_own_export_and_wrapped_torch_file(tmp_path, model):
    path = save_dit(model, tmp_path / "generator.safetensors", extra_metadata={"step": 7})
    assert same_output(load_dit(path), model)
    # a training checkpoint with "module." prefixes inside {"generator": ...}, read without unpickling objects
    torch.save({"generator": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pt")
    assert same_output(load_dit(tmp_path / "ckpt.pt"), model)


def test_wrong_shapes_fail_naming_the_keys(tmp_path, model):
    path = save_dit(model, tmp_path / "g.safetensors")
    other = dit_config("debug", ffn_dim=64)
    with pytest.raises(CheckpointError) as err:
        load_dit(path, config=other)
    message = str(err.value)
    assert "\n" not in message
    assert "shape mismatch" in message and "blocks.0.ffn.fc1.weight: checkpoint (96, 48) vs model (64, 48)" in message


def test_missing_and_unexpected_keys_are_listed(tmp_path, model):
    state = dict(model.state_dict())
    del state["head.proj.bias"]
    state["blocks.0.extra.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 missing \(head.proj.bias\); 1 unexpected \(blocks.0.extra.weight\)"):
        load_dit(tmp_path / "bad.safetensors", config=model.cfg)


class NotATensor:
    pass


def test_pickle_with_objects_is_refused(tmp_path):
    torch.save({"weights": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        load_dit(tmp_path / "evil.pt")


def test_garbage_and_missing_files(tmp_path):
    (tmp_path / "junk.safetensors").write_bytes(b"\x00not safetensors at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_dit(tmp_path / "junk.safetensors")
    with pytest.raises(CheckpointError, match="no such file"):
        load_dit(tmp_path / "absent.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        load_dit(tmp_path / "empty")
    save_file({"foo.weight": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(CheckpointError, match="unrecognised DiT weights"):
        load_dit(tmp_path / "other.safetensors")
