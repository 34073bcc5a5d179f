"""Run logger and video writing: resume truncation, rank silence, readable mp4/gif, tiling, plots."""

import json

import imageio.v3 as iio
import numpy as np
import pytest
import torch

from sf.logging import LoggerConfig, NullLogger, make_logger, plot_metrics, read_metrics
from sf.video import save_video, side_by_side, to_uint8


def test_metrics_rows_are_exact_and_resume_cuts_back(tmp_path):
    cfg = LoggerConfig(progress=False)
    with make_logger(cfg, tmp_path, rank=0, config={"a": 1}, total_steps=5) as log:
        for step in range(1, 6):
            log.log(step, {"loss/x": torch.tensor(step / 10), "lr": 0.5})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": s, "loss/x": pytest.approx(s / 10), "lr": 0.5} for s in range(1, 6)]
    # a run killed after logging step 5 resumes from its checkpoint at step 3: steps 4, 5 are logged again
    with make_logger(cfg, tmp_path, rank=0, config={}, total_steps=5, start_step=3) as log:
        log.log(4, {"loss/x": 0.4})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_other_ranks_write_nothing(tmp_path):
    log = make_logger(LoggerConfig(backend="wandb"), tmp_path, rank=1, config={}, total_steps=3)
    assert isinstance(log, NullLogger)
    log.log(1, {"loss": 1.0})
    assert log.log_video(1, "sample", np.zeros((2, 8, 8, 3), np.uint8)) is None
    assert list(tmp_path.iterdir()) == []


def test_unknown_backend_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="logger.backend must be 'jsonl' or 'wandb'"):
        make_logger(LoggerConfig(backend="tensorboard"), tmp_path, rank=0, config={}, total_steps=1)


@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_saved_videos_read_back(tmp_path, suffix):
    video = torch.rand(9, 3, 32, 48) * 2 - 1  # (T, C, H, W) in [-1, 1]
    path = save_video(video, tmp_path / f"v{suffix}", fps=8)
    frames = iio.imread(path)
    assert frames.shape[0] == 9 and frames.shape[1:3] == (32, 48)
    if suffix == ".gif":  # lossless up to the palette
        assert np.abs(frames[..., :3].astype(int) - to_uint8(video).astype(int)).mean() < 40


def test_side_by_side_tiles_and_labels():
    a, b = np.zeros((4, 16, 16, 3), np.uint8), np.full((4, 16, 20, 3), 255, np.uint8)
    tiled = side_by_side([a, b], gap=2)
    assert tiled.shape == (4, 16, 38, 3) and tiled[0, 0, 20, 0] == 255
    assert side_by_side([a, b], labels=["teacher", "student"]).shape[1] > 16
    with pytest.raises(ValueError):
        side_by_side([a, np.zeros((5, 16, 16, 3), np.uint8)])


def test_plot_metrics_writes_png(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss/a": 1 / s}) + "\n" for s in range(1, 9)))
    out = plot_metrics(tmp_path / "metrics.jsonl", tmp_path / "loss.png")
    assert iio.imread(out).shape[0] > 100
