"""A training run's wandb offline record holds exactly the scalars of metrics.jsonl, plus sample videos."""

import math

import imageio.v3 as iio
import pytest

from launch import read_metrics, run_train
from sf.logging import read_wandb_history

pytestmark = pytest.mark.slow


def test_wandb_offline_run_matches_metrics_jsonl_and_has_videos(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["experiment=smoke", "logger=wandb", "logger.video_every=2", "logger.tags=[smoke,test]"],
              nproc=1)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]

    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {row["_step"]: row for row in read_wandb_history(run_file)}
    assert sorted(history) == [1, 2, 3, 4]
    for row in rows:
        logged = history[row["step"]]
        for key, value in row.items():
            if key == "step":
                continue
            assert math.isclose(logged[key], value, rel_tol=0, abs_tol=0), key  # the very same numbers

    videos = [step for step, row in history.items() if row.get("sample/_type") == "video-file"]
    assert videos == [2, 4]
    media = sorted(run_file.parent.glob("files/media/videos/*.mp4"))
    assert len(media) == 2
    frames = iio.imread(media[0])
    assert frames.shape[0] == 6 and frames.shape[-1] == 3  # one frame per latent frame, RGB
    assert (run_dir / "samples" / "sample_000002.mp4").exists()
    assert (run_dir / "wandb_run_id.txt").read_text().strip() in run_file.name
