"""Teacher forcing and diffusion forcing are configs of the distill job: they read the real videos' latents,
train on them through the same loop, resume exactly, and refuse latents of the wrong shape in one line."""

import pytest
import torch

from launch import error_lines, read_metrics, run_and_kill, run_job, run_train
from sf.data.shards import ShardWriter

pytestmark = pytest.mark.slow

SMOKE_LATENT = (6, 4, 4, 4)  # experiment=smoke: 6 latent frames of the debug flavor's 4 channels, 4 x 4


def write_latents(out, count: int = 4, seed: int = 0, shape=SMOKE_LATENT) -> str:
    gen = torch.Generator().manual_seed(seed)
    with ShardWriter(str(out), "latents", samples_per_shard=2, progress=False) as writer:
        for i in range(count):
            writer.write({"__key__": f"{i:04d}", "txt": f"a red circle moves left {i}",
                          "latent.safetensors": {"latents": torch.randn(shape, generator=gen)}})
    return str(out)


def test_teacher_forcing_trains_on_the_real_latents(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("a_again", 0), ("b", 1)):  # b: the same captions, other latents
        shards = write_latents(tmp_path / f"latents_{name}", seed=seed)
        run_train(tmp_path / name, ["experiment=smoke", "task.context=teacher_forcing", f"data.shards={shards}",
                                    "trainer.max_steps=3"], nproc=1)
        runs[name] = [r["loss/critic"] for r in read_metrics(tmp_path / name)]
    assert runs["a"] == runs["a_again"]  # deterministic
    assert all(x != y for x, y in zip(runs["a"], runs["b"]))  # the cache held the data's latents


def test_diffusion_forcing_two_ranks_killed_and_resumed_matches_uninterrupted(tmp_path):
    shards = write_latents(tmp_path / "latents", count=8)
    overrides = ["experiment=smoke", "task.context=diffusion_forcing", f"data.shards={shards}",
                 "trainer.max_steps=4", "trainer.checkpoint_every=2"]
    run_train(tmp_path / "a", overrides)
    run_and_kill(tmp_path / "b", overrides, kill_after_step=2)
    run_train(tmp_path / "b", overrides)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for key in ("loss/critic", "grad_norm/critic"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert [r["loss/generator"] for r in a if "loss/generator" in r] == \
        [r["loss/generator"] for r in b if "loss/generator" in r]


def test_latents_of_the_wrong_shape_are_one_line(tmp_path):
    shards = write_latents(tmp_path / "latents", shape=(3, 4, 4, 4))
    result = run_job(tmp_path / "run", ["experiment=smoke", "task.context=teacher_forcing", f"data.shards={shards}"])
    errors = error_lines(result)
    assert result.returncode != 0 and len(errors) == 1, result.stderr[-2000:]
    assert "are (3, 4, 4, 4)" in errors[0] and "needs (6, 4, 4, 4)" in errors[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_the_world_baseline_recipes_train_on_world_latents(tmp_path):
    from eval.assets import world_latents

    latents = world_latents(tmp_path / "world", num_videos=4)  # rendered and encoded by the shipped VAE
    for experiment in ("world_tf", "world_df"):
        run_dir = tmp_path / experiment
        run_train(run_dir, [f"experiment={experiment}", f"data.shards={latents}", "trainer.max_steps=2",
                            "trainer.checkpoint_every=2", "task.health.every=2", "task.health.num_prompts=1"],
                  nproc=1, timeout=600)
        rows = read_metrics(run_dir)
        assert [r["step"] for r in rows] == [1, 2] and "loss/generator" in rows[0]
        assert 0 <= rows[1]["health/video_score"] <= 1
