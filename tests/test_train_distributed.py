"""2-process DeepSpeed training over gloo: smoke runs under ZeRO-2/3, SIGKILL + resume exactness, accumulation."""

import json
import math
import shutil

import pytest
import torch

from launch import read_metrics, run_and_kill, run_train
from safetensors.torch import load_file

from sf.checkpoint import list_checkpoints
from sf.cli import export_main
from sf.config import NetConfig
from sf.models.convert import load_dit
from sf.tasks.base import build_net

pytestmark = pytest.mark.slow

SMOKE = ["experiment=smoke"]


def fingerprints(run_dir, rank):
    return json.loads((run_dir / f"fingerprints_rank{rank}.json").read_text())


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_smoke(tmp_path, stage):
    run_dir = tmp_path / f"zero{stage}"
    # sample videos every 2 steps: generation is collective under ZeRO-3, so every rank must take part
    run_train(run_dir, SMOKE + [f"deepspeed=zero{stage}", "trainer.max_steps=4", "logger.video_every=2"])
    assert sorted(p.name for p in (run_dir / "samples").glob("*.mp4")) == ["sample_000002.mp4", "sample_000004.mp4"]
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert math.isfinite(r["loss/critic"])
        assert r["rollout/exit_steps_agree"] == 1.0
    generator_rows = [r for r in rows if "loss/generator" in r]
    assert len(generator_rows) == 2 and all(math.isfinite(r["loss/generator"]) for r in generator_rows)

    f0, f1 = fingerprints(run_dir, 0), fingerprints(run_dir, 1)
    assert f0["end"] == f1["end"]  # gathered weights identical on both ranks
    assert f0["start"]["teacher"] == f0["end"]["teacher"]  # teacher frozen
    assert f0["start"]["generator"] != f0["end"]["generator"]
    assert f0["start"]["critic"] != f0["end"]["critic"]

    # the final checkpoint exports load without DeepSpeed
    final = list_checkpoints(run_dir)[-1]
    assert final.name == "step_000004"
    for name in ("generator", "generator_ema", "critic"):
        model = load_dit(final / "export" / f"{name}.safetensors")
        assert model.cfg.text_dim == 64

    # sf-export rebuilds the same weights from the sharded DeepSpeed states and EMA shards alone
    bare = tmp_path / "bare"
    shutil.copytree(final, bare)
    shutil.rmtree(bare / "export")
    export_main([str(bare), "--out", str(tmp_path / "rebuilt")])
    for name in ("generator", "generator_ema", "critic"):
        expected = load_file(str(final / "export" / f"{name}.safetensors"))
        rebuilt = load_file(str(tmp_path / "rebuilt" / f"{name}.safetensors"))
        assert expected.keys() == rebuilt.keys()
        assert all(torch.equal(expected[k], rebuilt[k]) for k in expected), name
    export_main([str(run_dir), "--format", "diffusers", "--out", str(tmp_path / "diffusers")])
    assert (tmp_path / "diffusers" / "generator" / "config.json").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_sigkill_then_rerun_reproduces_uninterrupted_losses(tmp_path, stage):
    overrides = SMOKE + [f"deepspeed=zero{stage}", "trainer.max_steps=6", "trainer.checkpoint_every=2"]
    reference = tmp_path / "reference"
    run_train(reference, overrides)
    expected = {r["step"]: r for r in read_metrics(reference)}

    resumed = tmp_path / "resumed"
    run_and_kill(resumed, overrides, kill_after_step=3)
    last = list_checkpoints(resumed)[-1]
    assert last.name in ("step_000002", "step_000004")
    resume_step = int(last.name.split("_")[1])
    out = run_train(resumed, overrides)  # the same command: resumes from the last complete checkpoint
    # deterministic seeding would reproduce the losses from scratch too: prove the run really resumed
    assert f"resumed from {last} at step {resume_step}" in out.stdout
    got = read_metrics(resumed)
    assert [r["step"] for r in got] == [1, 2, 3, 4, 5, 6]  # no duplicated or missing steps
    for r in got:
        for key in ("loss/critic", "loss/generator", "grad_norm/critic"):
            if key in r:
                assert r[key] == expected[r["step"]][key], (key, r["step"])


