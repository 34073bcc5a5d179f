"""Tests for sf.diffusion: rectified-flow algebra, timestep warping, guidance and samplers."""

import pytest
import torch

from sf.diffusion import (
    DEFAULT_CFG_SCALE,
    add_noise,
    cfg_combine,
    dmd_timestep,
    eps_from_flow,
    flow_from_x0_noise,
    guided_net,
    ode_sigmas,
    sample_few_step,
    sample_teacher,
    shift_sigma,
    timesteps_table,
    warp_steps,
    x0_from_flow,
    x0_to_flow,
)

B, F, C, H, W = 2, 3, 4, 5, 6
STUDENT_STEPS = [1000, 750, 500, 250]


def _randn(*shape, seed=0, dtype=torch.float32):
    """Seeded normal tensor."""
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


class PointFlow:
    """Exact flow when the data is the single point x*: v(x_t, sigma) = (x_t - x*) / sigma; records calls."""

    def __init__(self, x_star):
        self.x_star = x_star
        self.calls = []

    def __call__(self, x_t, t, **cond):
        assert t.shape == x_t.shape[:2] and t.dtype == torch.float32
        self.calls.append(t.clone())
        sigma = (t.to(x_t.dtype) / 1000)[:, :, None, None, None]  # (B, F, 1, 1, 1)
        return (x_t - self.x_star) / sigma


class GaussianFlow:
    """Exact flow when the data is N(mu, s^2) per element; the ODE maps eps to mu + s * eps."""

    def __init__(self, mu, s):
        self.mu, self.s = mu, s

    def __call__(self, x_t, t):
        sigma = (t.to(x_t.dtype) / 1000)[:, :, None, None, None]
        alpha = 1 - sigma
        gain = alpha * self.s**2 / (alpha**2 * self.s**2 + sigma**2)
        x0 = self.mu + gain * (x_t - alpha * self.mu)
        return (x_t - x0) / sigma


# ------------------------------------------------------------------------------------------- shift / warp


def test_warp_student_steps_shift5():
    t = warp_steps(STUDENT_STEPS, 5)
    assert t.dtype == torch.float32
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 833.33, 625.0]), atol=0.1, rtol=0)


def test_warp_reads_the_shifted_table():
    table = timesteps_table(5)
    assert table.shape == (1000,)
    assert table[0] == 1000.0
    assert table[-1] == pytest.approx(1000 * 5 * 0.001 / (1 + 4 * 0.001), abs=1e-3)
    assert bool((table[1:] < table[:-1]).all())
    steps = [1000, 999, 600, 1]
    assert torch.equal(warp_steps(steps, 5), table[[1000 - k for k in steps]])
    assert warp_steps([0], 5).item() == 0.0


@pytest.mark.parametrize("steps", [[1001], [-1], [500.5], []])
def test_warp_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        warp_steps(steps, 5)


def test_shift_properties():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    torch.testing.assert_close(shift_sigma(sigma, 1.0), sigma, atol=0, rtol=0)
    for s in (0.5, 3.0, 5.0, 8.0):
        shifted = shift_sigma(sigma, s)
        assert shifted[0] == 0.0 and shifted[-1] == 1.0
        assert bool((shifted[1:] > shifted[:-1]).all())
        assert bool((shifted[1:-1] > sigma[1:-1]).all()) == (s > 1)
    assert shift_sigma(0.5, 5.0) == pytest.approx(5 / 6)
    with pytest.raises(ValueError):
        shift_sigma(0.5, 0.0)


# ------------------------------------------------------------------------------------------- conversions


@pytest.mark.parametrize("per_frame", [False, True])
def test_add_noise_and_flow_conversions_invert(per_frame):
    x0, eps = _randn(B, F, C, H, W, seed=1), _randn(B, F, C, H, W, seed=2)
    sigma = torch.rand(B, F) * 0.98 + 0.01 if per_frame else torch.tensor([0.3, 0.9])
    x_t = add_noise(x0, eps, sigma)
    v = flow_from_x0_noise(x0, eps)
    torch.testing.assert_close(v, eps - x0, atol=0, rtol=0)
    torch.testing.assert_close(x0_from_flow(x_t, v, sigma), x0, atol=2e-6, rtol=0)
    torch.testing.assert_close(eps_from_flow(x_t, v, sigma), eps, atol=2e-6, rtol=0)
    torch.testing.assert_close(x0_to_flow(x_t, x0, sigma), v, atol=1e-4, rtol=1e-5)


