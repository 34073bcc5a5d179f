"""Self-forcing rollout: forward pattern, exit steps and sync, exact gradient truncation, streaming inference."""

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from conftest import perturb_
from sf.diffusion import add_noise, sample_few_step, t_to_sigma, x0_from_flow
from sf.distill import (
    RolloutConfig,
    diffusion_forcing_rollout,
    draw_exit_steps,
    generate,
    self_forcing_rollout,
    stream_chunks,
    teacher_forcing_rollout,
)
from sf.models import CausalConfig, VideoDiT, dit_config


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(3)
    return perturb_(VideoDiT(dit_config("debug")))


@dataclass
class Call:
    x: torch.Tensor  # input latents (detached copy)
    t: torch.Tensor
    out: torch.Tensor  # the flow, as returned (graph kept)
    grad: bool  # grad mode during the call
    write: bool  # update_cache
    start: int  # absolute frame index of the chunk


class Recorder:
    """Wraps the student to record every forward the rollout makes."""

    def __init__(self, net):
        self.net, self.calls = net, []

    def __call__(self, x, t, context, *, cache, update_cache=False):
        start = cache.next_frame
        out = self.net(x, t, context, cache=cache, update_cache=update_cache)
        self.calls.append(Call(x.detach().clone(), t.clone(), out, torch.is_grad_enabled(), update_cache, start))
        return out

    def exit_calls(self):
        """The last denoising call of each chunk (the one before its cache write)."""
        return [self.calls[i - 1] for i, c in enumerate(self.calls) if c.write]


def fixed(*exits):
    return lambda drawn: torch.tensor(exits)


def setup(frames=9, batch=1, **overrides):
    cfg = RolloutConfig(num_frames=frames, **overrides)
    return cfg, torch.randn(batch, frames, 4, 4, 4), torch.randn(batch, 5, 32)


# ----------------------------------------------------------------------------------------------- config


def test_config_validation_timesteps_and_omegaconf():
    cfg = RolloutConfig()
    assert torch.allclose(cfg.timesteps(), torch.tensor([1000.0, 937.5, 833.3333, 625.0]), atol=1e-3)
    assert torch.equal(RolloutConfig(warp_denoising_steps=False).timesteps(), torch.tensor([1000.0, 750, 500, 250]))
    assert cfg.causal == CausalConfig(3, None, 0)
    back = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RolloutConfig), {"local_attn_frames": 6}))
    assert back == RolloutConfig(local_attn_frames=6)
    for bad in ({"denoising_steps": [750, 1000]}, {"denoising_steps": [1000, 0]}, {"denoising_steps": []},
                {"grad_window_frames": 0}, {"context_noise": -1.0}, {"frames_per_block": 0},
                {"local_attn_frames": 2}):
        with pytest.raises(ValueError):
            RolloutConfig(**bad)


def test_draw_exit_steps_semantics():
    g = torch.Generator().manual_seed(0)
    same = torch.stack([draw_exit_steps(RolloutConfig(), 7, g) for _ in range(50)])  # (50, 7)
    assert bool((same == same[:, :1]).all())
    assert set(same[:, 0].tolist()) == {0, 1, 2, 3}
    free = torch.stack([draw_exit_steps(RolloutConfig(same_exit_across_blocks=False), 7, g) for _ in range(50)])
    assert not bool((free == free[:, :1]).all()) and free.min() == 0 and free.max() == 3
    last = draw_exit_steps(RolloutConfig(last_step_only=True, same_exit_across_blocks=False), 7, g)
    assert torch.equal(last, torch.full((7,), 3))


# ----------------------------------------------------------------------------------------------- forwards


@pytest.mark.parametrize("exits", [(2, 0, 3), (1, 1, 1), (0, 0, 0)])
def test_forward_pattern_count_and_sync(model, exits):
    cfg, noise, ctx = setup()
    synced = []

    def sync(drawn):
        synced.append(drawn.clone())
        return torch.tensor(exits)

    net = Recorder(model)
    out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(0),
                               sync=sync)
    assert len(synced) == 1 and bool((synced[0] == synced[0][0]).all())  # drawn once, same exit for all
    assert out.exit_steps.tolist() == list(exits)
    assert out.num_forwards == len(net.calls) == sum(e + 1 for e in exits) + len(exits)
    timesteps = cfg.timesteps()
    expected = []  # (grad, output requires grad, write, t)
    for exit_step in exits:
        expected += [(False, False, False, timesteps[k]) for k in range(exit_step)]
        expected += [(True, True, False, timesteps[exit_step]), (False, False, True, 0.0)]
    assert [(c.grad, c.out.requires_grad, c.write) for c in net.calls] == [e[:3] for e in expected]
    for call, e in zip(net.calls, expected):
        assert call.t.shape == (1, 3) and bool((call.t == e[3]).all())  # per-frame timesteps
    assert torch.equal(out.exit_timesteps, timesteps[list(exits)])
    assert out.denoised_from == pytest.approx([1000, 750, 500, 250][exits[0]])
    assert out.denoised_to == pytest.approx([750, 500, 250, 0][exits[0]])
    assert out.video.shape == noise.shape and out.video.requires_grad


