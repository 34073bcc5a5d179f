"""Distillation losses: exact DMD gradient, per-sample normaliser, SiD, critic, ODE regression, flow matching."""

import pytest
import torch
import torch.nn.functional as F

from conftest import perturb_
from sf.diffusion import add_noise, dmd_timestep, t_to_sigma
from sf.distill import critic_loss, dmd_loss, flow_matching_loss, ode_regression_loss, sid_loss, x0_predictor
from sf.models import CausalConfig, VideoDiT, dit_config


def sigma_of(t, x):
    return t_to_sigma(t).reshape(t.shape + (1,) * (x.ndim - t.ndim))


def linear_score(a, b, no_grad=True):
    """Toy x0 predictor a(sigma) * x_t with a = a + b * sigma; checks it is called in the right grad mode."""

    def score(x_t, t):
        assert not (no_grad and torch.is_grad_enabled()), "scores must run under no_grad"
        return (a + b * sigma_of(t, x_t)) * x_t

    return score


def scaled_pair(batch_scale=10.0):
    """Two samples where the second is the first scaled up: video, noise, t (B = 2)."""
    video = torch.randn(1, 6, 4, 4, 4).repeat(2, 1, 1, 1, 1)
    noise = torch.randn(1, 6, 4, 4, 4).repeat(2, 1, 1, 1, 1)
    video[1] *= batch_scale
    noise[1] *= batch_scale
    return video, noise, torch.tensor([400.0, 400.0])


# ----------------------------------------------------------------------------------------------- DMD


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_dmd_gradient_is_exactly_grad_over_numel(dtype, rtol):
    video = torch.randn(2, 6, 4, 4, 4, dtype=dtype) * torch.tensor([1.0, 3.0], dtype=dtype).view(2, 1, 1, 1, 1)
    video.requires_grad_()
    noise = torch.randn_like(video)
    t = dmd_timestep(torch.rand(2, generator=torch.Generator().manual_seed(0)), 5.0)
    real, fake = linear_score(0.9, -0.3), linear_score(0.7, 0.1)
    loss, stats = dmd_loss(video, real, fake, t, noise)
    loss.backward()

    x, n = video.detach().double(), noise.double()
    s = sigma_of(t, x).to(dtype).double()
    x_t = ((1 - s) * x + s * n).to(dtype)
    with torch.no_grad():
        r, f = (score(x_t, t).double() for score in (real, fake))  # the toy scores themselves are not under test
    normaliser = (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)  # per sample
    grad = (f - r) / normaliser
    assert torch.allclose(video.grad.double(), grad / grad.numel(), rtol=rtol, atol=0)
    assert loss.item() == pytest.approx(0.5 * grad.square().mean().item(), rel=rtol)
    assert stats["dmd_grad_abs_mean"].item() == pytest.approx(grad.abs().mean().item(), rel=1e-6)  # fp32 stats
    assert stats["dmd_normaliser"].item() == pytest.approx(normaliser.mean().item(), rel=1e-6)
    assert stats["dmd_grad_norm"].item() == pytest.approx(grad.flatten(1).norm(dim=1).mean().item(), rel=1e-6)
    assert loss.dtype == dtype


def test_dmd_normaliser_is_per_sample():
    # homogeneous scores: a sample scaled by 10 has the same normalised gradient (a batch-wide mean would not)
    video, noise, t = scaled_pair()
    video.requires_grad_()
    loss, _ = dmd_loss(video, linear_score(0.8, 0.0), linear_score(0.5, 0.0), t, noise)
    loss.backward()
    assert video.grad[0].abs().max() > 0
    assert torch.allclose(video.grad[1], video.grad[0], rtol=1e-5, atol=1e-12)


def test_dmd_is_zero_when_fake_matches_real_and_survives_zero_normaliser():
    video = torch.randn(2, 3, 4, 4, 4, requires_grad=True)
    noise, t = torch.randn_like(video), torch.tensor([100.0, 900.0])
    loss, _ = dmd_loss(video, linear_score(0.8, 0.1), linear_score(0.8, 0.1), t, noise)
    assert loss.item() == 0.0
    # sample 0: the real score returns x itself, x - r = 0 and the normaliser vanishes
    real = lambda x_t, t: torch.cat([video[:1].detach(), 0.8 * x_t[1:]])  # noqa: E731
    loss, _ = dmd_loss(video, real, linear_score(0.8, 0.1), t, noise)
    loss.backward()
    assert torch.isfinite(loss) and video.grad[0].abs().max() == 0 and video.grad[1].abs().max() > 0


