"""The health signals measure what they claim (frozen, moving, drifting videos; a critic equal to the teacher),
and a world run logs them, with the oracle's terms, to metrics.jsonl and to its wandb offline run."""

import math

import pytest
import torch

from launch import read_metrics, run_and_kill, run_train
from sf.distill.health import critic_gap, latent_signals
from sf.logging import read_wandb_history


def moving(frames: int, seed: int = 0) -> torch.Tensor:
    """(K=3, F, C=4, 4, 4) fp64: a random start moved by a fixed random step per frame (constant velocity; fp64
    keeps the frame differences equal to ~1e-15, where fp32 values up to ~12 steps would round them by ~1e-6)."""
    gen = torch.Generator().manual_seed(seed)
    start, velocity = (torch.randn(3, 1, 4, 4, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    return start + velocity * torch.arange(frames, dtype=torch.float64).view(1, frames, 1, 1, 1)


def test_a_frozen_video_reads_as_static_and_a_moving_one_does_not():
    still = torch.randn(3, 1, 4, 4, 4).expand(3, 12, 4, 4, 4)
    frozen = latent_signals(still, train_frames=6, frames_per_block=3)
    assert frozen["chunk_change_early"] == frozen["chunk_change_late"] == frozen["chunk_change_min"] == 0.0
    assert frozen["static_fraction"] == 1.0 and frozen["motion_ratio"] == 0.0

    signals = latent_signals(moving(12), train_frames=6, frames_per_block=3)
    assert signals["static_fraction"] == 0.0
    # constant velocity: every chunk changes as much as every other
    assert signals["motion_ratio"] == pytest.approx(1.0, abs=1e-12)
    assert signals["chunk_change_min"] == pytest.approx(signals["chunk_change_early"], abs=1e-12)
    x = moving(12)
    expected = ((x[:, 1:] - x[:, :-1]).abs().mean(dim=(1, 2, 3, 4)) / x.std(dim=(1, 2, 3, 4))).mean()
    assert signals["chunk_change_early"] == pytest.approx(float(expected), rel=1e-9)


def test_a_video_that_freezes_past_the_training_length_shows_in_the_late_signals():
    video = moving(12)
    video[:, 6:] = video[:, 5:6]  # stops at the end of the training length
    signals = latent_signals(video, train_frames=6, frames_per_block=3)
    assert signals["chunk_change_late"] == pytest.approx(0.0, abs=1e-12)
    assert signals["motion_ratio"] == pytest.approx(0.0, abs=1e-12) and signals["chunk_change_early"] > 0.1


def test_drift_proxies_follow_the_late_window():
    base = torch.randn(3, 12, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    steady = latent_signals(base, train_frames=6, frames_per_block=3)
    grown = base.clone()
    grown[:, 6:] *= 2.0
    assert latent_signals(grown, 6, 3)["std_ratio"] == pytest.approx(2 * steady["std_ratio"], rel=1e-6)
    shifted = base.clone()
    shifted[:, 6:] += 0.5  # every channel's mean moves by 0.5
    head_std = float(base[:, :6].double().std())
    means = (shifted[:, 6:].double().mean(dim=(0, 1, 3, 4)) - base[:, :6].double().mean(dim=(0, 1, 3, 4))).abs()
    assert latent_signals(shifted, 6, 3)["mean_shift"] == pytest.approx(float(means.mean()) / head_std, rel=1e-9)
    assert latent_signals(shifted, 6, 3)["mean_shift"] > steady["mean_shift"] + 0.3


def test_signals_refuse_what_is_not_a_rollout():
    with pytest.raises(ValueError, match="expected rollouts"):
        latent_signals(torch.zeros(3, 1, 4, 4, 4), 6, 3)


def test_critic_gap_is_zero_for_the_teacher_itself_and_scales_with_the_disagreement():
    video = torch.randn(2, 6, 4, 4, 4, generator=torch.Generator().manual_seed(2))

    def teacher(x_t, t):
        return 0.5 * x_t

    assert critic_gap(teacher, teacher, video, [250, 750])["critic_gap"] == 0.0
    gap = critic_gap(teacher, lambda x_t, t: teacher(x_t, t) + 0.1, video, [500], seed=3)
    noise = torch.randn(video.shape, generator=torch.Generator().manual_seed(3))
    real = 0.5 * (0.5 * video + 0.5 * noise)
    assert gap["critic_gap_t500"] == pytest.approx(0.1 / float((video - real).abs().mean()), rel=1e-5)
    assert gap["critic_gap"] == gap["critic_gap_t500"]


HEALTH_KEYS = ("chunk_change_early", "chunk_change_late", "chunk_change_min", "motion_ratio", "std_ratio",
               "mean_shift", "static_fraction", "critic_gap", "video_score", "prompt_adherence",
               "motion_consistency", "temporal_stability", "video_score_early", "video_score_late")


@pytest.mark.slow
def test_a_world_run_logs_its_health_to_metrics_jsonl_and_wandb(tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["experiment=world_sf", "trainer.max_steps=2", "trainer.checkpoint_every=2",
                        "task.health.every=1", "task.health.num_prompts=2", "logger=wandb"], nproc=1, timeout=600)
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in HEALTH_KEYS:
            assert math.isfinite(row[f"health/{key}"]), key
        assert 0 <= row["health/video_score"] <= 1
    assert rows[0]["health/critic_gap"] != rows[1]["health/critic_gap"]  # the critic trained in between
    (run_file,) = (run_dir / "wandb").glob("offline-run-*/run-*.wandb")
    history = {row["_step"]: row for row in read_wandb_history(run_file)}
    for row in rows:
        for key in HEALTH_KEYS:
            assert history[row["step"]][f"health/{key}"] == row[f"health/{key}"], key


@pytest.mark.slow
def test_health_checks_never_change_the_training(tmp_path):
    """Checks on the data's own first prompts (no table, not the world) read nothing the run reads and draw from
    no stream the run draws from: the losses are those of the same run without them."""
    base = ["experiment=smoke", "trainer.max_steps=4"]
    run_train(tmp_path / "off", base, nproc=1)
    run_train(tmp_path / "on", [*base, "task.health.every=1", "task.health.num_prompts=3"], nproc=1)
    off, on = read_metrics(tmp_path / "off"), read_metrics(tmp_path / "on")
    for key in ("loss/critic", "grad_norm/critic"):
        assert [r[key] for r in off] == [r[key] for r in on], key
    assert all("health/critic_gap" in r and "health/video_score" not in r for r in on)
    assert not any(k.startswith("health/") for r in off for k in r)


@pytest.mark.slow
def test_a_resumed_run_checks_the_same_prompts_as_the_uninterrupted_one(tmp_path):
    """On 2 ranks: the checks after a kill and resume equal the uninterrupted run's, every signal."""
    overrides = ["experiment=smoke", "trainer.max_steps=4", "trainer.checkpoint_every=2", "task.health.every=1"]
    run_train(tmp_path / "a", overrides)
    run_and_kill(tmp_path / "b", overrides, kill_after_step=2)
    run_train(tmp_path / "b", overrides)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    keys = sorted(k for k in a[0] if k.startswith("health/"))
    assert "health/critic_gap" in keys and "health/chunk_change_early" in keys
    for ra, rb in zip(a, b):
        assert [ra[k] for k in keys] == [rb[k] for k in keys], ra["step"]
