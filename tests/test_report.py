"""The demo report writes every file from fake results, skips what it is not given, and reads well in a terminal."""

import json

import imageio.v3 as iio
import numpy as np
import pytest

from sf.world.report import format_table, sample_grid, write_report
from sf.logging import LoggerConfig, RunLogger
from sf.video import LABEL_HEIGHT

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MODELS = ("teacher", "ode_init", "student")
NUM_PROMPTS, TILE = 2, 64
NUM_FRAMES = {"teacher": 9, "ode_init": 7, "student": 9}  # ode_init is shorter: padded with its last frame


def fake_report(passed=True):
    def result(score, nfe):
        components = {"prompt_adherence": score + 0.05, "motion_consistency": score, "temporal_stability": score - 0.05,
                      "fidelity": 0.5}
        return {"oracle_score": score, "components": components, "fvd": 123.4 / score, "nfe_per_frame": nfe,
                "seconds_per_frame": 0.0123 * nfe, "num_videos": 16}

    return {
        "teacher": result(0.812, 48.0),
        "ode_init": result(0.456, 2.0),
        "student": result(0.789, 2.0),
        "acceptance": {"student_vs_teacher": 0.972, "target": 0.9, "passed": passed, "nfe_reduction": 24.0,
                       "beats_ode_init": passed},
        "config": {"seed": 0},
        "timing": {"distill_s": 12.5},
    }


@pytest.fixture
def metrics_path(tmp_path):
    """A metrics.jsonl as the training loop writes it."""
    with RunLogger(LoggerConfig(progress=False), tmp_path / "run", config={}, total_steps=30) as logger:
        for step in range(1, 31):
            logger.log(step, {"loss/generator": 2.0 / step, "loss/critic": 1.0 + 0.1 * np.sin(step), "lr": 1e-4})
    return logger.metrics_path


def fake_samples():
    rng = np.random.default_rng(0)
    return {m: rng.integers(0, 256, (NUM_PROMPTS, NUM_FRAMES[m], TILE, TILE, 3), dtype=np.uint8) for m in MODELS}


def test_write_report_writes_every_file(tmp_path, metrics_path):
    report = fake_report()
    history = [{"step": s, "oracle_score": 0.3 + s / 1000, "prompt_adherence": 0.5, "fvd": 300.0 - s}
               for s in (0, 100, 200)]
    drift = {m: [{"horizon_frames": h, "video_score": 0.8 - h / 200, "prompt_adherence": 0.9} for h in (16, 32, 64)]
             for m in MODELS}
    captions = ["a red circle moves left on a white background", "two blue squares bounce up and down"]
    out = tmp_path / "report"
    json_path = write_report(out, report, history=history, drift=drift, samples=fake_samples(), captions=captions,
                             metrics_path=metrics_path, fps=8)

    assert json_path == out / "report.json"
    assert json.loads(json_path.read_text()) == report
    for name in ("losses", "metric_vs_step", "drift_vs_horizon"):
        assert (out / "plots" / f"{name}.png").read_bytes()[:8] == PNG_MAGIC
    for name in ("side_by_side.mp4", "side_by_side.gif"):
        assert (out / "samples" / name).stat().st_size > 0

    frames = iio.imread(out / "samples" / "side_by_side.mp4")
    height = LABEL_HEIGHT + NUM_PROMPTS * TILE + (NUM_PROMPTS - 1) * 2  # label strip, rows with 2-pixel gaps
    width = len(MODELS) * TILE + (len(MODELS) - 1) * 2
    assert frames.shape[:3] == (max(NUM_FRAMES.values()), height, width)
    assert iio.imread(out / "samples" / "side_by_side.gif").shape[1:3] == (height, width)

    md = (out / "report.md").read_text()
    for model in MODELS:
        assert f"`{model}`" in md
    for link in ("plots/losses.png", "plots/metric_vs_step.png", "plots/drift_vs_horizon.png",
                 "samples/side_by_side.mp4", "samples/side_by_side.gif"):
        assert f"({link})" in md
    assert "Acceptance: PASSED ✓" in md and "✓ student scores above ode_init" in md
    assert all(caption in md for caption in captions)
    assert "0.812" in md and "geometric mean" in md


def test_missing_inputs_are_skipped(tmp_path):
    report = {"student": fake_report()["student"], "oracle_definition": "score = magic"}
    write_report(tmp_path, report)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "report.md"]
    md = (tmp_path / "report.md").read_text()
    assert "score = magic" in md and "`student`" in md and "teacher" not in md.split("## Results")[1]
    assert "## Plots" not in md and "## Samples" not in md and "## Acceptance" not in md

    write_report(tmp_path / "empty", {}, history=[], drift={}, samples={})
    assert (tmp_path / "empty" / "report.md").exists() and not (tmp_path / "empty" / "plots").exists()


def test_failed_acceptance_is_marked(tmp_path):
    write_report(tmp_path, fake_report(passed=False))
    md = (tmp_path / "report.md").read_text()
    assert "Acceptance: FAILED ✗" in md and "✗ student scores above ode_init" in md


def test_sample_grid_holds_last_frame_and_checks_prompts(tmp_path):
    samples = fake_samples()
    frames = sample_grid(samples)
    x = TILE + 2  # ode_init's column, first row
    np.testing.assert_array_equal(frames[-1, LABEL_HEIGHT:LABEL_HEIGHT + TILE, x:x + TILE], samples["ode_init"][0, -1])
    with pytest.raises(ValueError, match="same, non-zero number of prompts"):
        sample_grid({**samples, "student": samples["student"][:1]})
    with pytest.raises(ValueError, match="captions"):
        write_report(tmp_path, fake_report(), samples=samples, captions=["only one"])
    assert list(tmp_path.iterdir()) == []


def test_format_table():
    table = format_table(fake_report())
    lines = table.splitlines()
    assert lines[0].split() == ["model", "oracle", "adherence", "motion", "stability", "fidelity", "FVD", "NFE/frame",
                                "s/frame"]
    for model, score in (("teacher", "0.812"), ("ode_init", "0.456"), ("student", "0.789")):
        row = next(line for line in lines if line.startswith(model))
        assert score in row
    assert len({len(line) for line in lines[:5]}) == 1  # fixed width
    assert lines[-1].startswith("acceptance: PASSED")
    assert "acceptance" not in format_table({"student": fake_report()["student"]})
