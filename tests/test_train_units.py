"""Small pieces of the trainer: NaN guard, LR warm-up, per-sample randomness, preview videos."""

import pytest
import torch

from sf.rng import SampleNoise, seed_for
from sf.tasks.base import check_finite, copy_weights
from sf.train import scheduled_lr
from sf.models import VideoDiT, dit_config
from sf.models.convert import CheckpointError
from sf.video import latent_preview


def test_non_finite_loss_stops_with_one_line_naming_the_step():
    check_finite(torch.tensor(1.0), "critic", 3)
    with pytest.raises(FloatingPointError, match="non-finite generator loss at step 8 ") as err:  # from 1, as logged
        check_finite(torch.tensor(float("nan")), "generator", 7, "generator")
    assert "\n" not in str(err.value) and "generator not updated; nothing of this step" in str(err.value)
    with pytest.raises(FloatingPointError, match="critic not updated; generator already updated in this step"):
        check_finite(torch.tensor(float("inf")), "critic", 7, "critic", ["generator"])


def test_linear_warmup_is_stateless():
    assert [scheduled_lr(1e-3, s, 4) for s in range(6)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert scheduled_lr(1e-3, 0, 0) == 1e-3


def test_cooldown_decays_linearly_over_the_last_steps():
    lrs = [scheduled_lr(1e-3, s, 2, cooldown_steps=4, max_steps=10) for s in range(10)]
    assert lrs == pytest.approx([5e-4, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4])
    # a run planned longer is identical until its own cool-down starts (extending a run before it is exact)
    longer = [scheduled_lr(1e-3, s, 2, cooldown_steps=4, max_steps=20) for s in range(16)]
    assert longer[:6] == lrs[:6] and longer[15] == pytest.approx(1e-3)


def test_sample_noise_does_not_depend_on_batching():
    seeds = [seed_for(0, "generator", 5, 0, i) for i in range(4)]
    together = SampleNoise(seeds)
    apart = [SampleNoise(seeds[:2]), SampleNoise(seeds[2:])]
    assert torch.equal(together.randn((3, 2)), torch.cat([n.randn((3, 2)) for n in apart]))
    assert torch.equal(together.rand(), torch.cat([n.rand() for n in apart]))
    assert seed_for(0, "a", 1) != seed_for(0, "a", 2) and seed_for(0, "a", 1) == seed_for(0, "a", 1)


def test_student_must_match_teacher_architecture():
    with pytest.raises(CheckpointError, match="shape mismatch"):
        copy_weights(VideoDiT(dit_config("debug", ffn_dim=64)), VideoDiT(dit_config("debug")), "the generator")


def test_latent_preview_is_viewable():
    video = latent_preview(torch.randn(6, 4, 4, 4))
    assert video.shape == (6, 3, 64, 64) and video.min() >= -1 and video.max() <= 1


def test_dmd_timestep_default_draw_and_exit_interval():
    from sf.diffusion.flow import dmd_timestep, shift_sigma

    seeds = [seed_for(0, "critic", 3, 0, i) for i in range(64)]
    usual = dmd_timestep(SampleNoise(seeds).rand(), 5.0, 0.02, 0.98)
    expected = torch.cat([dmd_timestep(torch.rand(1, generator=torch.Generator().manual_seed(s)), 5.0, 0.02, 0.98)
                          for s in seeds])
    assert torch.equal(usual, expected)  # one uniform draw per sample from its own stream
    # an exit at the second of [1000, 750, 500, 250] denoises unshifted t in [500, 750]
    narrowed = dmd_timestep(SampleNoise(seeds).rand(), 5.0, 0.02, 0.98, 0.5, 0.75)
    lo, hi = (1000 * shift_sigma(torch.tensor(v), 5.0) for v in (0.5, 0.75))
    assert bool(((narrowed >= lo - 1e-3) & (narrowed <= hi + 1e-3)).all())
    assert narrowed.max() - narrowed.min() > 10  # still random within it
    with pytest.raises(ValueError):
        dmd_timestep(SampleNoise(seeds[:1]).rand(), 5.0, 0.02, 0.98, 0.8, 0.5)
