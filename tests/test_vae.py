"""Video codecs: Wan VAE shapes and normalisation against raw diffusers, training loss, save/load, latent caching."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from sf.data import ShardWriter, decode_tensors, iter_samples, list_shards
from sf.data.bank import decode_pixel_sample
from sf.data.latents import LATENT_MEMBER, cache_latents
from sf.data.shards import encode_npy
from sf.models.vae import (
    WAN_VAE_CONFIGS,
    CodecConfig,
    IdentityCodec,
    WanVAE,
    codec_from_config,
    load_codec,
    save_codec,
    video_from_uint8,
)
from sf.tasks.vae import foreground_mask, vae_loss
from sf.world.scenes import WorldSpec, make_scene, render, write_world_shards


def world_videos(num_videos: int, num_frames: int) -> torch.Tensor:
    """The first train videos of the world as a batch (B, T, 3, 64, 64) in [-1, 1]."""
    return torch.stack([video_from_uint8(render(make_scene(0, "train", i), num_frames)) for i in range(num_videos)])


def fresh_world_codec(seed: int = 0) -> WanVAE:
    torch.manual_seed(seed)
    return WanVAE.from_flavor("world").eval()


def raw_posterior_mean(codec: WanVAE, video: torch.Tensor) -> torch.Tensor:
    """diffusers' own posterior mean of a (B, T, 3, H, W) video, in (B, F, C, h, w)."""
    return codec.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist.mean.permute(0, 2, 1, 3, 4)


def random_stats(codec) -> tuple[torch.Tensor, torch.Tensor]:
    mean, std = torch.randn(codec.latent_channels), torch.rand(codec.latent_channels) + 0.5
    codec.set_latent_stats(mean, std)
    return mean.view(-1, 1, 1), std.view(-1, 1, 1)


# ------------------------------------------------------------------------------------------------ shapes


@torch.no_grad()
def test_world_codec_maps_81_frames_to_21_latent_frames_and_back():
    codec = fresh_world_codec()
    video = world_videos(1, 81)
    latents = codec.encode(video)
    assert latents.shape == (1, 21, 16, 8, 8) == (1, *codec.latent_shape(81, 64, 64))
    decoded = codec.decode(latents)
    assert decoded.shape == video.shape and decoded.abs().max() <= 1
    assert (codec.latent_frames(81), codec.video_frames(21)) == (21, 81)
    assert (codec.temporal_compression, codec.spatial_compression) == (4, 8)


@torch.no_grad()
def test_short_clips_and_refused_shapes():
    codec = fresh_world_codec()
    video = world_videos(2, 5)
    assert codec.encode(video[:, :1]).shape == (2, 1, 16, 8, 8)
    assert codec.decode(codec.encode(video[:, :1])).shape == (2, 1, 3, 64, 64)
    assert codec.encode(video).shape == (2, 2, 16, 8, 8)
    assert codec.decode(codec.encode(video)).shape == (2, 5, 3, 64, 64)
    # diffusers would silently drop the frames after the last full chunk of 4: we refuse instead
    for num_frames in (0, 3, 4, 7):
        with pytest.raises(ValueError, match="1 \\+ k \\* 4"):
            codec.latent_frames(num_frames)
    with pytest.raises(ValueError, match="1 \\+ k \\* 4"):
        codec.encode(world_videos(1, 7))
    with pytest.raises(ValueError, match="multiples of 8"):
        codec.encode(torch.zeros(1, 5, 3, 60, 64))
    with pytest.raises(ValueError, match="\\(B, T, 3, H, W\\)"):
        codec.encode(video.permute(0, 2, 1, 3, 4))  # diffusers' layout
    with pytest.raises(ValueError, match="latents must be"):
        codec.decode(torch.zeros(1, 2, 4, 8, 8))


# ------------------------------------------------------------------------------------------------ against diffusers


