"""The world recipes on the shared runner: in-memory data order, teacher/VAE/ODE tasks, `make assets` shortened."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from launch import REPO, job_env, read_metrics, run_and_kill, run_train
from sf.data.bank import SampleBank
from sf.data.latents import decode_latent_sample
from sf.data.shards import ShardWriter

LATENT = (3, 4, 4, 4)  # (F, C, h, w): the debug flavor's 4 channels


def write_latent_shards(out, count: int, corrupt: int = 0, seed: int = 0) -> str:
    gen = torch.Generator().manual_seed(seed)
    with ShardWriter(str(out), "latents", samples_per_shard=4, progress=False) as writer:
        for i in range(count):
            writer.write({"__key__": f"{i:04d}", "txt": f"a red circle moves left {i}",
                          "latent.safetensors": {"latents": torch.randn(LATENT, generator=gen)}})
        for i in range(corrupt):
            writer.write({"__key__": f"bad{i}", "txt": "broken", "latent.safetensors": b"not safetensors"})
    return str(out)


def test_bank_order_is_a_function_of_the_step(tmp_path):
    bank = SampleBank(write_latent_shards(tmp_path / "l", 10, corrupt=2), decode_latent_sample)
    assert len(bank) == 10 and bank.num_skipped == 2

    def keys(**kw):
        return [s["key"] for s in bank.batch(0, **kw)]

    # two ranks never read the same sample of a step, and together read the whole epoch over 5 steps
    seen = [k for step in range(5) for rank in range(2)
            for k in keys(step=step, micro=0, accum=1, rank=rank, world_size=2, batch_size=1)]
    assert sorted(seen) == sorted(s["key"] for s in bank.samples)
    # accumulation 2 x 1 reads what a micro-batch of 2 reads; the order is reproducible and changes per epoch
    two = keys(step=3, micro=0, accum=1, rank=0, world_size=1, batch_size=2)
    assert two == keys(step=3, micro=0, accum=2, rank=0, world_size=1, batch_size=1) + \
        keys(step=3, micro=1, accum=2, rank=0, world_size=1, batch_size=1)
    assert two == keys(step=3, micro=0, accum=1, rank=0, world_size=1, batch_size=2)
    epoch0 = [keys(step=s, micro=0, accum=1, rank=0, world_size=1, batch_size=1)[0] for s in range(10)]
    epoch1 = [keys(step=s, micro=0, accum=1, rank=0, world_size=1, batch_size=1)[0] for s in range(10, 20)]
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


def test_bank_with_nothing_usable_names_the_shards(tmp_path):
    spec = write_latent_shards(tmp_path / "l", 0, corrupt=2)
    with pytest.raises(ValueError, match="no usable samples.*2 corrupt"):
        SampleBank(spec, decode_latent_sample)


TEACHER_RUN = ["task=teacher", "+model.overrides.text_dim=64", "data.batch_size=1", "trainer.max_steps=4",
               "trainer.checkpoint_every=2", "task.optim.teacher.lr=1e-3", "task.ema.decay=0.9",
               "task.caption_dropout=0.5"]


@pytest.mark.slow
def test_teacher_task_two_ranks_killed_and_resumed_matches_uninterrupted(tmp_path):
    shards = write_latent_shards(tmp_path / "latents", 8)
    overrides = [*TEACHER_RUN, f"data.shards={shards}"]
    run_train(tmp_path / "a", overrides)
    run_and_kill(tmp_path / "b", overrides, kill_after_step=2)
    assert max(r["step"] for r in read_metrics(tmp_path / "b")) < 4
    run_train(tmp_path / "b", overrides)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    assert [r["loss/flow"] for r in a] == [r["loss/flow"] for r in b]
    assert all(r["loss/flow"] > 0 for r in a)
    exports = sorted(p.name for p in (tmp_path / "a" / "checkpoints" / "step_000004" / "export").iterdir())
    assert exports == ["teacher.safetensors", "teacher_ema.safetensors"]
    fingerprints = json.loads((tmp_path / "a" / "fingerprints_rank0.json").read_text())
    assert fingerprints["start"]["teacher"] != fingerprints["end"]["teacher"]  # it trained


@pytest.mark.slow
def test_teacherless_tasks_do_not_ask_for_a_teacher_but_distill_does(tmp_path):
    result = subprocess.run([sys.executable, "-m", "sf.train", "task=distill", "data.shards=x.txt",
                             f"hydra.run.dir={tmp_path}"], cwd=REPO, env=job_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "teacher.checkpoint" in result.stderr
    result = subprocess.run([sys.executable, "-m", "sf.train", "task=teacher", f"data.shards={tmp_path}/none",
                             f"hydra.run.dir={tmp_path}"], cwd=REPO, env=job_env(), capture_output=True, text=True)
    assert result.returncode == 1 and "matches no shard" in result.stderr.strip().splitlines()[-1]


def test_vae_curriculum_cuts_many_short_windows_first_then_long_ones():
    """world_vae's curriculum: single frames, then short windows, then `crop_frames`; each a pure function of
    (seed, position, step), so a resumed run cuts the same crops."""
    from types import SimpleNamespace

    from sf.world.scenes import make_scene, render
    from sf.tasks.vae import VaeJob

    vae = SimpleNamespace(curriculum=[[3, 1, 4], [2, 5, 2]], crop_frames=17, crop_size=48)
    job = SimpleNamespace(cfg=SimpleNamespace(seed=0), task=vae)
    job.stage = lambda step: VaeJob.stage(job, step)
    assert [job.stage(step) for step in range(7)] == [(1, 4)] * 3 + [(5, 2)] * 2 + [(17, 1)] * 2
    frames = render(make_scene(0, "train", 0))
    shapes = [tuple(VaeJob.crop(job, frames, 7, step).shape) for step in (0, 3, 5)]
    assert shapes == [(4, 1, 3, 48, 48), (2, 5, 3, 48, 48), (1, 17, 3, 48, 48)]
    assert torch.equal(VaeJob.crop(job, frames, 7, 0), VaeJob.crop(job, frames, 7, 0))
    assert not torch.equal(VaeJob.crop(job, frames, 7, 0), VaeJob.crop(job, frames, 8, 0))


@pytest.mark.slow
def test_make_assets_quick_builds_every_asset_from_scratch(quick_assets):
    """`make assets` shortened: every recipe runs, every asset loads, provenance is recorded."""
    out, target = quick_assets / "build", quick_assets / "world"
    from sf.world.fvd import load_classifier
    from sf.models.convert import load_dit
    from sf.models.vae import load_codec

    codec = load_codec(target / "vae.safetensors")
    assert codec.latent_shape(81, 64, 64) == (21, 16, 8, 8)
    assert not torch.equal(codec.latents_std, torch.ones(16))  # fitted on whole clips
    teacher, student = load_dit(target / "teacher.safetensors"), load_dit(target / "ode_init.safetensors")
    assert teacher.cfg == student.cfg and teacher.cfg.in_channels == 16
    assert any(not torch.equal(p, q) for p, q in zip(teacher.parameters(), student.parameters()))
    load_classifier(target / "classifier.safetensors")
    assert len((target / "train_prompts.txt").read_text().splitlines()) == 16
    for name in ("vae", "teacher", "ode_init"):
        record = json.loads((target / f"{name}.json").read_text())
        assert record["command"].startswith("sf-train experiment=world_")
        assert record["final_metrics"]["step"] == 2 and record["config_yaml"]
        assert record["bytes"] == (target / f"{name}.safetensors").stat().st_size
    assert (out / "runs" / "ode" / "data" / "ode" / "DONE").read_text().strip() == "4"
    # rerunning finds everything built and does nothing
    again = subprocess.run([sys.executable, "-m", "eval.assets", "--out", str(out), "--quick"], cwd=REPO,
                           env=job_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "sf.train" not in again.stdout