def test_per_frame_sigma_mixes_each_frame_with_its_own_sigma():
    x0, eps = _randn(B, F, C, H, W, seed=1), _randn(B, F, C, H, W, seed=2)
    sigma = torch.tensor([[0.1, 0.5, 0.9], [1.0, 0.0, 0.25]])  # (B, F)
    x_t = add_noise(x0, eps, sigma)
    for b in range(B):
        for f in range(F):
            s = sigma[b, f].item()
            torch.testing.assert_close(x_t[b, f], (1 - s) * x0[b, f] + s * eps[b, f])


def test_scalar_sigma_and_dtype_are_respected():
    x0, eps = _randn(B, F, C, H, W, seed=1).bfloat16(), _randn(B, F, C, H, W, seed=2).bfloat16()
    x_t = add_noise(x0, eps, torch.tensor([0.25, 0.75], dtype=torch.float32))
    assert x_t.dtype == torch.bfloat16
    assert add_noise(x0, eps, 0.5).dtype == torch.bfloat16
    assert x0_to_flow(x_t, x0, torch.tensor([0.25, 0.75])).dtype == torch.bfloat16
    torch.testing.assert_close(add_noise(x0.float(), eps.float(), 0.0), x0.float(), atol=0, rtol=0)


def test_conversion_input_errors():
    x = _randn(B, F, C, H, W)
    with pytest.raises(ValueError):
        add_noise(x, x, torch.rand(B + 1))
    with pytest.raises(ValueError):
        add_noise(x, x, torch.rand(B, F + 1))
    with pytest.raises(ValueError):
        add_noise(x, x[:1], 0.5)
    with pytest.raises(ValueError):
        x0_to_flow(x, x, 0.0)


# ------------------------------------------------------------------------------------------- guidance


def test_cfg_combine_matches_reference_formula():
    cond, uncond = _randn(B, F, C, H, W, seed=3), _randn(B, F, C, H, W, seed=4)
    assert DEFAULT_CFG_SCALE == 3.0
    torch.testing.assert_close(cfg_combine(cond, uncond), cond + 3 * (cond - uncond), atol=0, rtol=0)
    torch.testing.assert_close(cfg_combine(cond, uncond, 0.0), cond, atol=0, rtol=0)
    with pytest.raises(ValueError):
        cfg_combine(cond, uncond[:1])


class TextNet:
    """Toy conditional flow net: depends on x, t, a (B, L, D) text embedding and a shared scalar; counts batches."""

    def __init__(self):
        self.batches = []

    def __call__(self, x_t, t, context, gain=1.0):
        self.batches.append(x_t.shape[0])
        weights = torch.arange(context.shape[-1], dtype=context.dtype)  # order-sensitive summary of the text
        text = (context * weights).mean(dim=(1, 2))[:, None, None, None, None]  # (B, 1, 1, 1, 1)
        return gain * (x_t * text + t[:, :, None, None, None] / 1000)


def test_guided_batched_and_unbatched_agree():
    x, t = _randn(B, F, C, H, W, seed=5), torch.rand(B, F) * 1000
    cond = {"context": _randn(B, 7, 8, seed=6)}
    uncond = {"context": _randn(1, 7, 8, seed=7)}  # negative prompt, computed once
    plain, batched = TextNet(), TextNet()
    out_plain = guided_net(plain, cond, uncond)(x, t, gain=2.0)
    out_batched = guided_net(batched, cond, uncond, batched=True)(x, t, gain=2.0)
    torch.testing.assert_close(out_batched, out_plain, atol=1e-6, rtol=1e-6)
    assert plain.batches == [B, B] and batched.batches == [2 * B]
    net = TextNet()
    expected = cfg_combine(net(x, t, cond["context"], 2.0), net(x, t, uncond["context"], 2.0), 3.0)
    torch.testing.assert_close(out_plain, expected, atol=0, rtol=0)


