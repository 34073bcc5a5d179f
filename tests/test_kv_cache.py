"""The incremental (KV cache) path equals the block-causal masked full-sequence forward, exactly."""

import pytest
import torch

from conftest import perturb_
from sf.models import CausalConfig, VideoDiT, dit_config
from sf.models.attention import block_causal_mask


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(2)
    return perturb_(VideoDiT(dit_config("debug")).eval())


def inputs(frames, batch=2, text_len=5):
    x = torch.randn(batch, frames, 4, 4, 6)
    t = torch.rand(batch, frames) * 1000  # mixed per-frame timesteps
    return x, t, torch.randn(batch, text_len, 32)


def chunk_by_chunk(model, causal, x, t, ctx, cache=None):
    cache = cache or model.new_cache(causal)
    outs = [model(x[:, s:e], t[:, s:e], ctx, cache=cache, update_cache=True) for s, e in causal.chunk_bounds(x.shape[1])]
    return torch.cat(outs, dim=1), cache


def test_mask_rule_small_case():
    # 5 frames, chunks of 2: [0,1] [2,3] [4]; window 3 frames + 1 sink
    mask = block_causal_mask(CausalConfig(2, 3, 1), 5, tokens_per_frame=1).int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0],  # chunk ends at 4: window [1, 4) plus sink frame 0
        [1, 1, 1, 1, 0],
        [1, 0, 1, 1, 1],  # chunk ends at 5: window [2, 5) plus sink; frame 1 dropped
    ])
    assert torch.equal(mask, expected)


@pytest.mark.parametrize("frames,frames_per_block", [(7, 3), (9, 3), (7, 1), (6, 2)])
def test_cache_equals_masked_forward(model, frames, frames_per_block):
    causal = CausalConfig(frames_per_block)
    x, t, ctx = inputs(frames)
    with torch.no_grad():
        masked = model(x, t, ctx, causal=causal)
        incremental, cache = chunk_by_chunk(model, causal, x, t, ctx)
    assert (masked - incremental).abs().max() <= 1e-5
    assert cache.num_cached_frames == frames
    # the mask matters: the bidirectional forward differs
    with torch.no_grad():
        assert (model(x, t, ctx) - masked).abs().max() > 1e-3


@pytest.mark.parametrize("frames_per_block,window,sink", [(3, 6, 3), (1, 4, 2), (3, 7, 0), (2, 2, 1)])
def test_rolling_cache_equals_window_sink_mask_after_many_rolls(model, frames_per_block, window, sink):
    causal = CausalConfig(frames_per_block, local_attn_frames=window, sink_frames=sink)
    frames = 12 * window + 1  # the window rolls many times; odd length ends on a short chunk
    x, t, ctx = inputs(frames, batch=1, text_len=3)
    with torch.no_grad():
        masked = model(x, t, ctx, causal=causal)
        incremental, cache = chunk_by_chunk(model, causal, x, t, ctx)
        unwindowed = model(x, t, ctx, causal=CausalConfig(frames_per_block))
    assert (masked - incremental).abs().max() <= 1e-5
    assert (masked - unwindowed)[:, -1].abs().max() > 1e-4  # the window changed late frames
    # fixed size: sink + the frames the smallest next chunk can see
    assert cache.num_cached_frames <= sink + window - 1
    assert cache.keys[0].shape[1] == cache.num_cached_frames * 6


def test_cache_writes_are_detached_and_gradient_stays_in_chunk(model):
    causal = CausalConfig(2)
    x, t, ctx = inputs(4, batch=1)
    x = x.requires_grad_()
    cache = model.new_cache(causal)
    first = model(x[:, :2], t[:, :2], ctx, cache=cache, update_cache=True)
    assert all(k.grad_fn is None and not k.requires_grad for k in cache.keys)
    second = model(x[:, 2:], t[:, 2:], ctx, cache=cache)
    (grad,) = torch.autograd.grad(second.square().sum(), x)
    assert grad[:, :2].abs().max() == 0  # nothing flows through the cache into the earlier chunk
    assert grad[:, 2:].abs().max() > 0
    assert first.requires_grad


def test_cache_with_grad_matches_masked_gradients(model):
    # keep_grad=True: the study option where later chunks' losses reach earlier chunks through the cache
    causal = CausalConfig(2)
    x, t, ctx = inputs(6, batch=1)
    weights = torch.randn(1, 6, 4, 4, 6)
    x1 = x.clone().requires_grad_()
    (g_masked,) = torch.autograd.grad((model(x1, t, ctx, causal=causal) * weights).sum(), x1)
    x2 = x.clone().requires_grad_()
    cache = model.new_cache(causal, keep_grad=True)
    out, _ = chunk_by_chunk(model, causal, x2, t, ctx, cache)
    (g_cache,) = torch.autograd.grad((out * weights).sum(), x2)
    assert g_masked[:, :2].abs().max() > 0
    assert (g_masked - g_cache).abs().max() <= 1e-5


def test_cross_attention_cache_reused_but_never_starves_gradients(model):
    causal = CausalConfig(2)
    x, t, ctx = inputs(2, batch=1)
    cache = model.new_cache(causal)
    with torch.no_grad():
        model(x, t, ctx, cache=cache)
    cached = cache.text[0][0]
    with torch.no_grad():
        model(x, t, ctx, cache=cache)
    assert cache.text[0][0] is cached  # computed once per prompt
    # a grad-enabled forward after a no-grad one still trains the cross-attention key/value projections
    model.zero_grad()
    model(x, t, ctx, cache=cache).square().mean().backward()
    assert model.blocks[0].cross_attn.k.weight.grad.abs().max() > 0
    assert model.blocks[0].cross_attn.v.weight.grad.abs().max() > 0
    model.zero_grad()


def test_cache_misuse_is_a_clear_error(model):
    causal = CausalConfig(2)
    x, t, ctx = inputs(4, batch=1)
    cache = model.new_cache(causal)
    with torch.no_grad():
        model(x[:, :2], t[:, :2], ctx, cache=cache, update_cache=True)
        with pytest.raises(ValueError, match="cannot write a chunk at 0"):
            cache.write([(k, v) for k, v in zip(cache.keys, cache.values)], 0, 2)
        with pytest.raises(ValueError, match="either causal"):
            model(x, t, ctx, causal=causal, cache=cache)
    with pytest.raises(ValueError, match="local_attn_frames"):
        CausalConfig(3, local_attn_frames=2)