def test_gradient_accumulation_matches_larger_micro_batch(tmp_path):
    """Two micro-batches of one sample make the update one micro-batch of two makes: the same gradient, the mean
    over both samples.

    AdamW's first update is lr * g / (|g| + eps), i.e. lr * sign(g) for |g| >> eps: a near-zero gradient element
    whose last bits differ between the two float summation orders flips sign and moves a whole lr either way, so
    weights after AdamW cannot show it. With eps >> |g| the same optimizer takes lr / eps * g, a plain gradient
    step, and the weights compare the accumulated gradients themselves. lr = eps makes the step the gradient
    itself (largest element ~1e-2), far above the fp32 rounding of the weights it is added to (~1e-7).
    """
    sgd = [f"task.optim.{role}.{key}" for role in ("generator", "critic") for key in ("eps=1e6", "weight_decay=0")]
    common = SMOKE + ["trainer.max_steps=1", "trainer.checkpoint_every=100", "task.ema.decay=0",
                      "task.optim.generator.lr=1e6", *sgd]
    runs = {"big": ["data.batch_size=2", "trainer.grad_accum_steps=1"],
            "accumulated": ["data.batch_size=1", "trainer.grad_accum_steps=2"],
            "half": ["data.batch_size=1", "trainer.grad_accum_steps=1"]}  # one sample only: must differ
    for name, overrides in runs.items():
        run_train(tmp_path / name, common + overrides, nproc=1)
    start = build_net(NetConfig(flavor="debug", checkpoint="random", overrides={"text_dim": 64}), seed=0).state_dict()
    delta = {}
    for name in runs:
        weights = load_dit(tmp_path / name / "checkpoints" / "step_000001" / "export" / "generator.safetensors")
        delta[name] = {k: v - start[k] for k, v in weights.state_dict().items()}
    scale = max(float(d.abs().max()) for d in delta["big"].values())  # the largest update element
    assert scale > 0
    # the per-element sums differ only in order: fp32 rounding, ~1e-6 of the largest element here (bound: 1e-3)
    for key, expected in delta["big"].items():
        torch.testing.assert_close(delta["accumulated"][key], expected, rtol=0, atol=1e-3 * scale, msg=key)
    assert max(float((delta["half"][k] - d).abs().max()) for k, d in delta["big"].items()) > 1e-2 * scale
    rows = {name: read_metrics(tmp_path / name)[0] for name in runs}
    for key in ("grad_norm/generator", "loss/critic", "loss/generator"):  # norms and means of the same sums
        assert rows["accumulated"][key] == pytest.approx(rows["big"][key], rel=1e-5), key
    assert rows["half"]["grad_norm/generator"] != pytest.approx(rows["big"]["grad_norm/generator"], rel=1e-3)


def test_ema_starts_at_the_first_generator_step_at_or_after_its_start_and_resumes(tmp_path):
    """smoke: the generator updates at steps 0, 2, 4 (every 2), the EMA starts at step 1 -> its copy is at step 2.
    After step 4 (iterations 0-3) nothing has updated the generator since, so its EMA equals it exactly; a run
    resumed after the copy continues the same average (the start is part of the checkpoint)."""
    run_train(tmp_path / "a", SMOKE + ["trainer.max_steps=4"], nproc=1)
    export = tmp_path / "a" / "checkpoints" / "step_000004" / "export"
    ema, generator = load_file(str(export / "generator_ema.safetensors")), load_file(str(export / "generator.safetensors"))
    assert all(torch.equal(ema[k], generator[k]) for k in generator)

    overrides = SMOKE + ["trainer.max_steps=6", "trainer.checkpoint_every=4", "task.ema.decay=0.5"]
    run_train(tmp_path / "straight", overrides, nproc=1)
    run_train(tmp_path / "resumed", SMOKE + ["trainer.max_steps=4", "trainer.checkpoint_every=4",
                                            "task.ema.decay=0.5"], nproc=1)
    out = run_train(tmp_path / "resumed", overrides, nproc=1)
    assert "resumed from" in out.stdout
    final = "checkpoints/step_000006/export/generator_ema.safetensors"
    straight, resumed = load_file(str(tmp_path / "straight" / final)), load_file(str(tmp_path / "resumed" / final))
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    generator = load_file(str(tmp_path / "straight" / "checkpoints/step_000006/export/generator.safetensors"))
    assert any(not torch.equal(straight[k], generator[k]) for k in generator)  # an average now, not a copy
