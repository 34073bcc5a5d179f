"""The evaluator on ground truth and on world weights built by the shortened recipes; `make demo` shortened."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from launch import REPO, job_env

from sf.world.evaluate import COMPONENTS, CountedNet, EvalConfig, WorldEvaluator, load_net, model_score
from sf.distill.rollout import RolloutConfig


def test_model_score_is_a_geometric_mean_that_any_zero_sinks():
    perfect = dict.fromkeys(COMPONENTS, 1.0)
    assert model_score(perfect) == 1.0
    assert model_score({**perfect, "fidelity": 0.0}) == 0.0
    assert model_score({**perfect, "motion_consistency": float("nan")}) == 0.0
    assert model_score({**perfect, "prompt_adherence": 0.5}) == pytest.approx(0.5 ** 0.25)


@pytest.fixture(scope="module")
def assets(quick_assets):
    return quick_assets / "world"


@pytest.fixture(scope="module")
def evaluator(assets):
    return WorldEvaluator(EvalConfig(num_videos=16, batch_size=8), assets, progress=False)


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_evaluator_on_ground_truth(evaluator):
    """Real videos score near 1 on the oracle; frozen frames and wrong captions score low.

    (The classifier here is the shortened recipe's; FVD and fidelity on ground truth are validated with the
    full classifier in tests/test_world_fvd.py.)"""
    real = evaluator.score(evaluator.real)
    assert real["per_video_score"] >= 0.95
    assert all(real["components"][name] >= 0.95 for name in COMPONENTS[:3])
    frozen = evaluator.score(np.repeat(evaluator.real[:, :1], evaluator.real.shape[1], axis=1))
    assert frozen["oracle_score"] <= 0.3
    captions = evaluator.captions
    try:
        evaluator.captions = captions[1:] + captions[:1]
        shuffled = evaluator.score(evaluator.real)
    finally:
        evaluator.captions = captions
    assert shuffled["components"]["prompt_adherence"] <= 0.5 and shuffled["oracle_score"] < real["oracle_score"]


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_shipped_vae_maps_81_frames_to_21_latent_frames_and_back(evaluator):
    """The shipped VAE on real world clips: 81 frames -> normalised latents (21, 16, 8, 8) -> 81 frames."""
    from sf.models.vae import video_from_uint8

    clips = torch.stack([video_from_uint8(v) for v in evaluator.real[:2]])
    with torch.no_grad():
        latents = evaluator.codec.encode(clips)
    assert latents.shape == (2, 21, 16, 8, 8) and torch.isfinite(latents).all()
    assert 0.2 < float(latents.std()) < 5  # normalised by the fitted per-channel statistics
    decoded = evaluator.decode(latents)
    assert decoded.shape == evaluator.real[:2].shape and decoded.dtype == np.uint8


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_batched_decode_matches_one_clip_at_a_time(evaluator):
    latents = torch.randn(3, 21, 16, 8, 8, generator=torch.Generator().manual_seed(0))
    batch_size = evaluator.cfg.batch_size
    try:
        evaluator.cfg.batch_size = 2  # batches of 2 and 1
        batched = evaluator.decode(latents).astype(np.int16)
    finally:
        evaluator.cfg.batch_size = batch_size
    single = np.concatenate([evaluator.decode(latents[i:i + 1]) for i in range(3)]).astype(np.int16)
    assert np.abs(batched - single).max() <= 1  # uint8 rounding of float-level differences


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_vae_round_trip_scores_the_real_videos_through_the_codec(evaluator):
    """The ceiling for every model: the quick recipe's 2-step VAE loses the objects, the real videos do not."""
    ceiling = evaluator.vae_round_trip(count=4)
    assert ceiling["num_videos"] == 4 and set(ceiling["components"]) == set(COMPONENTS)
    assert ceiling["components"]["prompt_adherence"] < 0.5 <= evaluator.score(evaluator.real[:4])["components"][
        "prompt_adherence"]


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_a_count_limited_evaluation_scores_the_first_videos(evaluator, assets):
    result, videos = evaluator.evaluate_student(load_net(assets / "ode_init.safetensors"),
                                                RolloutConfig(num_frames=21, frames_per_block=3), count=2)
    assert result["num_videos"] == 2 and len(videos) == 2


@pytest.mark.slow  # on the world weights built by `make assets --quick` (a minute)
def test_network_evaluations_are_counted_not_assumed(evaluator, assets):
    net = load_net(assets / "ode_init.safetensors")
    rollout = RolloutConfig(num_frames=21, frames_per_block=3)
    evaluator.cfg.num_videos, evaluator.cfg.teacher_steps = 2, 3
    try:
        _, student_nfe, _ = evaluator.generate_student(net, rollout)
        _, teacher_nfe, _ = evaluator.generate_teacher(load_net(assets / "teacher.safetensors"))
    finally:
        evaluator.cfg.num_videos, evaluator.cfg.teacher_steps = 16, 48
    # 4 denoising steps + the pass writing the clean chunk into the cache, except after the last of the 7 chunks
    assert student_nfe == pytest.approx((7 * 5 - 1) / 7)
    assert teacher_nfe == 6.0  # 3 steps x (conditional + unconditional)
    counted = CountedNet(lambda x, t, c, **kw: x)
    counted(torch.zeros(2, 3, 1, 1, 1), None, None)
    assert counted.frame_evals == 6


@pytest.mark.slow
def test_make_demo_on_a_shortened_schedule(tmp_path, assets):
    run_dir = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "eval.demo", "--run-dir", str(run_dir), "--steps", "2",
                             "--num-videos", "4", "--teacher-steps", "4", "--assets", str(assets)], cwd=REPO, env=job_env(),
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    report = json.loads((run_dir / "report.json").read_text())
    for name in ("teacher", "ode_init", "student"):
        entry = report[name]
        assert 0.0 <= entry["oracle_score"] <= 1.0 and entry["num_videos"] == 4
        assert set(entry["components"]) == set(COMPONENTS)
        assert entry["seconds_per_frame"] > 0
    assert report["teacher"]["nfe_per_frame"] == 8.0 and report["student"]["nfe_per_frame"] == round((7 * 5 - 1) / 7, 3)
    assert report["student"]["training_steps"] == 2
    assert [h["step"] for h in report["history"]] == [0, 1, 2]
    assert all(h["num_videos"] == 4 for h in report["history"])  # history_videos (16) capped at 4
    assert set(report["acceptance"]) >= {"student_vs_teacher", "nfe_reduction", "beats_ode_init", "passed"}
    assert report["vae_round_trip"]["num_videos"] == 4 and 0.0 <= report["vae_round_trip"]["oracle_score"] <= 1.0
    for path in ("report.md", "plots/losses.png", "plots/metric_vs_step.png", "plots/drift_vs_horizon.png",
                 "samples/side_by_side.mp4", "samples/side_by_side.gif"):
        assert (run_dir / path).stat().st_size > 0, path
    assert "report:" in result.stdout and "student" in result.stdout
