"""The embedded world: determinism, captions, splits and held-out triples, bouncing physics, shards and CLI."""

import io
from collections import Counter
from contextlib import redirect_stdout

import numpy as np
import pytest

from sf.data import iter_samples, list_shards
from sf.data.bank import decode_pixel_sample
from sf.data.prompts import decode_prompt
from sf.world.scenes import (
    BACKGROUNDS,
    COLOURS,
    DIRECTIONS,
    HELDOUT,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    WorldSpec,
    allowed_triples,
    caption,
    contact_fraction,
    main,
    make_scene,
    min_visible_fraction,
    parse_caption,
    positions,
    render,
    sprite,
    world_sample,
    write_world_shards,
)


def _triples(scene):
    return {(obj.colour, obj.shape, obj.direction) for obj in scene.objects}


# ------------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_video_and_caption_different_seed_different():
    first, again = make_scene(0, "train", 7), make_scene(0, "train", 7)
    assert first == again and caption(first) == caption(again)
    assert render(first).tobytes() == render(again).tobytes()
    assert world_sample(0, "train", 7)["npy"] == world_sample(0, "train", 7)["npy"]
    others = [make_scene(1, "train", 7), make_scene(0, "train", 8), make_scene(0, "val", 7)]
    for other in others:
        assert other != first
        assert render(other).tobytes() != render(first).tobytes()


def test_render_is_crisp_and_exact():
    scene = Scene("grey", (SceneObject("red", "square", "small", (3, 5), (2, 0)),), 64)
    video = render(scene, num_frames=4)
    assert video.shape == (4, 64, 64, 3) and video.dtype == np.uint8
    colours = {tuple(c) for c in video.reshape(-1, 3)}
    assert colours == {BACKGROUNDS["grey"], COLOURS["red"]}  # no anti-aliasing
    red = (video == COLOURS["red"]).all(axis=-1)  # (T, H, W)
    assert red[0, 5:15, 3:13].all() and red[0].sum() == 100
    assert red[3, 5:15, 9:19].all() and red[3].sum() == 100  # moved 3 frames x 2 pixels right


@pytest.mark.parametrize("shape,low,high", [("square", 1.0, 1.0), ("circle", 0.75, 0.85), ("triangle", 0.5, 0.62)])
def test_sprites_fill_their_box_as_the_oracle_expects(shape, low, high):
    for extent in SIZES.values():
        mask = sprite(shape, extent)
        assert mask[0].any() and mask[-1].any() and mask[:, 0].any() and mask[:, -1].any()  # touches every side
        assert low <= mask.mean() <= high
    with pytest.raises(ValueError, match="shape"):
        sprite("hexagon", 10)


# ------------------------------------------------------------------------------------------------ captions


def test_caption_format_and_roundtrip():
    circle = SceneObject("red", "circle", "large", (20, 3), (-2, 0))
    scene = Scene("grey", (circle, SceneObject("blue", "square", "small", (0, 0), (0, 2))))
    text = caption(scene)
    assert text == "a large red circle moves left while a small blue square moves down on a grey background"
    assert parse_caption(text) == scene.claim()
    for index in range(50):
        scene = make_scene(0, "train", index)
        assert parse_caption(caption(scene)) == scene.claim()


@pytest.mark.parametrize(
    "text",
    [
        "a large purple circle moves left on a grey background",
        "a large red circle moves left on a pink background",
        "a large red circle moves sideways on a grey background",
        "a huge red circle moves left on a grey background",
        "a red circle moves left on a grey background",  # no size
        "a large red circle moves left",
        "",
    ],
)
def test_parse_caption_rejects_text_outside_the_vocabulary(text):
    with pytest.raises(ValueError):
        parse_caption(text)


# ------------------------------------------------------------------------------------------------ splits


def test_heldout_triples_never_in_train_or_val_and_only_in_heldout():
    assert len(HELDOUT) == len(COLOURS) and {c for c, _, _ in HELDOUT} == set(COLOURS)
    train = [make_scene(0, "train", i) for i in range(300)] + [make_scene(5, "val", i) for i in range(100)]
    heldout = [make_scene(0, "heldout", i) for i in range(100)]
    seen_train = set().union(*map(_triples, train))
    seen_heldout = set().union(*map(_triples, heldout))
    assert not seen_train & HELDOUT
    assert seen_heldout == set(HELDOUT)  # only held-out triples, and all of them
    # each colour, shape and direction alone is still trained on: the held-out part is the combination
    assert {t[0] for t in seen_train} == set(COLOURS)
    assert {t[1] for t in seen_train} == set(SHAPES)
    assert {t[2] for t in seen_train} == set(DIRECTIONS)
    assert len(allowed_triples("train")) == len(COLOURS) * len(SHAPES) * len(DIRECTIONS) - len(HELDOUT)
    with pytest.raises(ValueError, match="split"):
        make_scene(0, "test", 0)


def test_scene_distribution_covers_the_vocabulary():
    scenes = [make_scene(2, "train", i) for i in range(300)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2} and min(counts.values()) > 100  # object counts stay balanced after redraws
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {o.size for s in scenes for o in s.objects} == set(SIZES)
    for scene in scenes:
        assert len({o.colour for o in scene.objects}) == len(scene.objects)  # colours name objects uniquely
        assert min_visible_fraction(scene) >= WorldSpec().min_visible
        assert contact_fraction(scene) <= WorldSpec().max_contact