def test_guided_scale_zero_skips_uncond_and_errors():
    x, t = _randn(B, F, C, H, W), torch.rand(B, F) * 1000
    net = TextNet()
    cond, uncond = {"context": _randn(B, 7, 8, seed=6)}, {"context": _randn(1, 7, 8, seed=7)}
    torch.testing.assert_close(guided_net(net, cond, uncond, 0.0)(x, t), TextNet()(x, t, cond["context"]))
    assert net.batches == [B]
    with pytest.raises(ValueError):
        guided_net(net, cond, {}, batched=True)
    with pytest.raises(ValueError):
        guided_net(net, cond, uncond)(x, t, context=cond["context"])
    with pytest.raises(ValueError):
        guided_net(net, {**cond, "gain": 1.0}, {**uncond, "gain": 2.0}, batched=True)(x, t)


# ------------------------------------------------------------------------------------------- teacher


def test_ode_sigmas_merge_requested_exactly():
    requested = (warp_steps(STUDENT_STEPS, 8) / 1000).tolist()
    grid = ode_sigmas(48, 8.0, requested)
    assert grid[0] == 1.0 and grid[-1] == 0.0
    assert bool((grid[1:] < grid[:-1]).all())
    assert all(s in grid.tolist() for s in requested)
    assert len(ode_sigmas(48, 8.0)) == 49
    assert len(grid) <= 49 + len(requested)
    on_grid = ode_sigmas(48, 8.0)[[0, 10, 20]].tolist()
    assert len(ode_sigmas(48, 8.0, on_grid)) == 49
    nearly = on_grid[1] + 1e-12  # snaps onto the grid point instead of adding a tiny step
    snapped = ode_sigmas(48, 8.0, [nearly])
    assert len(snapped) == 49 and nearly in snapped.tolist()


@pytest.mark.parametrize("solver", ["euler", "multistep"])
def test_teacher_lands_on_point_and_records_exact_trajectory(solver):
    x_star = _randn(B, F, C, H, W, seed=8, dtype=torch.float64)
    eps0 = _randn(B, F, C, H, W, seed=9, dtype=torch.float64)
    net = PointFlow(x_star)
    requested = (warp_steps(STUDENT_STEPS, 8) / 1000).tolist()  # [1, .98, .94, .85] roughly
    out = sample_teacher(net, eps0, num_steps=48, shift=8.0, record_sigmas=requested, solver=solver)
    # fp64 latents, but t reaches the net as fp32, so the net's sigma is off by ~1e-8 relative
    torch.testing.assert_close(out.x0, x_star, atol=1e-6, rtol=0)
    assert out.trajectory.shape == (B, len(requested), F, C, H, W)
    for k, s in enumerate(requested):
        torch.testing.assert_close(out.trajectory[:, k], (1 - s) * x_star + s * eps0, atol=1e-6, rtol=0)
    assert not torch.allclose(out.trajectory[:, 1], (1 - 0.9) * x_star + 0.9 * eps0, atol=1e-3)
    assert len(net.calls) == len(ode_sigmas(48, 8.0, requested)) - 1
    assert all(bool((t > 0).all()) for t in net.calls)
    assert net.calls[0].eq(1000.0).all()


def test_teacher_fp32_without_recording():
    x_star, eps0 = _randn(B, F, C, H, W, seed=8), _randn(B, F, C, H, W, seed=9)
    out = sample_teacher(PointFlow(x_star), eps0, num_steps=10)
    assert out.trajectory is None and out.x0.dtype == torch.float32
    torch.testing.assert_close(out.x0, x_star, atol=1e-5, rtol=0)


def test_teacher_on_gaussian_converges_and_multistep_is_more_accurate():
    mu, s = 0.7, 0.5
    eps0 = _randn(B, F, C, H, W, seed=10, dtype=torch.float64)
    target = mu + s * eps0

    def error(num_steps, solver):
        out = sample_teacher(GaussianFlow(mu, s), eps0, num_steps=num_steps, shift=1.0, solver=solver)
        return (out.x0 - target).abs().max().item()

    assert error(24, "euler") / 5 < error(96, "euler") < error(24, "euler") / 3  # first order: error ~ 1/N
    assert error(96, "multistep") < error(24, "multistep") / 6  # higher order
    assert error(48, "multistep") < error(48, "euler") / 4