# ----------------------------------------------------------------------------------------------- x0 predictor


def test_x0_predictor_with_cfg():
    def net(x, t, context):  # flow depends on the prompt through a scalar
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1, 1) * x + sigma_of(t, x)

    x_t, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([250.0, 800.0])
    cond, uncond = torch.full((2, 5, 32), 2.0), torch.full((1, 5, 32), 0.5)
    s = sigma_of(t, x_t)
    expected_flow = (2.0 * x_t + s) + 3.0 * ((2.0 * x_t + s) - (0.5 * x_t + s))
    for batched in (False, True):
        x0 = x0_predictor(net, cond, cfg_scale=3.0, uncond_context=uncond, batched=batched)(x_t, t)
        assert torch.allclose(x0, x_t - s * expected_flow, atol=1e-6)
    assert torch.allclose(x0_predictor(net, cond)(x_t, t), x_t - s * (2.0 * x_t + s), atol=1e-6)
    with pytest.raises(ValueError, match="uncond_context"):
        x0_predictor(net, cond, cfg_scale=3.0)


def test_x0_predictor_batched_cfg_matches_on_a_dit():
    model = perturb_(VideoDiT(dit_config("debug")))
    x_t, t = torch.randn(2, 3, 4, 4, 4), torch.tensor([250.0, 800.0])
    cond, uncond = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    with torch.no_grad():
        a = x0_predictor(model, cond, 3.0, uncond)(x_t, t)
        b = x0_predictor(model, cond, 3.0, uncond, batched=True)(x_t, t)
    assert (a - b).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------- SiD


def test_sid_without_score_gradients_equals_dmd_gradient():
    video = torch.randn(2, 6, 4, 4, 4) * torch.tensor([1.0, 4.0]).view(2, 1, 1, 1, 1)
    noise, t = torch.randn_like(video), torch.tensor([300.0, 700.0])
    real, fake = linear_score(0.9, -0.3), linear_score(0.7, 0.1)
    v1, v2 = video.clone().requires_grad_(), video.clone().requires_grad_()
    dmd_loss(v1, real, fake, t, noise)[0].backward()
    loss, stats = sid_loss(v2, real, fake, t, noise, through_scores=False)
    loss.backward()
    assert torch.isfinite(loss) and stats["sid_score_gap_abs_mean"] > 0
    assert torch.allclose(v2.grad, v1.grad, rtol=1e-5, atol=1e-12)


def test_sid_gradient_through_scores_matches_analytic():
    alpha, (a_r, b_r), (a_f, b_f) = 1.2, (0.9, -0.3), (0.7, 0.1)
    video = torch.randn(2, 3, 4, 4, 4, dtype=torch.float64, requires_grad=True)
    noise, t = torch.randn_like(video), torch.tensor([300.0, 700.0], dtype=torch.float64)
    real, fake = linear_score(a_r, b_r, no_grad=False), linear_score(a_f, b_f, no_grad=False)
    loss, _ = sid_loss(video, real, fake, t, noise, alpha=alpha)
    loss.backward()

    x, s = video.detach(), sigma_of(t, video)
    x_t = (1 - s) * x + s * noise
    ar, af = a_r + b_r * s, a_f + b_f * s
    r, f = ar * x_t, af * x_t
    d = r - f
    normaliser = (x - r).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = 2 * (1 - alpha) * d * (ar - af) * (1 - s) + (ar - af) * (1 - s) * (f - x) + d * (af * (1 - s) - 1)
    expected = expected / normaliser / x.numel()
    assert torch.allclose(video.grad, expected, rtol=1e-10, atol=1e-14)
    assert loss.item() == pytest.approx((((1 - alpha) * d**2 + d * (f - x)) / normaliser).mean().item(), rel=1e-12)


def test_sid_descent_moves_towards_real_score():
    # constant scores: real says "mu_r", fake says "mu_f"; a descent step moves x towards mu_r - mu_f
    video = torch.randn(1, 3, 4, 4, 4, requires_grad=True)
    mu_r, mu_f = torch.randn_like(video), torch.randn_like(video)
    loss, _ = sid_loss(video, lambda x_t, t: mu_r, lambda x_t, t: mu_f, torch.tensor([500.0]), torch.randn_like(video))
    loss.backward()
    cos = F.cosine_similarity(-video.grad.flatten(), (mu_r - mu_f).flatten(), dim=0)
    assert cos > 0.999


# ----------------------------------------------------------------------------------------------- critic


