"""Console entry points: sf-generate streams a video from exported weights; --help works everywhere."""

import json

import imageio.v3 as iio
import pytest
import torch

from sf.cli import export_main, generate_main
from sf.models import VideoDiT, dit_config
from sf.models.convert import save_dit


def test_generate_streams_video_from_exported_weights(tmp_path, capsys):
    weights = save_dit(VideoDiT(dit_config("debug", text_dim=64)), tmp_path / "generator.safetensors")
    generate_main([str(weights), "--prompt", "a red circle moves left", "--prompt", "a blue square moves up",
                   "--num-frames", "7", "--latent-hw", "4", "4", "--local-attn-frames", "6", "--sink-frames", "3",
                   "--out", str(tmp_path / "out")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["a red circle moves left", "a blue square moves up"]
    latents = torch.load(lines[0]["latents"], weights_only=True)
    assert latents.shape == (1, 7, 4, 4, 4) and torch.isfinite(latents).all()
    assert iio.imread(lines[0]["preview"]).shape[0] == 7
    assert not torch.equal(latents, torch.load(lines[1]["latents"], weights_only=True))


@pytest.mark.parametrize("entry", [export_main, generate_main])
def test_help(entry, capsys):
    with pytest.raises(SystemExit) as exit_:
        entry(["--help"])
    assert exit_.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_export_of_a_folder_without_checkpoints_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        export_main([str(tmp_path)])
    assert exit_info.value.code == 1
    assert "neither a complete checkpoint nor a run dir" in capsys.readouterr().err