def test_last_step_only_and_short_last_chunk(model):
    cfg, noise, ctx = setup(frames=7, last_step_only=True)
    net = Recorder(model)
    out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg)
    assert out.exit_steps.tolist() == [3, 3, 3]
    assert out.num_forwards == 3 * (4 + 1)
    assert [c.x.shape[1] for c in net.calls if c.write] == [3, 3, 1]
    assert [c.start for c in net.calls if c.write] == [0, 3, 6]
    assert out.video.shape == (1, 7, 4, 4, 4)
    with pytest.raises(ValueError, match="num_frames"):
        self_forcing_rollout(net, model.new_cache, noise[:, :6], ctx, cfg)


@pytest.mark.parametrize("window,grad_chunks", [(3, [2]), (6, [1, 2]), (4, [2]), (None, [0, 1, 2]), (21, [0, 1, 2])])
def test_gradient_window(model, window, grad_chunks):
    cfg, noise, ctx = setup(grad_window_frames=window)
    net = Recorder(model)
    out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg, sync=fixed(1, 2, 0))
    assert [c.start // 3 for c in net.calls if c.grad] == grad_chunks
    params = list(model.parameters())
    for chunk in range(3):  # chunks outside the window give the generator no gradient
        grads = torch.autograd.grad(out.video[:, 3 * chunk:3 * chunk + 3].square().sum(), params,
                                    retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().max() > 0 for g in grads) == (chunk in grad_chunks)


def test_no_grad_rollout_records_nothing(model):
    cfg, noise, ctx = setup()
    net = Recorder(model)
    with torch.no_grad():
        out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg, sync=fixed(3, 3, 3))
    assert not any(c.grad for c in net.calls) and not out.video.requires_grad


# ----------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("context_grad", [False, True])
def test_gradient_is_exactly_the_exit_step_forwards(model, context_grad):
    """The rollout's parameter gradient equals re-running only each chunk's exit step (masked forward).

    Without context_grad the earlier clean chunks enter the re-run detached: the gradient of the whole
    rollout is the sum over chunks of the exit-step gradients. With it they enter with their graph.
    """
    cfg, noise, ctx = setup(batch=2, context_grad=context_grad)
    net = Recorder(model)
    out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(1),
                               sync=fixed(1, 3, 0))
    weights = torch.randn_like(out.video)
    params = [p for p in model.parameters()]
    grads = torch.autograd.grad((out.video * weights).sum(), params)

    outputs = []
    for call in net.exit_calls():
        if context_grad:  # the clean context enters with its graph: one masked forward
            prefix = torch.cat(outputs, 1) if outputs else call.x[:, :0]
            x = torch.cat([prefix, call.x], 1)  # clean context at t = context_noise, then the exit-step input
            t = torch.cat([torch.zeros(prefix.shape[:2]), call.t], 1)
            flow = model(x, t, ctx, causal=cfg.causal)[:, prefix.shape[1]:]
        else:  # rebuild the cache without grad, then run only the exit step with grad
            cache = model.new_cache(cfg.causal)
            with torch.no_grad():
                for done in outputs:
                    model(done, torch.zeros(done.shape[:2]), ctx, cache=cache, update_cache=True)
            flow = model(call.x, call.t, ctx, cache=cache)
        outputs.append(x0_from_flow(call.x, flow, t_to_sigma(call.t)))
    video = torch.cat(outputs, 1)
    assert (video - out.video).abs().max() < 1e-5
    ref = torch.autograd.grad((video * weights).sum(), params)
    scale = max(g.abs().max() for g in ref)
    assert max((a - b).abs().max() for a, b in zip(grads, ref)) <= 1e-5 * scale


@pytest.mark.parametrize("context_grad", [False, True])
def test_later_losses_reach_earlier_chunks_only_with_context_grad(model, context_grad):
    cfg, noise, ctx = setup(context_grad=context_grad)
    net = Recorder(model)
    out = self_forcing_rollout(net, model.new_cache, noise, ctx, cfg, sync=fixed(2, 2, 2))
    exit_flows = [c.out for c in net.calls if c.grad and not c.write]
    assert len(exit_flows) == 3
    grads = torch.autograd.grad(out.video[:, 6:].square().sum(), exit_flows, allow_unused=True)
    reached = [g is not None and g.abs().max() > 0 for g in grads]
    assert reached == [context_grad, context_grad, True]


# ----------------------------------------------------------------------------------------------- inference


