"""The pixel oracle, validated on the world's ground truth: real videos score 1, wrong captions, frozen or
shuffled time, flicker and noise score low, and blur/noise/mp4 degradations of real videos still score high."""

import dataclasses

import numpy as np
import pytest
import torch

from sf.world.oracle import (
    COMPONENTS,
    drift_vs_horizon,
    video_score,
    parse_caption,
    recover,
    score_video,
    score_videos,
    track,
)
from sf.video import decode_mp4, encode_mp4
from sf.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    Claim,
    WorldSpec,
    caption,
    make_scene,
    render,
)

NUM_VIDEOS = 30
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


@pytest.fixture(scope="module")
def world():
    """30 validation scenes, their videos, captions and recovered tracks."""
    scenes = [make_scene(0, "val", index) for index in range(NUM_VIDEOS)]
    videos = [render(scene) for scene in scenes]
    return scenes, videos, [caption(s) for s in scenes], [track(v) for v in videos]


def _mean(scores, name="video_score"):
    return float(np.mean([s[name] for s in scores]))


def _blur(video, sigma):
    """Separable Gaussian blur over H and W of a (T, H, W, 3) video; float32."""
    radius = int(np.ceil(2.5 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()
    out = video.astype(np.float32)
    for axis in (1, 2):
        padded = np.pad(out, [(radius, radius) if a == axis else (0, 0) for a in range(4)], mode="edge")
        out = sum(w * np.take(padded, np.arange(i, i + video.shape[axis]), axis=axis) for i, w in enumerate(kernel))
    return out


def _noisy(video, sigma, rng):
    return np.clip(video + rng.normal(0.0, sigma, video.shape), 0, 255).astype(np.uint8)


# ------------------------------------------------------------------------------------------------ ground truth


def test_real_videos_score_one_and_truth_is_recovered(world):
    scenes, _, captions, tracks = world
    scores = [score_video(t, c) for t, c in zip(tracks, captions)]
    for name in (*COMPONENTS, "video_score"):
        assert _mean(scores, name) >= 0.95, name
    assert min(s["video_score"] for s in scores) >= 0.9
    for scene, t in zip(scenes, tracks):
        recovered = recover(t)
        assert recovered.background == scene.background
        assert set(recovered.objects) == set(scene.claim().objects)


def test_shuffled_captions_score_low(world):
    _, _, captions, tracks = world
    shifted = captions[1:] + captions[:1]  # each video against another video's caption
    scores = [score_video(t, c) for t, c in zip(tracks, shifted)]
    assert _mean(scores) <= 0.5
    assert _mean(scores, "prompt_adherence") <= 0.5


@pytest.mark.parametrize("attribute", ["colour", "shape", "size", "direction", "background"])
def test_every_claimed_attribute_is_checked(world, attribute):
    scenes, _, _, tracks = world
    for scene, t in zip(scenes[:10], tracks[:10]):
        claim = scene.claim()
        first = claim.objects[0]
        if attribute == "background":
            wrong = dataclasses.replace(claim, background=next(b for b in BACKGROUNDS if b != claim.background))
        else:
            used = {obj.colour for obj in claim.objects}
            value = {
                "colour": next(c for c in COLOURS if c not in used),
                "shape": next(s for s in SHAPES if s != first.shape),
                "size": next(s for s in SIZES if s != first.size),
                "direction": OPPOSITE[first.direction],
            }[attribute]
            wrong = Claim(claim.background, (dataclasses.replace(first, **{attribute: value}), *claim.objects[1:]))
        assert score_video(t, wrong)["prompt_adherence"] <= 1 - 1 / (len(claim.objects) + 1) + 1e-9
        assert score_video(t, claim)["prompt_adherence"] == 1.0


def test_frozen_and_time_shuffled_videos_score_low_on_motion(world):
    _, videos, captions, _ = world
    rng = np.random.default_rng(0)
    frozen = [score_video(np.repeat(v[:1], len(v), axis=0), c) for v, c in zip(videos[:10], captions[:10])]
    shuffled = [score_video(v[rng.permutation(len(v))], c) for v, c in zip(videos[:10], captions[:10])]
    assert _mean(frozen, "motion_consistency") == 0.0 and _mean(frozen) == 0.0
    assert _mean(frozen, "temporal_stability") == 1.0  # nothing vanished: only the motion is wrong
    assert _mean(shuffled, "motion_consistency") <= 0.3
    assert _mean(shuffled) <= 0.5


def test_flicker_and_unclaimed_objects_cost_stability(world):
    scenes, videos, captions, tracks = world
    flicker = []
    for scene, video, text in list(zip(scenes, videos, captions))[:10]:
        blinking = video.copy()
        blinking[1::2] = BACKGROUNDS[scene.background]  # objects vanish every other frame
        flicker.append(score_video(blinking, text))
    assert _mean(flicker, "temporal_stability") <= 0.55
    assert _mean(flicker, "motion_consistency") <= 0.1
    pairs = [(s, t) for s, t in zip(scenes, tracks) if len(s.objects) == 2]
    for scene, t in pairs:  # a caption naming only one of the two objects
        partial = score_video(t, Claim(scene.background, scene.claim().objects[:1]))
        assert partial["prompt_adherence"] == 1.0 and partial["temporal_stability"] == pytest.approx(0.5)


def test_noise_and_junk_score_zero_without_crashing():
    rng = np.random.default_rng(0)
    text = caption(make_scene(0, "val", 0))
    noise = [score_video(rng.integers(0, 256, (81, 64, 64, 3), dtype=np.uint8), text) for _ in range(3)]
    for scores in noise:
        assert scores["video_score"] == 0.0
        assert max(scores[name] for name in COMPONENTS) <= 0.05
    junk = [
        np.zeros((81, 64, 64, 3), np.uint8),  # black frames
        np.full((81, 64, 64, 3), 255, np.uint8),  # white frames
        np.full((5, 3, 64, 64), np.nan, np.float32),  # nan float video
        np.zeros((0, 64, 64, 3), np.uint8),  # no frames
        np.zeros((1, 64, 64, 3), np.uint8),  # one frame
    ]
    for video in junk:
        scores = score_video(video, text)
        assert all(np.isfinite(list(scores.values())))
        assert scores["video_score"] == 0.0


def test_float_torch_videos_are_read_like_uint8(world):
    _, videos, captions, _ = world
    as_float = torch.from_numpy(videos[0]).permute(0, 3, 1, 2).float() / 127.5 - 1  # (T, C, H, W) in [-1, 1]
    assert score_video(as_float, captions[0])["video_score"] == pytest.approx(1.0)


# ------------------------------------------------------------------------------------------------ robustness


def test_scores_stay_high_under_noise_blur_and_mp4(world):
    _, videos, captions, _ = world
    rng = np.random.default_rng(0)
    count = 12
    noisy = [score_video(_noisy(v, 20, rng), c) for v, c in zip(videos[:count], captions[:count])]
    blurred = [score_video(_noisy(_blur(v, 1.0), 8, rng), c) for v, c in zip(videos[:count], captions[:count])]
    mp4 = [score_video(decode_mp4(encode_mp4(v)), c) for v, c in zip(videos[:4], captions[:4])]
    for name, scores in (("noise", noisy), ("blur", blurred), ("mp4", mp4)):
        assert _mean(scores) >= 0.9, name
        assert _mean(scores, "prompt_adherence") >= 0.9, name


# ------------------------------------------------------------------------------------------------ combining


def test_video_score_is_the_geometric_mean_of_the_components():
    def score(adherence, motion, stability):
        return video_score(dict(prompt_adherence=adherence, motion_consistency=motion, temporal_stability=stability))

    assert score(1.0, 1.0, 1.0) == 1.0
    assert score(0.5, 1.0, 0.25) == pytest.approx(0.5)
    assert score(1.0, 0.0, 1.0) == 0.0
    assert score(float("nan"), 1.0, 1.0) == 0.0


def test_score_videos_averages_and_checks_lengths(world):
    _, videos, captions, _ = world
    means = score_videos(videos[:3], captions[:3])
    assert means["num_videos"] == 3 and means["video_score"] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        score_videos(videos[:3], captions[:2])
    assert parse_caption(captions[0]).background in BACKGROUNDS
    assert set(DIRECTIONS) == set(OPPOSITE)


def test_drift_vs_horizon_tracks_where_a_long_rollout_breaks():
    spec = WorldSpec(num_frames=96)
    scenes = [make_scene(0, "val", index, spec) for index in range(4)]
    videos = [render(scene, spec.num_frames) for scene in scenes]
    captions = [caption(scene) for scene in scenes]
    steady = drift_vs_horizon(videos, captions, window=16)
    assert steady["start"].tolist() == [0, 16, 32, 48, 64, 80]
    assert (steady["video_score"] >= 0.95).all()
    broken = [video.copy() for video in videos]
    for scene, video in zip(scenes, broken):
        video[48:] = BACKGROUNDS[scene.background]  # everything vanishes half way
    for curve in (drift_vs_horizon(broken, captions), drift_vs_horizon(broken)):  # with captions, or vs its start
        assert (curve["video_score"][:3] >= 0.95).all() and (curve["video_score"][3:] == 0.0).all()
        assert (curve["temporal_stability"][3:] == 0.0).all()
    with pytest.raises(ValueError):
        drift_vs_horizon([videos[0], videos[1][:50]])