# ------------------------------------------------------------------------------------------------ physics


def test_bounce_by_hand():
    scene = Scene("black", (SceneObject("green", "square", "small", (50, 7), (2, 0)),), 64)  # walls at 0 and 54
    xs = positions(scene, 8)[0, :, 0]
    assert xs.tolist() == [50, 52, 54, 52, 50, 48, 46, 44]
    assert (positions(scene, 8)[0, :, 1] == 7).all()
    odd = Scene("black", (SceneObject("green", "square", "small", (7, 3), (0, -2)),), 64)  # wall mid-step: reflected
    assert positions(odd, 4)[0, :, 1].tolist() == [3, 1, 1, 3]


def test_bounces_keep_objects_inside_and_flip_velocity_only_at_walls():
    spec = WorldSpec(num_frames=160)
    flips = 0
    for index in range(60):
        scene = make_scene(0, "train", index, spec)
        tracks = positions(scene, spec.num_frames)  # (N, T, 2)
        for obj, track in zip(scene.objects, tracks):
            room = scene.size - obj.extent
            assert track.min() >= 0 and track.max() <= room
            axis = 0 if obj.velocity[0] else 1
            assert (track[:, 1 - axis] == obj.position[1 - axis]).all()  # never leaves its axis
            steps = np.diff(track[:, axis])  # (T-1,)
            # the caption's direction holds for the first min_run frames
            assert (np.sign(steps[: spec.min_run]) == np.sign(obj.velocity[axis])).all()
            at_wall = (track[:, axis] <= spec.speed) | (track[:, axis] >= room - spec.speed)  # (T,)
            free = ~(at_wall[:-1] | at_wall[1:])
            assert (np.abs(steps[free]) == spec.speed).all()
            signs = np.sign(steps)
            for t in np.flatnonzero(signs[1:] * signs[:-1] < 0):
                assert at_wall[t + 1]  # reversal happens at a wall
                flips += 1
        video = render(scene, spec.num_frames)
        if len(scene.objects) == 1:  # nothing hides it: its full area shows in every frame
            obj = scene.objects[0]
            shown = (video == COLOURS[obj.colour]).all(axis=-1).sum(axis=(1, 2))
            assert (shown == sprite(obj.shape, obj.extent).sum()).all()
    assert flips > 60  # bounces really happen


def test_world_spec_rejects_bad_values():
    with pytest.raises(ValueError):
        WorldSpec(max_objects=7)
    with pytest.raises(ValueError):
        WorldSpec(size=20)
    with pytest.raises(ValueError):
        WorldSpec(num_frames=0)


# ------------------------------------------------------------------------------------------------ shards and CLI


def test_shard_roundtrip_pixels_and_truth(tmp_path):
    paths = write_world_shards(str(tmp_path / "a"), "val", 5, 3, samples_per_shard=3, pixels="both", progress=False)
    assert len(paths) == 2
    samples = [decode_pixel_sample(s) for s in iter_samples(list_shards(str(tmp_path / "a")))]
    assert [s["key"] for s in samples] == [f"val-3-{i:07d}" for i in range(5)]
    for index, sample in enumerate(samples):
        scene = make_scene(3, "val", index)
        assert Scene.from_dict(sample["meta"]) == scene and sample["prompt"] == caption(scene)
        assert sample["meta"]["split"] == "val" and sample["meta"]["index"] == index
        assert sample["meta"]["num_frames"] == 81
        np.testing.assert_array_equal(sample["frames"], render(scene))
    mp4 = decode_pixel_sample({k: v for k, v in next(iter_samples(paths)).items() if k != "npy"})["frames"]
    assert mp4.shape == (81, 64, 64, 3) and np.abs(mp4.astype(int) - samples[0]["frames"]).mean() < 8  # lossy
    again = write_world_shards(str(tmp_path / "b"), "val", 5, seed=3, samples_per_shard=3, pixels="npy", progress=False)
    first = write_world_shards(str(tmp_path / "c"), "val", 5, seed=3, samples_per_shard=3, pixels="npy", progress=False)
    assert [open(p, "rb").read() for p in again] == [open(p, "rb").read() for p in first]  # byte-identical shards


def test_write_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="split"):
        write_world_shards(str(tmp_path), "test", 2, progress=False)
    with pytest.raises(ValueError, match="pixels"):
        write_world_shards(str(tmp_path), "train", 2, pixels="png", progress=False)
    with pytest.raises(ValueError, match="num_videos"):
        write_world_shards(str(tmp_path), "train", 0, progress=False)


def test_cli_prompts_only_shards_feed_the_prompt_stream(tmp_path):
    out = tmp_path / "prompts"
    with redirect_stdout(io.StringIO()):
        main(["--out", str(out), "--split", "heldout", "--num-videos", "6", "--seed", "0", "--prompts-only",
              "--no-progress"])
    samples = list(iter_samples(list_shards(str(out))))
    assert len(samples) == 6
    for index, sample in enumerate(samples):
        assert set(sample) == {"__key__", "__url__", "txt", "json"}
        assert decode_prompt(sample)["prompt"] == caption(make_scene(0, "heldout", index))


def test_cli_help_names_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--out", "--split", "--num-videos", "--seed", "--prompts-only", "--pixels"):
        assert option in text
