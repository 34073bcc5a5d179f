"""ODE-pair generation: exact trajectories on an analytic flow, shards from a real teacher, the regression loss."""

import os

import pytest
import torch
from conftest import perturb_

from sf.data.bank import SampleBank
from sf.data.shards import ShardWriter, decode_tensors, iter_samples, list_shards
from sf.distill import RolloutConfig, ode_regression_loss
from sf.distill.ode_pairs import ODE, decode_ode_sample, write_ode_pairs
from sf.models import CausalConfig, VideoDiT, dit_config
from sf.models.text import TINY_CLIP, OpenCLIPTextEncoder

LATENT = (6, 4, 4, 4)  # (F, C, H, W): two chunks of 3 frames for the debug DiT
PROMPTS = ["a red ball bouncing", "two green cubes", "rain over a lake"]
STUDENT_T = RolloutConfig().timesteps()  # warped [1000, 750, 500, 250]


def _analytic_teacher(target):
    """Exact flow of data concentrated at `target` (F, C, H, W): v = (x_t - x*) / sigma, whatever the context."""

    def flow(x, t, context):
        sigma = (t / 1000)[:, :, None, None, None]  # (B, F, 1, 1, 1)
        return (x - target) / sigma

    return flow


def _null_text(prompts):
    """Stand-in encoder: features (B, 2, 8) and mask."""
    return torch.zeros(len(prompts), 2, 8), torch.ones(len(prompts), 2, dtype=torch.bool)


def _read_all(out_dir):
    """Decoded samples of every shard in a directory, in order."""
    return [decode_ode_sample(s) for s in iter_samples(list_shards(str(out_dir)))]


def _raw_ode(out_dir):
    """The raw ode.safetensors bytes of every sample, in order."""
    return [s[ODE] for s in iter_samples(list_shards(str(out_dir)))]


