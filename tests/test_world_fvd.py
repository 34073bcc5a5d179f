"""World-FVD: the Fréchet distance against closed forms, the classifier's input checks, its file round-trip,
a short training run, and real videos closer to real ones than frozen or noisy videos are."""

import math

import numpy as np
import pytest
import torch

from sf.world.fvd import (
    FVD_SCALE,
    ClassifierConfig,
    WorldClassifier,
    _whiten_features,
    broken_videos,
    features,
    fidelity,
    frechet_distance,
    load_classifier,
    main,
    render_batch,
    save_classifier,
    train_classifier,
    world_fvd,
)


def _with_covariance(rng, num_samples: int, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """Samples whose sample mean is exactly `mean` and sample covariance (ddof 1) exactly diag(std**2)."""
    noise = rng.normal(size=(num_samples, len(mean)))
    noise -= noise.mean(axis=0)
    basis, _ = np.linalg.qr(noise)  # (N, D) orthonormal columns, still zero-mean
    return mean + basis * math.sqrt(num_samples - 1) * std


@pytest.fixture(scope="module")
def trained():
    """A briefly trained classifier (30 steps of 8 videos) and its metrics."""
    return train_classifier(num_steps=30, batch_size=8, seed=0, progress=False, num_val=32)


@pytest.fixture(scope="module")
def val_videos():
    """Two disjoint sets of 16 real val videos, uint8 (16, 81, 64, 64, 3) each."""
    first, _ = render_batch("val", 0, range(1000, 1016))
    second, _ = render_batch("val", 0, range(2000, 2016))
    return first.numpy(), second.numpy()


# ------------------------------------------------------------------------------------------------ Fréchet distance


def test_frechet_distance_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).normal(size=(40, 8)) * 3 + 1
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_of_shifted_means_is_the_squared_shift():
    rng = np.random.default_rng(1)
    feats = rng.normal(size=(50, 6)) @ rng.normal(size=(6, 6))  # correlated dimensions
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, -1.0])
    assert frechet_distance(feats, feats + shift) == pytest.approx(float(shift @ shift), rel=1e-9)


