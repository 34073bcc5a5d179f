"""Text encoders: open_clip token features and masks, local weights, cached features, the negative prompt."""

import pytest
import torch
from safetensors.torch import save_file

import sf  # noqa: F401  (torchvision fix before open_clip)
from sf.data import PromptDataConfig, PromptStream, write_prompt_shards
from sf.data.prompts import prompt_features
from sf.models.text import (
    TINY_CLIP,
    CachedTextEncoder,
    OpenCLIPTextEncoder,
    encode_negative_prompt,
    fit_length,
    register_open_clip_configs,
)

PROMPTS = ["a red ball bouncing to the left", "cube", "", "two small green triangles moving up and down slowly"]


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return OpenCLIPTextEncoder(TINY_CLIP)


def _num_tokens(encoder, prompt):
    return len(encoder.tokenizer.encode(prompt)) + 2  # start and end-of-text tokens


def test_token_features_and_mask(encoder):
    features, mask = encoder(PROMPTS)
    assert features.shape == (4, 77, 64) and features.dtype == torch.float32
    assert mask.shape == (4, 77) and mask.dtype == torch.bool
    assert encoder.feature_dim == 64
    for row, prompt in enumerate(PROMPTS):
        n = _num_tokens(encoder, prompt)
        assert mask[row].sum() == n and mask[row, :n].all()  # a prefix: start token through end-of-text
        assert (features[row, n:] == 0).all()
        assert (features[row, :n].abs().sum(-1) > 0).all()
    assert mask[2].sum() == 2  # the empty prompt still has its start and end tokens


def test_features_are_per_token_after_final_layernorm(encoder):
    tokens = encoder.tokenizer(PROMPTS[:2])
    text = encoder.text
    x = text.token_embedding(tokens) + text.positional_embedding  # (B, C, D)
    x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask))
    features, mask = encoder(PROMPTS[:2])
    torch.testing.assert_close(features, x.masked_fill(~mask[..., None], 0), rtol=0, atol=1e-6)


def test_deterministic_batch_invariant_and_prompt_dependent(encoder):
    features, mask = encoder(PROMPTS)
    again, _ = encoder(PROMPTS)
    assert torch.equal(features, again)
    alone, _ = encoder([PROMPTS[1]])
    torch.testing.assert_close(alone[0], features[1], rtol=0, atol=1e-5)  # padding and batch mates do not leak in
    torch.manual_seed(0)
    rebuilt, _ = OpenCLIPTextEncoder(TINY_CLIP)(PROMPTS)
    assert torch.equal(rebuilt, features)  # same seed, same random init
    other, _ = encoder(["a blue ball bouncing to the left"])
    assert not torch.allclose(other[0], features[0])


def test_max_length_pads_with_zeros_and_truncates():
    torch.manual_seed(0)
    padded, padded_mask = OpenCLIPTextEncoder(TINY_CLIP, max_length=512)(PROMPTS)
    torch.manual_seed(0)
    short, short_mask = OpenCLIPTextEncoder(TINY_CLIP, max_length=4)(PROMPTS)
    torch.manual_seed(0)
    plain, plain_mask = OpenCLIPTextEncoder(TINY_CLIP)(PROMPTS)
    assert padded.shape == (4, 512, 64) and padded_mask.shape == (4, 512)
    assert torch.equal(padded[:, :77], plain) and (padded[:, 77:] == 0).all() and not padded_mask[:, 77:].any()
    assert short.shape == (4, 4, 64) and torch.equal(short, plain[:, :4])
    assert short_mask.sum(1).tolist() == [4, 3, 2, 4]
    with pytest.raises(ValueError, match="max_length"):
        OpenCLIPTextEncoder(TINY_CLIP, max_length=0)


def test_frozen_and_stays_in_eval(encoder):
    assert all(not p.requires_grad for p in encoder.parameters())
    parent = torch.nn.ModuleDict({"text": encoder}).train()
    assert not parent["text"].training and not encoder.text.training
    features, _ = encoder(PROMPTS[:1])
    assert not features.requires_grad


def test_pooled_is_normalised_clip_text_embedding(encoder):
    pooled = encoder.pooled(PROMPTS)
    assert pooled.shape == (4, 32)
    torch.testing.assert_close(pooled.norm(dim=-1), torch.ones(4))
    tokens = encoder.tokenizer(PROMPTS)
    last = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
    features, _ = encoder(PROMPTS)
    reference = features[torch.arange(4), last] @ encoder.text.text_projection  # (B, D) @ (D, E)
    torch.testing.assert_close(pooled, torch.nn.functional.normalize(reference, dim=-1), rtol=0, atol=1e-6)


