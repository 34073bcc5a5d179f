"""Our VideoDiT against diffusers' WanTransformer3DModel (the oracle) and the three weight namings."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from conftest import perturb_
from sf.models import DiTConfig, VideoDiT
from sf.models.convert import convert_state_dict

CFG = DiTConfig(dim=48, num_layers=2, num_heads=2, ffn_dim=96, text_dim=32, freq_dim=32, in_channels=4, out_channels=4)


def diffusers_model(cfg: DiTConfig) -> WanTransformer3DModel:
    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps,
        rope_max_seq_len=128,
    )
    return perturb_(model.eval(), 0.1)


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(1)
    ref = diffusers_model(CFG)
    ours = VideoDiT(CFG).eval()
    ours.load_state_dict(convert_state_dict(ref.state_dict(), "diffusers", "sf"), strict=True)
    return ref, ours


def run_ref(ref, x, t, ctx):
    return ref(x.transpose(1, 2), t, ctx, return_dict=False)[0].transpose(1, 2)


@pytest.mark.parametrize(
    "batch,frames,height,width,text_len",
    [(2, 5, 6, 10, 7), (1, 1, 4, 4, 3), (2, 7, 8, 6, 12), (3, 3, 2, 14, 1)],
)
def test_matches_diffusers(pair, batch, frames, height, width, text_len):
    ref, ours = pair
    x = torch.randn(batch, frames, 4, height, width)
    t = torch.rand(batch) * 1000
    ctx = torch.randn(batch, text_len, 32)
    with torch.no_grad():
        expected, got = run_ref(ref, x, t, ctx), ours(x, t, ctx)
    assert expected.shape == got.shape == x.shape
    assert (expected - got).abs().max() <= 1e-5


def test_per_frame_timesteps_match_per_token_diffusers(pair):
    # diffusers takes (B, tokens) timesteps (Wan2.2 style); per-frame ones expand to every token of the frame
    ref, ours = pair
    x, ctx = torch.randn(2, 5, 4, 6, 8), torch.randn(2, 4, 32)
    t = torch.rand(2, 5) * 1000
    with torch.no_grad():
        expected = run_ref(ref, x, t.repeat_interleave(3 * 4, dim=1), ctx)
        got = ours(x, t, ctx)
    assert (expected - got).abs().max() <= 1e-5
    # and the per-frame timesteps really matter
    with torch.no_grad():
        assert (ours(x, t.mean(1), ctx) - got).abs().max() > 1e-3


def test_gradient_checkpointing_same_output_and_grads(pair):
    _, ours = pair
    x, t, ctx = torch.randn(1, 3, 4, 4, 4), torch.rand(1, 3) * 1000, torch.randn(1, 2, 32)
    ours.zero_grad()
    ours(x, t, ctx).square().mean().backward()
    plain = [p.grad.clone() for p in ours.parameters()]
    ours.zero_grad()
    ours.gradient_checkpointing = True
    try:
        ours(x, t, ctx).square().mean().backward()
    finally:
        ours.gradient_checkpointing = False
    for a, p in zip(plain, ours.parameters()):
        torch.testing.assert_close(p.grad, a, rtol=1e-5, atol=1e-7)


def test_naming_round_trips_are_lossless(pair):
    _, ours = pair
    state = ours.state_dict()
    for fmt in ("diffusers", "wan"):
        there = convert_state_dict(state, "sf", fmt)
        assert set(there) != set(state)
        back = convert_state_dict(there, fmt, "sf")
        assert back.keys() == state.keys()
        assert all(back[k] is state[k] for k in state)
    # diffusers -> wan -> diffusers too (the two external namings)
    dif = convert_state_dict(state, "sf", "diffusers")
    again = convert_state_dict(convert_state_dict(dif, "diffusers", "wan"), "wan", "diffusers")
    assert again.keys() == dif.keys()


def test_wan_naming_matches_known_keys(pair):
    _, ours = pair
    wan = convert_state_dict(ours.state_dict(), "sf", "wan")
    for key in ["text_embedding.0.weight", "time_projection.1.bias", "head.head.weight", "head.modulation",
                "blocks.1.self_attn.o.weight", "blocks.0.norm3.weight", "blocks.0.ffn.2.bias", "blocks.0.modulation"]:
        assert key in wan, key