def test_frechet_distance_matches_the_closed_form_for_diagonal_covariances():
    rng = np.random.default_rng(2)
    mean_a, mean_b = rng.normal(size=5), rng.normal(size=5)
    std_a, std_b = rng.uniform(0.5, 2.0, size=5), rng.uniform(0.5, 2.0, size=5)
    a = _with_covariance(rng, 64, mean_a, std_a)
    b = _with_covariance(rng, 32, mean_b, std_b)
    expected = np.sum((mean_a - mean_b) ** 2) + np.sum((std_a - std_b) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_matches_eigenvalues_of_the_covariance_product():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(60, 4)) @ rng.normal(size=(4, 4))
    b = rng.normal(size=(45, 4)) @ rng.normal(size=(4, 4)) + 0.3
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    cross = np.sqrt(np.linalg.eigvals(cov_a @ cov_b).real.clip(min=0)).sum()  # Tr((Σa Σb)^½), non-symmetric route
    expected = np.sum((a.mean(0) - b.mean(0)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * cross
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(a, b) == pytest.approx(frechet_distance(b, a), rel=1e-10)


def test_frechet_distance_handles_rank_deficient_covariances():
    rng = np.random.default_rng(4)
    feats = rng.normal(size=(5, 24))  # 5 samples in 24 dimensions: rank 4 covariance
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-8)
    assert np.isfinite(frechet_distance(feats, rng.normal(size=(7, 24))))


@pytest.mark.parametrize(
    "a,b,match",
    [
        (np.zeros((1, 4)), np.zeros((5, 4)), "at least 2"),
        (np.zeros((5, 4)), np.zeros((5, 3)), "same D"),
        (np.zeros(5), np.zeros(5), "same D"),
        (np.full((3, 2), np.nan), np.zeros((3, 2)), "nan"),
    ],
)
def test_frechet_distance_rejects_bad_input(a, b, match):
    with pytest.raises(ValueError, match=match):
        frechet_distance(a, b)


def test_fidelity_maps_fvd_to_unit_interval():
    assert fidelity(0.0) == 1.0
    assert fidelity(FVD_SCALE) == pytest.approx(math.exp(-1))
    assert fidelity(1.0) > fidelity(10.0) > fidelity(1e6) >= 0.0
    assert fidelity(float("inf")) == 0.0
    with pytest.raises(ValueError):
        fidelity(1.0, scale=0.0)
    with pytest.raises(ValueError):
        fidelity(float("nan"))


# ------------------------------------------------------------------------------------------------ classifier


@pytest.mark.parametrize("num_frames", [9, 41, 81])
def test_features_of_any_length_and_input_form(num_frames):
    model = WorldClassifier().eval()
    videos, _ = render_batch("val", 0, range(3), num_frames)
    feats = features(model, videos.numpy())
    assert feats.shape == (3, ClassifierConfig().feature_dim) and feats.dtype == np.float64
    assert np.isfinite(feats).all()
    as_list = features(model, list(videos.numpy()), batch_size=2)
    as_float = features(model, [v.permute(0, 3, 1, 2).float() / 127.5 - 1 for v in videos])  # (T, C, H, W)
    np.testing.assert_allclose(as_list, feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(as_float, feats, rtol=1e-5, atol=1e-6)


def test_classifier_refuses_videos_it_was_not_made_for():
    model = WorldClassifier().eval()
    with pytest.raises(ValueError, match="at least 9 frames"):
        features(model, np.zeros((2, 8, 64, 64, 3), np.uint8))
    with pytest.raises(ValueError, match="64, 64, 3"):
        features(model, np.zeros((2, 20, 32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="share a shape"):
        features(model, [np.zeros((20, 64, 64, 3), np.uint8), np.zeros((21, 64, 64, 3), np.uint8)])


def test_features_see_motion():
    """Untrained, features already tell a video from its time-reversed or frozen copy (motion reaches them)."""
    model = WorldClassifier().eval()
    videos, _ = render_batch("val", 0, range(2))
    feats = features(model, torch.cat([videos, videos.flip(1), videos[:, :1].expand_as(videos)]).numpy())
    assert np.abs(feats[:2] - feats[2:4]).max() > 1e-3
    assert np.abs(feats[:2] - feats[4:]).max() > 1e-3


def test_whitening_features_keeps_the_logits():
    model = WorldClassifier().eval()
    torch.nn.init.normal_(model.heads.weight)
    dim = model.cfg.feature_dim
    mixing, offset = torch.randn(40, dim, dtype=torch.float64), torch.randn(dim, dtype=torch.float64)
    model.raw_features = lambda inputs, phase=0: (inputs @ mixing + offset).float()  # well-conditioned stand-in
    inputs = torch.randn(200, 40, dtype=torch.float64) * torch.linspace(0.2, 3, 40, dtype=torch.float64)
    with torch.no_grad():
        before = model.logits(model(inputs))
        _whiten_features(model, inputs[:100])  # from the identity ...
        _whiten_features(model, inputs[100:])  # ... and from a whitened state
        after = model.logits(model(inputs))
        feats = model(inputs[100:]).double()
    for head in before:
        torch.testing.assert_close(after[head], before[head], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(feats.mean(0), torch.zeros(dim, dtype=torch.float64), rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.cov(feats.T), torch.eye(dim, dtype=torch.float64), rtol=0, atol=1e-4)


def test_save_load_round_trip(tmp_path, trained):
    model, metrics = trained
    path = save_classifier(model, tmp_path / "classifier.safetensors", metrics)
    loaded = load_classifier(path)
    assert not loaded.training and loaded.cfg == model.cfg and loaded.metrics == metrics
    videos, _ = render_batch("val", 0, range(4))
    np.testing.assert_array_equal(features(loaded, videos.numpy()), features(model, videos.numpy()))


def test_load_rejects_missing_and_foreign_files(tmp_path):
    from safetensors.torch import save_file

    with pytest.raises(ValueError, match="no world classifier"):
        load_classifier(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a world classifier"):
        load_classifier(junk)
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2)}, str(other), metadata={"format": "something else"})
    with pytest.raises(ValueError, match="not a world classifier"):
        load_classifier(other)


# ------------------------------------------------------------------------------------------------ training, FVD


def test_short_training_lowers_the_loss_and_reports_every_head(trained):
    model, metrics = trained
    assert metrics["loss_last"] < metrics["loss_first"]
    for head in ("colours", "shapes", "directions", "background", "num_objects"):
        assert 0.0 <= metrics[f"val_{head}"] <= 1.0
    assert metrics["val_background"] >= 0.5  # the easiest head is learnt within 30 steps
    videos, _ = render_batch("val", 0, range(4))
    assert np.isfinite(features(model, videos.numpy())).all()


def test_training_needs_more_val_videos_than_features():
    with pytest.raises(ValueError, match="num_val"):
        train_classifier(num_steps=1, batch_size=4, num_val=ClassifierConfig().feature_dim, progress=False)


def test_training_is_deterministic_given_the_seed():
    first, _ = train_classifier(num_steps=2, batch_size=4, seed=3, progress=False, num_val=32)
    again, _ = train_classifier(num_steps=2, batch_size=4, seed=3, progress=False, num_val=32)
    other, _ = train_classifier(num_steps=2, batch_size=4, seed=4, progress=False, num_val=32)
    for name, tensor in first.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], tensor, rtol=0, atol=0)
    assert not torch.equal(other.project.weight, first.project.weight)


def test_real_videos_are_closer_to_real_than_broken_ones(trained, val_videos):
    model, _ = trained
    reference, real = val_videos
    broken = broken_videos(real)
    real_fvd = world_fvd(model, real, reference)
    for kind in ("frozen", "noise"):
        assert world_fvd(model, broken[kind], reference) > real_fvd, kind
    assert world_fvd(model, broken["noise"], reference) > 2 * real_fvd


def test_broken_videos_are_what_they_say():
    videos, _ = render_batch("val", 0, range(2), 21)
    broken = broken_videos(videos.numpy())
    assert (broken["frozen"] == videos[:, :1].numpy()).all()
    assert sorted(map(bytes, broken["shuffled"][0])) == sorted(map(bytes, videos[0].numpy()))
    assert not np.array_equal(broken["shuffled"], videos.numpy())
    assert broken["noise"].shape == videos.shape and broken["noise"].std() > 60


def test_cli_help_and_train(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0 and "train" in capsys.readouterr().out
    out = tmp_path / "classifier.safetensors"
    main(["train", "--out", str(out), "--steps", "2", "--batch-size", "4", "--num-val", "32", "--no-progress"])
    assert "val_colours" in capsys.readouterr().out
    videos, _ = render_batch("val", 0, range(3), 21)
    np.savez(tmp_path / "videos.npz", videos=videos.numpy())
    main(["score", "--classifier", str(out), "--videos-npz", str(tmp_path / "videos.npz")])
    assert "fidelity" in capsys.readouterr().out