def test_analytic_teacher_trajectory_is_exact(tmp_path):
    target = torch.randn(LATENT)
    kwargs = {"latent_shape": LATENT, "student_timesteps": STUDENT_T, "num_steps": 12, "dtype": torch.float32,
              "progress": False, "seed": 3}
    write_ode_pairs(_analytic_teacher(target), _null_text, PROMPTS, str(tmp_path / "a"), batch_size=2, **kwargs)
    samples = _read_all(tmp_path / "a")

    expected_sigmas = STUDENT_T.double() / 1000
    assert [s["prompt"] for s in samples] == PROMPTS
    for index, sample in enumerate(samples):
        sigmas = sample["sigmas"]
        assert sigmas[0] == 1.0
        torch.testing.assert_close(sigmas, expected_sigmas.float(), rtol=0, atol=0)
        assert sample["meta"]["index"] == index and sample["meta"]["seed"] == 3
        assert sample["meta"]["sigmas"] == expected_sigmas.tolist()
        noise = sample["trajectory"][0]  # sigma = 1: the initial noise
        expected = (1 - sigmas)[:, None, None, None, None] * target + sigmas[:, None, None, None, None] * noise
        torch.testing.assert_close(sample["trajectory"], expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(sample["clean"], target, rtol=1e-5, atol=1e-5)
    assert not torch.equal(samples[0]["trajectory"][0], samples[1]["trajectory"][0])

    # a prompt's noise depends on its index and the seed only, not on the batching
    write_ode_pairs(_analytic_teacher(target), _null_text, PROMPTS, str(tmp_path / "b"), batch_size=1, **kwargs)
    assert _raw_ode(tmp_path / "a") == _raw_ode(tmp_path / "b")


def test_student_timesteps_are_validated(tmp_path):
    teacher = _analytic_teacher(torch.zeros(LATENT))
    for bad in ([750, 500], [1000, 500, 500], []):
        with pytest.raises(ValueError, match="student_timesteps"):
            write_ode_pairs(teacher, _null_text, PROMPTS, str(tmp_path), latent_shape=LATENT,
                            student_timesteps=bad, progress=False)


@pytest.fixture(scope="module")
def text_encoder():
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(TINY_CLIP, max_length=77)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(1)
    return perturb_(VideoDiT(dit_config("debug", text_dim=64))).eval()


def _write(teacher, text_encoder, out_dir, **overrides):
    kwargs = {"latent_shape": LATENT, "student_timesteps": STUDENT_T, "num_steps": 8, "batch_size": 2,
              "samples_per_shard": 2, "progress": False}
    return write_ode_pairs(teacher, text_encoder, PROMPTS, str(out_dir), **{**kwargs, **overrides})


def test_real_teacher_shards(tmp_path, teacher, text_encoder):
    paths = _write(teacher, text_encoder, tmp_path / "a")
    assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
    raw = _read_all(tmp_path / "a")
    assert raw[0]["trajectory"].dtype == torch.float32
    tensors = decode_tensors(next(iter_samples(paths))[ODE])
    assert tensors["trajectory"].dtype == torch.float16 and tensors["sigmas"].dtype == torch.float32
    assert tensors["trajectory"].shape == (len(STUDENT_T), *LATENT) and tensors["clean"].shape == LATENT
    assert [s["prompt"] for s in raw] == PROMPTS

    bank = SampleBank(str(tmp_path / "a"), decode_ode_sample)  # how task=ode reads them
    assert [s["prompt"] for s in bank.samples] == PROMPTS and bank.num_skipped == 0
    assert bank.samples[0]["trajectory"].shape == (len(STUDENT_T), *LATENT)
    assert bank.samples[0]["trajectory"].dtype == torch.float32
    assert bank.samples[0]["clean"].shape == LATENT and bank.samples[0]["sigmas"].shape == (len(STUDENT_T),)

    # same seed: byte-identical tensors; another seed or another guidance scale: different samples
    _write(teacher, text_encoder, tmp_path / "b")
    assert _raw_ode(tmp_path / "a") == _raw_ode(tmp_path / "b")
    _write(teacher, text_encoder, tmp_path / "c", seed=1)
    other_seed = _read_all(tmp_path / "c")
    assert not torch.equal(other_seed[0]["trajectory"][0], raw[0]["trajectory"][0])
    assert not torch.equal(other_seed[0]["clean"], raw[0]["clean"])
    _write(teacher, text_encoder, tmp_path / "d", cfg_scale=0.0)
    unguided = _read_all(tmp_path / "d")
    torch.testing.assert_close(unguided[0]["trajectory"][0], raw[0]["trajectory"][0], rtol=0, atol=0)  # same noise
    assert (unguided[0]["clean"] - raw[0]["clean"]).abs().max() > 1e-3


def test_corrupt_samples_are_counted_and_skipped(tmp_path, teacher, text_encoder):
    _write(teacher, text_encoder, tmp_path, samples_per_shard=8)
    with ShardWriter(str(tmp_path), "zz-bad", progress=False) as writer:
        writer.write({"__key__": "bad0", "txt": "garbage", ODE: b"not safetensors"})
        writer.write({"__key__": "bad1", "txt": "no trajectory"})
    bank = SampleBank(str(tmp_path), decode_ode_sample)
    assert [s["prompt"] for s in bank.samples] == PROMPTS
    assert bank.num_skipped == 2


def test_regression_loss_on_read_back_pairs(tmp_path, teacher, text_encoder):
    _write(teacher, text_encoder, tmp_path)
    samples = SampleBank(str(tmp_path), decode_ode_sample).samples[:2]
    torch.manual_seed(2)
    student = perturb_(VideoDiT(dit_config("debug", text_dim=64)))
    context, _ = text_encoder([s["prompt"] for s in samples])
    trajectory, clean = (torch.stack([s[k] for s in samples]) for k in ("trajectory", "clean"))
    loss = ode_regression_loss(student, trajectory, samples[0]["sigmas"], clean, context,
                               CausalConfig(frames_per_block=3), rng=torch.Generator().manual_seed(0))
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