def test_critic_loss_zero_for_perfect_critic_and_detaches_video():
    video = torch.randn(2, 6, 4, 4, 4, requires_grad=True)
    noise, t = torch.randn_like(video), torch.tensor([[100.0] * 6, [900.0] * 6])
    perfect = lambda x_t, t: (x_t - video.detach()) / sigma_of(t, x_t)  # noqa: E731
    assert critic_loss(perfect, video, t, noise).item() < 1e-10
    zero = lambda x_t, t: torch.zeros_like(x_t)  # noqa: E731
    expected = (noise - video).detach().square().mean()
    assert critic_loss(zero, video, t, noise).item() == pytest.approx(expected.item(), rel=1e-6)
    weight = torch.ones((), requires_grad=True)
    critic_loss(lambda x_t, t: weight * x_t, video, t, noise).backward()
    assert video.grad is None and weight.grad is not None


def test_flow_matching_loss_per_frame_t_on_a_causal_dit():
    model = perturb_(VideoDiT(dit_config("debug")))
    x0, noise, ctx = torch.randn(1, 6, 4, 4, 4), torch.randn(1, 6, 4, 4, 4), torch.randn(1, 5, 32)
    t = torch.tensor([[900.0] * 3 + [200.0] * 3])
    causal = CausalConfig(3)
    loss = flow_matching_loss(model, x0, t, noise, ctx, causal=causal)
    x_t = add_noise(x0, noise, t_to_sigma(t))
    assert torch.allclose(loss, F.mse_loss(model(x_t, t, ctx, causal=causal), noise - x0))
    exact = lambda x, t, context: (x - x0) / sigma_of(t, x)  # noqa: E731
    assert flow_matching_loss(exact, x0, t, noise, ctx).item() < 1e-10


# ----------------------------------------------------------------------------------------------- ODE regression


def linear_trajectory(sigmas, batch=2, frames=9):
    clean, noise = torch.randn(batch, frames, 4, 4, 4), torch.randn(batch, frames, 4, 4, 4)
    s = torch.tensor(sigmas).view(1, -1, 1, 1, 1, 1)
    return (1 - s) * clean[:, None] + s * noise[:, None], clean  # (B, K, F, C, H, W), (B, F, C, H, W)


def test_ode_regression_zero_for_exact_net_with_per_chunk_steps():
    sigmas = [1.0, 0.9375, 0.8333, 0.625]
    trajectory, clean = linear_trajectory(sigmas)
    causal, seen = CausalConfig(3), []

    def exact(x, t, context, *, causal):
        seen.append((t.clone(), causal))
        return (x - clean) / sigma_of(t, x)

    loss = ode_regression_loss(exact, trajectory, torch.tensor(sigmas), clean, None, causal,
                               torch.Generator().manual_seed(0))
    assert loss.item() < 1e-10
    (t, passed), = seen
    assert passed is causal and t.shape == (2, 9)
    chunks = t.view(2, 3, 3)
    assert bool((chunks == chunks[..., :1]).all())  # one step per chunk
    assert len(set(chunks[..., 0].flatten().tolist())) > 1  # steps differ across chunks / samples
    assert set(t.flatten().tolist()) <= {s * 1000 for s in torch.tensor(sigmas).tolist()}

    def per_sample_t(x, t, context, *, causal):  # ignores the per-frame timesteps
        return (x - clean) / sigma_of(t[:, :1].expand_as(t), x)

    wrong = ode_regression_loss(per_sample_t, trajectory, torch.tensor(sigmas), clean, None, causal,
                                torch.Generator().manual_seed(0))
    assert wrong.item() > 1e-3


def test_ode_regression_skips_sigma_zero_frames_and_trains_a_dit():
    trajectory, clean = linear_trajectory([0.5, 0.0], batch=1, frames=6)
    exact = lambda x, t, context, causal: (x - clean) / sigma_of(t, x)  # noqa: E731  (inf/nan at sigma 0)
    assert ode_regression_loss(exact, trajectory, [0.5, 0.0], clean, None, CausalConfig(2)).item() < 1e-10

    model = perturb_(VideoDiT(dit_config("debug")))
    trajectory, clean = linear_trajectory([1.0, 0.75, 0.5], batch=1, frames=6)
    loss = ode_regression_loss(model, trajectory, [1.0, 0.75, 0.5], clean, torch.randn(1, 5, 32), CausalConfig(3))
    loss.backward()
    assert torch.isfinite(loss) and model.blocks[0].self_attn.q.weight.grad.abs().max() > 0
    with pytest.raises(ValueError, match="trajectory"):
        ode_regression_loss(model, trajectory[:, 0], [1.0], clean, None, CausalConfig(3))