def test_teacher_input_errors():
    with pytest.raises(ValueError):
        sample_teacher(PointFlow(0.0), _randn(B, C, H, W))
    with pytest.raises(ValueError):
        sample_teacher(PointFlow(0.0), _randn(B, F, C, H, W), solver="heun")
    with pytest.raises(ValueError):
        sample_teacher(PointFlow(0.0), _randn(B, F, C, H, W), record_sigmas=[1.5])
    with pytest.raises(ValueError):
        ode_sigmas(0)


# ------------------------------------------------------------------------------------------- student


def test_student_few_step_lands_on_point():
    x_star, eps0 = _randn(B, F, C, H, W, seed=11), _randn(B, F, C, H, W, seed=12)
    net = PointFlow(x_star)
    t_steps = warp_steps(STUDENT_STEPS, 5)
    out = sample_few_step(net, eps0, t_steps, rng=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, x_star, atol=1e-5, rtol=0)
    assert len(net.calls) == len(STUDENT_STEPS)
    for t_call, t_expected in zip(net.calls, t_steps):
        assert t_call.shape == (B, F)
        assert bool(t_call.eq(t_expected).all())


def test_student_renoises_with_fresh_noise():
    eps0 = _randn(B, F, C, H, W, seed=12)
    seen = []

    def net(x_t, t):
        seen.append(x_t.clone())
        return torch.zeros_like(x_t)  # x0 prediction = x_t itself

    t_steps = [1000.0, 500.0, 250.0]
    out = sample_few_step(net, eps0, t_steps, rng=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    fresh1, fresh2 = torch.randn(eps0.shape, generator=gen), torch.randn(eps0.shape, generator=gen)
    expected1 = 0.5 * eps0 + 0.5 * fresh1
    expected2 = 0.75 * expected1 + 0.25 * fresh2
    torch.testing.assert_close(seen[1], expected1, atol=1e-6, rtol=0)
    torch.testing.assert_close(seen[2], expected2, atol=1e-6, rtol=0)
    torch.testing.assert_close(out, expected2, atol=1e-6, rtol=0)


def test_student_gradient_reaches_only_the_last_forward_with_grad_last():
    scale = torch.ones((), requires_grad=True)
    grad_modes = []

    def net(x_t, t):
        grad_modes.append(torch.is_grad_enabled())
        return x_t * scale

    eps0 = _randn(B, F, C, H, W, seed=1)
    out = sample_few_step(net, eps0, [1000.0, 500.0, 250.0], rng=torch.Generator().manual_seed(0), grad_last=True)
    assert grad_modes == [False, False, True] and out.requires_grad
    grad_modes.clear()
    with torch.no_grad():  # an enclosing no_grad wins
        assert not sample_few_step(net, eps0, [1000.0, 500.0], grad_last=True).requires_grad
    assert grad_modes == [False, False]
    assert not sample_few_step(net, eps0, [1000.0, 500.0]).requires_grad


@pytest.mark.parametrize("steps", [[], [1000, 1000], [500, 750], [1000, 0], [1001]])
def test_student_rejects_bad_steps(steps):
    with pytest.raises(ValueError):
        sample_few_step(PointFlow(0.0), _randn(B, F, C, H, W), steps)


# ------------------------------------------------------------------------------------------- DMD timestep


def test_dmd_timestep_range_and_formula():
    u = torch.rand(4096, generator=torch.Generator().manual_seed(0))
    t = dmd_timestep(u, 5.0)
    assert t.shape == (4096,) and t.dtype == torch.float32
    assert float(t.min()) >= 20.0 and float(t.max()) <= 980.0
    assert float(t.max()) == 980.0 and float(t.min()) == 20.0  # both clamps are hit in 4096 draws
    torch.testing.assert_close(t, (5 * u / (1 + 4 * u)).clamp(0.02, 0.98) * 1000)
    narrowed = dmd_timestep(u, 1.0, 0.0, 1.0, 0.25, 0.5)  # shift 1: sigma = 0.25 + 0.25 u
    torch.testing.assert_close(narrowed, (0.25 + 0.25 * u) * 1000)


def test_dmd_timestep_errors():
    u = torch.rand(3, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError):
        dmd_timestep(u, 5.0, 0.9, 0.1)
    with pytest.raises(ValueError):
        dmd_timestep(u, 5.0, 0.02, 0.98, 0.8, 0.5)
    with pytest.raises(ValueError):
        dmd_timestep(u, 0.0)
