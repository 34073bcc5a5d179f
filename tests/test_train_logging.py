"""A training run's wandb offline record holds exactly the scalars of metrics.jsonl, plus sample videos."""

import math

import imageio.v3 as iio
import pytest

from launch import read_metrics, run_and_kill, run_train
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


def test_wandb_run_resumed_after_kill_is_the_same_run_without_duplicate_or_missing_steps(tmp_path):
    overrides = ["experiment=smoke", "logger=wandb", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    run_dir = tmp_path / "run"
    run_and_kill(run_dir, overrides, kill_after_step=3, nproc=1)
    out = run_train(run_dir, overrides, nproc=1)
    assert "resumed from" in out.stdout
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    files = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)  # one wandb run, two sessions
    steps = [row["_step"] for f in files for row in read_wandb_history(f)]
    assert steps == [1, 2, 3, 4, 5, 6]
    jsonl = {r["step"]: r for r in read_metrics(run_dir)}
    assert sorted(jsonl) == [1, 2, 3, 4, 5, 6]
    for f in files:
        for row in read_wandb_history(f):
            assert row["loss/critic"] == jsonl[row["_step"]]["loss/critic"]