def test_local_weights_round_trip(tmp_path):
    import open_clip

    register_open_clip_configs()
    torch.manual_seed(1)
    clip = open_clip.create_model(TINY_CLIP)  # the standard CLIP layout, as published checkpoints are
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = str(tmp_path / "tiny_clip.safetensors")
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, path)

    loaded = OpenCLIPTextEncoder(TINY_CLIP, pretrained=path)
    features, mask = loaded(PROMPTS)
    tokens = open_clip.get_tokenizer(TINY_CLIP)(PROMPTS)
    with torch.no_grad():
        x = clip.token_embedding(tokens) + clip.positional_embedding
        x = clip.ln_final(clip.transformer(x, attn_mask=clip.attn_mask))  # (B, C, D)
        expected_pooled = clip.encode_text(tokens, normalize=True)
    torch.testing.assert_close(features, x.masked_fill(~mask[..., None], 0), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.pooled(PROMPTS), expected_pooled, rtol=0, atol=1e-6)
    assert torch.equal(OpenCLIPTextEncoder(TINY_CLIP, pretrained=path)(PROMPTS)[0], features)
    torch.manual_seed(0)
    assert not torch.allclose(OpenCLIPTextEncoder(TINY_CLIP)(PROMPTS)[0], features)


def test_never_downloads():
    with pytest.raises(ValueError, match="local checkpoint file"):
        OpenCLIPTextEncoder("ViT-B-32", pretrained="openai")
    with pytest.raises(ValueError, match="downloaded"):
        OpenCLIPTextEncoder("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")
    with pytest.raises(ValueError, match="unknown open_clip model"):
        OpenCLIPTextEncoder("no-such-clip")
    with pytest.raises(ValueError, match="list of prompts"):
        OpenCLIPTextEncoder(TINY_CLIP)("a single string")


def test_fit_length_zeroes_padding():
    features = torch.ones(2, 3, 4)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    padded, padded_mask = fit_length(features, mask, 5)
    assert padded.shape == (2, 5, 4)
    assert padded_mask.tolist() == [[True, True, False, False, False], [True, False, False, False, False]]
    assert padded.sum(-1).tolist() == [[4, 4, 0, 0, 0], [4, 0, 0, 0, 0]]
    cut, cut_mask = fit_length(features, mask, 1)
    assert cut.shape == (2, 1, 4) and cut_mask.tolist() == [[True], [True]]


# ------------------------------------------------------------------------------------------------- cached features


def test_cached_encoder_serves_shard_features(tmp_path, encoder):
    write_prompt_shards(PROMPTS, str(tmp_path), samples_per_shard=2, encoder=encoder, progress=False)
    stream = PromptStream(PromptDataConfig(shards=str(tmp_path), batch_size=4, shuffle_buffer=0, resample=False))
    (batch,) = list(stream)
    assert batch["features"].shape == (4, max(_num_tokens(encoder, p) for p in PROMPTS), 64)
    cached = CachedTextEncoder(max_length=77)
    features, mask = prompt_features(cached, batch)
    expected, expected_mask = encoder(batch["prompt"])
    assert torch.equal(mask, expected_mask)
    torch.testing.assert_close(features, expected, rtol=1e-3, atol=1e-3)  # stored as float16
    assert torch.equal(features, expected.half().float())
    assert not torch.equal(features, expected)  # the fp16 cache is really what came back


def test_cached_encoder_table_and_fallback(encoder):
    negative, negative_mask = encoder([""])
    table = CachedTextEncoder({"": (negative, negative_mask)}, max_length=10)
    features, mask = table(["", ""])
    assert features.shape == (2, 10, 64) and mask.sum(1).tolist() == [2, 2]
    assert torch.equal(features[1], negative[0, :10])
    assert table.feature_dim == 64
    with pytest.raises(ValueError, match="no cached features"):
        table(["cube"])
    with_fallback = CachedTextEncoder({"": (negative, negative_mask)}, fallback=encoder)
    assert torch.equal(with_fallback(["cube", ""])[0], encoder(["cube", ""])[0])
    assert torch.equal(prompt_features(with_fallback, {"prompt": ["cube"]})[0], encoder(["cube"])[0])


def test_negative_prompt_is_encoded_once_and_expanded(encoder):
    calls = []

    class Counting(CachedTextEncoder):
        def forward(self, prompts):
            calls.append(list(prompts))
            return super().forward(prompts)

    counting = Counting(fallback=encoder)
    features, mask = encode_negative_prompt(counting, "blurry, low quality", 3)
    again, _ = encode_negative_prompt(counting, "blurry, low quality", 5)
    assert calls == [["blurry, low quality"]]
    assert features.shape == (3, 77, 64) and mask.shape == (3, 77) and again.shape == (5, 77, 64)
    reference, reference_mask = encoder(["blurry, low quality"])
    assert torch.equal(features, reference.expand(3, -1, -1)) and torch.equal(mask, reference_mask.expand(3, -1))
    encode_negative_prompt(counting, "", 2)
    assert calls == [["blurry, low quality"], [""]]
