"""eval/bench_vae: the VAE learning-curve benchmark trains with the recipe's loss and scores objects separately."""

import json

import numpy as np
import torch

from eval.bench_vae import main, object_mask
from sf.world.scenes import BACKGROUNDS, make_scene, render
from sf.models.vae import WanVAE, save_codec


def test_object_mask_is_every_pixel_not_painted_the_background():
    scene = make_scene(0, "val", 3)
    frames = render(scene, 5)
    mask = object_mask(frames, scene.background)
    assert 0 < mask.mean() < 0.2
    assert (frames[~mask] == np.array(BACKGROUNDS[scene.background], np.uint8)).all()


def test_a_short_run_writes_its_curve_and_plot(tmp_path):
    result = main(["--steps", "2", "--eval-every", "1", "--batch", "1", "--crop-frames", "5", "--num-videos", "2",
                   "--val-videos", "1", "--out", str(tmp_path), "--quiet"])
    written = json.loads((tmp_path / "bench_vae.json").read_text())
    assert [row["step"] for row in written["curve"]] == [0, 1, 2] == [row["step"] for row in result["curve"]]
    for row in written["curve"]:
        assert 0 < row["psnr"] < 15 and 0 < row["object_psnr"] < 15  # two steps: nothing is reconstructed yet
    assert written["parameters"] == 668043 and (tmp_path / "bench_vae.png").stat().st_size > 0


def test_evaluate_scores_a_saved_codec_per_frame(tmp_path):
    torch.manual_seed(0)
    save_codec(WanVAE.from_flavor("world"), tmp_path / "vae.safetensors")
    result = main(["--evaluate", str(tmp_path / "vae.safetensors"), "--val-videos", "1"])
    assert len(result["object_psnr_per_frame"]) == 81
    assert 0 < result["psnr"] < 15 and 0 < result["object_psnr"] < 15  # an untrained codec