@torch.no_grad()
def test_encode_normalises_diffusers_posterior_mean_and_decode_matches_diffusers():
    codec = fresh_world_codec()
    mean, std = random_stats(codec)
    video = world_videos(2, 9)
    raw = raw_posterior_mean(codec, video)  # (B, F, C, h, w)
    latents = codec.encode(video)
    assert torch.equal(latents, (raw - mean) / std)
    # the diffusers config carries the stats too (what save_pretrained would write)
    assert codec.vae.config.latents_mean == mean.flatten().tolist()
    expected = codec.vae.decode(raw.permute(0, 2, 1, 3, 4)).sample.permute(0, 2, 1, 3, 4)
    torch.testing.assert_close(codec.decode(latents), expected, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_sampled_encode_uses_the_posterior_spread():
    codec = fresh_world_codec()
    random_stats(codec)
    video = world_videos(1, 5)
    first = codec.encode(video, sample=True, rng=torch.Generator().manual_seed(3))
    again = codec.encode(video, sample=True, rng=torch.Generator().manual_seed(3))
    assert torch.equal(first, again) and not torch.equal(first, codec.encode(video))
    dist = codec.vae.encode(video.permute(0, 2, 1, 3, 4)).latent_dist
    expected = codec.normalize(dist.sample(generator=torch.Generator().manual_seed(3)).permute(0, 2, 1, 3, 4))
    assert torch.equal(first, expected)


@torch.no_grad()
def test_unclamped_decode_is_diffusers_decode_before_its_clamp():
    codec = fresh_world_codec()
    codec.vae.decoder.conv_out.weight.mul_(20)  # push outputs past [-1, 1]
    z = raw_posterior_mean(codec, world_videos(1, 9))
    unclamped = codec.decode_raw(z, clamp=False)
    assert unclamped.abs().max() > 1.5
    assert torch.equal(unclamped.clamp(-1, 1), codec.decode_raw(z))


@torch.no_grad()
def test_fit_latent_stats_standardises_the_latents():
    codec = fresh_world_codec()
    videos = world_videos(4, 5)
    mean, std = codec.fit_latent_stats(batch for batch in videos.split(2))
    raw = raw_posterior_mean(codec, videos)  # (B, F, C, h, w)
    torch.testing.assert_close(mean, raw.mean(dim=(0, 1, 3, 4)), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(std, raw.std(dim=(0, 1, 3, 4), correction=0), rtol=1e-4, atol=1e-5)
    latents = codec.encode(videos)
    torch.testing.assert_close(latents.mean(dim=(0, 1, 3, 4)), torch.zeros(16), atol=1e-4, rtol=0)
    torch.testing.assert_close(latents.std(dim=(0, 1, 3, 4), correction=0), torch.ones(16), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="no videos"):
        codec.fit_latent_stats([])
    with pytest.raises(ValueError, match="std > 0"):
        codec.set_latent_stats(torch.zeros(16), torch.zeros(16))


def test_identity_codec_round_trip():
    codec = IdentityCodec()
    mean, std = random_stats(codec)
    video = world_videos(1, 3)
    assert torch.equal(codec.encode(video), (video - mean) / std)
    torch.testing.assert_close(codec.decode(codec.encode(video)), video)
    assert codec.latent_frames(3) == 3 and codec.latent_channels == 3


# ------------------------------------------------------------------------------------------------ training


def test_vae_loss_decreases_with_a_few_steps_and_gradients_are_finite():
    codec = fresh_world_codec().train()
    video = world_videos(2, 5)
    generator = torch.Generator().manual_seed(0)
    reconstruction, _ = vae_loss(codec, video, kl_weight=0.0, rng=generator)
    reconstruction.backward()  # the encoder learns from the reconstruction, through the posterior sample
    for name in ("encoder.conv_in.weight", "quant_conv.weight", "decoder.conv_out.weight"):
        grad = codec.vae.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name

    optimizer = torch.optim.Adam(codec.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, stats = vae_loss(codec, video, rng=generator)
        optimizer.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in codec.parameters())
        assert set(stats) >= {"vae_l1", "vae_kl", "vae_psnr"} and all(torch.isfinite(v) for v in stats.values())
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * losses[0], losses
    with pytest.raises(TypeError):
        vae_loss(IdentityCodec(), video)


def test_foreground_mask_finds_the_objects_of_world_clips():
    """The clip-median background mask equals the world's truth: the pixels not painted the background colour."""
    from sf.world.scenes import BACKGROUNDS

    for index in range(4):
        scene = make_scene(0, "train", index)
        frames = render(scene, 9)
        truth = np.abs(frames.astype(int) - np.array(BACKGROUNDS[scene.background])).sum(-1) > 0
        mask = foreground_mask(video_from_uint8(frames)[None])[0, :, 0].numpy()
        assert 0 < truth.mean() < 0.2 and (mask == truth).all()


def test_foreground_and_l2_weights_shape_the_reconstruction_loss():
    """With weight w the loss is a weighted L1 mean: a decoder that drops the objects costs (1 + w)x more per
    object pixel, and w = 0 is the plain L1."""
    codec = fresh_world_codec()
    video = world_videos(2, 5)
    with torch.no_grad():
        plain, stats = vae_loss(codec, video, kl_weight=0.0, sample=False)
        weighted, _ = vae_loss(codec, video, kl_weight=0.0, sample=False, foreground_weight=10.0)
        error = (codec.decode_raw(codec.posterior(video)[0], clamp=False) - video).abs()
        mask = foreground_mask(video).expand_as(error)
    assert plain.item() == pytest.approx(error.mean().item(), rel=1e-5)
    expected = (error.sum() + 10.0 * error[mask].sum()) / (error.numel() + 10.0 * mask.sum())
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.isfinite(stats["vae_fg_psnr"]) and stats["vae_fg_psnr"] < stats["vae_psnr"]
    with torch.no_grad():
        both, _ = vae_loss(codec, video, kl_weight=0.0, sample=False, foreground_weight=10.0, l2_weight=0.5)
    per_value = error.abs() + 0.5 * error.square()
    expected = (per_value.sum() + 10.0 * per_value[mask].sum()) / (error.numel() + 10.0 * mask.sum())
    assert both.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="foreground_weight"):
        vae_loss(codec, video, foreground_weight=-1.0)
    with pytest.raises(ValueError, match="l2_weight"):
        vae_loss(codec, video, l2_weight=-1.0)


# ------------------------------------------------------------------------------------------------ save / load


@torch.no_grad()
def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    codec = fresh_world_codec()
    for p in codec.parameters():
        p.add_(torch.randn_like(p) * 0.05)
    random_stats(codec)
    path = save_codec(codec, tmp_path / "vae.safetensors")
    loaded = load_codec(path)
    assert isinstance(loaded, WanVAE) and loaded.codec_config() == codec.codec_config()
    video = world_videos(1, 5)
    latents = codec.encode(video)
    assert torch.equal(loaded.encode(video), latents)
    assert torch.equal(loaded.decode(latents), codec.decode(latents))
    assert loaded.vae.config.latents_std == codec.latents_std.tolist()

    identity = IdentityCodec(latents_mean=[0.1, 0.2, 0.3], latents_std=[1, 2, 3])
    reloaded = load_codec(save_codec(identity, tmp_path / "identity.safetensors"))
    assert isinstance(reloaded, IdentityCodec) and torch.equal(reloaded.latents_std, identity.latents_std)


def test_loading_a_wrong_file_errors_clearly(tmp_path):
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_codec(text)
    with pytest.raises(ValueError, match="not a readable safetensors"):
        load_codec(tmp_path / "missing.safetensors")
    other = tmp_path / "dit.safetensors"
    save_file({"blocks.0.weight": torch.zeros(2)}, str(other), metadata={"sf_format": "sf"})
    with pytest.raises(ValueError, match="not a video codec file"):
        load_codec(other)
    path = save_codec(fresh_world_codec(), tmp_path / "vae.safetensors")
    bigger = WanVAE.from_flavor("world", base_dim=16)
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(tmp_path / "mixed.safetensors"),
              metadata={"sf_codec": "wan", "sf_codec_config": json.dumps(WAN_VAE_CONFIGS["world"])})
    with pytest.raises(ValueError, match="do not match"):
        load_codec(tmp_path / "mixed.safetensors")
    assert isinstance(load_codec(path), WanVAE)


