"""Console entry points: sf-generate streams a video from bare weights; --help works everywhere."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from sf.cli import export_main, generate_main
from sf.models import VideoDiT, dit_config
from sf.models.convert import save_dit


def test_generate_streams_an_mp4_from_bare_weights(tmp_path, capsys):
    """Weights without a run: rollout and latent size from the flags, a false-colour preview (no VAE)."""
    weights = save_dit(VideoDiT(dit_config("debug", text_dim=64)), tmp_path / "generator.safetensors")
    generate_main([str(weights), "--prompt", "a red circle moves left", "--prompt", "a blue square moves up",
                   "--num-frames", "7", "--latent-hw", "4", "4", "--window", "6", "--sink-frames", "3",
                   "--out", str(tmp_path / "out" / "video.mp4")])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["prompt"] for line in lines] == ["a red circle moves left", "a blue square moves up"]
    assert [line["out"] for line in lines] == [str(tmp_path / "out" / f"video_{i:03d}.mp4") for i in range(2)]
    assert all(line["window"] == 6 and line["latent_frames"] == 7 and line["frames"] == 7 for line in lines)
    assert all(line["fps"] > 0 and line["fps_dit"] >= line["fps"] for line in lines)
    videos = [iio.imread(line["out"]) for line in lines]
    assert videos[0].shape[0] == 7 and not np.array_equal(videos[0], videos[1])


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