@pytest.mark.parametrize("context_noise", [0.0, 100.0])
def test_generate_equals_manual_few_step_sampling_with_cache(model, context_noise):
    cfg, noise, ctx = setup(frames=7, context_noise=context_noise)
    video = generate(model, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(5))

    g = torch.Generator().manual_seed(5)
    cache, chunks = model.new_cache(cfg.causal), []
    student = lambda x, t: model(x, t, ctx, cache=cache)  # noqa: E731
    with torch.no_grad():
        for s, e in cfg.causal.chunk_bounds(7):
            x0 = sample_few_step(student, noise[:, s:e], cfg.timesteps(), rng=g)
            chunks.append(x0)
            if context_noise:
                x0 = add_noise(x0, torch.randn(x0.shape, generator=g), context_noise / 1000)
            model(x0, torch.full((1, e - s), context_noise), ctx, cache=cache, update_cache=True)
    assert torch.equal(video, torch.cat(chunks, 1))
    assert not video.requires_grad


def test_stream_chunks_concatenate_to_generate(model):
    cfg, noise, ctx = setup(frames=8)
    video = generate(model, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(2))
    chunks = list(stream_chunks(model, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(2)))
    assert [c.shape[1] for c in chunks] == [3, 3, 2]
    assert torch.equal(torch.cat(chunks, 1), video)
    assert torch.is_grad_enabled()  # the generator never leaks its grad mode


def test_rolling_window_rollout_equals_masked_sampling(model):
    # a long rollout over a fixed-size cache: 1-frame chunks, window 2 + 1 sink frame
    cfg, noise, ctx = setup(frames=8, frames_per_block=1, local_attn_frames=2, sink_frames=1, last_step_only=True)
    video = generate(model, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(4))
    # the training rollout at the last step gives the same video, with gradient
    out = self_forcing_rollout(model, model.new_cache, noise, ctx, cfg, rng=torch.Generator().manual_seed(4))
    assert out.video.requires_grad and (out.video - video).abs().max() < 1e-6

    g, outputs = torch.Generator().manual_seed(4), []
    with torch.no_grad():
        for f in range(8):
            prefix = torch.cat(outputs, 1) if outputs else noise[:, :0]

            def masked(x, t, prefix=prefix):
                full = model(torch.cat([prefix, x], 1), torch.cat([torch.zeros(prefix.shape[:2]), t], 1), ctx,
                             causal=cfg.causal)
                return full[:, prefix.shape[1]:]

            outputs.append(sample_few_step(masked, noise[:, f:f + 1], cfg.timesteps(), rng=g))
    assert (torch.cat(outputs, 1) - video).abs().max() < 1e-5
    unwindowed = generate(model, model.new_cache, noise, ctx, RolloutConfig(num_frames=8, frames_per_block=1),
                          rng=torch.Generator().manual_seed(4))
    assert (unwindowed[:, -1] - video[:, -1]).abs().max() > 1e-4  # the window mattered


# ----------------------------------------------------------------------------------------------- baselines


def test_teacher_forcing_writes_real_clean_chunks(model):
    cfg, noise, ctx = setup()
    real = torch.randn_like(noise)
    net = Recorder(model)
    out = teacher_forcing_rollout(net, model.new_cache, real, noise, ctx, cfg, sync=fixed(1, 0, 2))
    writes = [c for c in net.calls if c.write]
    assert all(torch.equal(c.x, real[:, c.start:c.start + 3]) and not c.t.any() for c in writes)
    assert out.num_forwards == 2 + 1 + 3 + 3
    # each generated chunk is the exit step attending to the real earlier chunks
    for i, call in enumerate(net.exit_calls()):
        x = torch.cat([real[:, :3 * i], call.x], 1)
        t = torch.cat([torch.zeros(1, 3 * i), call.t], 1)
        with torch.no_grad():
            flow = model(x, t, ctx, causal=cfg.causal)[:, 3 * i:]
        assert (x0_from_flow(call.x, flow, t_to_sigma(call.t)) - out.video[:, 3 * i:3 * i + 3]).abs().max() < 1e-5


def test_diffusion_forcing_writes_noised_real_chunks(model):
    cfg, noise, ctx = setup(batch=2)
    real = torch.randn_like(noise)
    net = Recorder(model)
    out = diffusion_forcing_rollout(net, model.new_cache, real, noise, ctx, cfg,
                                    rng=torch.Generator().manual_seed(0), sync=fixed(0, 0, 0))
    steps = cfg.timesteps()
    assert out.num_forwards == 6 and out.video.requires_grad
    for c in (c for c in net.calls if c.write):
        assert c.t.shape == (2, 3) and bool((c.t == c.t[:, :1]).all())  # one level per sample and chunk
        assert all(float(v) in steps.tolist() for v in c.t[:, 0])
        sigma = t_to_sigma(c.t[:, 0]).view(2, 1, 1, 1, 1)
        eps = (c.x - (1 - sigma) * real[:, c.start:c.start + 3]) / sigma
        assert 0.5 < eps.std() < 1.5  # real chunk plus fresh unit noise
    with pytest.raises(ValueError, match="same shape"):
        diffusion_forcing_rollout(net, model.new_cache, real[:1], noise, ctx, cfg)