@torch.no_grad()
def test_diffusers_directory_and_codec_configs(tmp_path):
    codec = fresh_world_codec()
    random_stats(codec)
    codec.vae.save_pretrained(str(tmp_path / "vae"))
    loaded = codec_from_config({"kind": "wan", "checkpoint": str(tmp_path / "vae")})
    video = world_videos(1, 5)
    assert torch.equal(loaded.encode(video), codec.encode(video))

    assert isinstance(codec_from_config(CodecConfig(kind="identity")), IdentityCodec)
    assert codec_from_config(CodecConfig(overrides={"z_dim": 8})).latent_channels == 8
    assert WAN_VAE_CONFIGS["wan2.1"]["base_dim"] == 96 and len(WAN_VAE_CONFIGS["wan2.1"]["latents_std"]) == 16
    with pytest.raises(ValueError, match="unknown codec kind"):
        codec_from_config({"kind": "vqgan"})
    with pytest.raises(ValueError, match="unknown Wan VAE config 'huge'"):
        codec_from_config({"flavor": "huge"})
    with pytest.raises(ValueError, match="unknown Wan VAE config keys"):
        codec_from_config({"overrides": {"zdim": 8}})
    with pytest.raises(ValueError, match="4x temporal"):
        WanVAE.from_flavor("world", temperal_downsample=[False, False, True])


# ------------------------------------------------------------------------------------------------ caching


@torch.no_grad()
def test_cache_latents_writes_latent_shards_and_skips_corrupt_samples(tmp_path):
    spec = WorldSpec(num_frames=5)
    write_world_shards(str(tmp_path / "world"), "train", 3, samples_per_shard=2, spec=spec, progress=False)
    with ShardWriter(str(tmp_path / "world"), "broken", progress=False) as writer:
        writer.write({"__key__": "garbage", "txt": "x", "npy": b"not an array"})
        writer.write({"__key__": "four-frames", "txt": "y", "npy": encode_npy(render(make_scene(0, "train", 9), 4))})
    codec = fresh_world_codec()
    random_stats(codec)

    result = cache_latents(str(tmp_path / "world"), codec, str(tmp_path / "latents"), batch_size=2, progress=False)
    assert (result.num_samples, result.num_skipped) == (3, 2)
    samples = list(iter_samples(list_shards(str(tmp_path / "latents"))))
    assert [s["__key__"] for s in samples] == [f"train-0-{i:07d}" for i in range(3)]
    inputs = {s["__key__"]: s for s in iter_samples(list_shards(str(tmp_path / "world")))}
    for index, sample in enumerate(samples):
        latents = decode_tensors(sample[LATENT_MEMBER])["latents"]
        assert latents.shape == (2, 16, 8, 8) and latents.dtype == torch.float16
        source = decode_pixel_sample(inputs[sample["__key__"]])
        expected = codec.encode(video_from_uint8(source["frames"])[None])[0]
        torch.testing.assert_close(latents.float(), expected, atol=1e-3, rtol=2e-3)  # fp16, batched differently
        assert sample["txt"].decode() == source["prompt"] and json.loads(sample["json"]) == source["meta"]
