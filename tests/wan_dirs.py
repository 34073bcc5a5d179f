"""Tiny random Wan2.1 model directories in both layouts users download, built with the real classes.

diffusers layout: `WanPipeline(tokenizer, UMT5EncoderModel, WanTransformer3DModel, AutoencoderKLWan,
scheduler).save_pretrained(dir)` (diffusers' own pipeline loads and runs it). Original layout: the same networks
in Wan's file names and module names (config.json + diffusion_pytorch_model.safetensors, Wan2.1_VAE.pth,
models_t5_umt5-xxl-enc-bf16.pth, google/umt5-xxl/), written with the inverse of sf's key maps. Nothing is
downloaded; the tokenizer is a Unigram model built in memory from the corpus.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32  # the UMT5's d_model = the transformer's text_dim
LATENT_CHANNELS = 4
CORPUS = ["a red circle moves left on a grey background", "a blue square moves up on a black background",
          "a green triangle moves right", "two small yellow circles bounce", "the sky over a quiet lake at dawn"]


def tokenizer():
    """A T5-style Unigram tokenizer over the corpus words and their letters (built, not trained: deterministic)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.processors import TemplateProcessing
    from transformers import T5TokenizerFast

    words = sorted({word for line in CORPUS for word in line.split()})
    letters = sorted({c for word in words for c in word} | set("abcdefghijklmnopqrstuvwxyz"))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -5.0) for c in letters] + [("\u2581" + word, -1.0) for word in words]
    tok = Tokenizer(models.Unigram(pieces, unk_id=2))
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", extra_ids=0)


def components(seed: int = 0, vocab_size: int = 128):
    """(tokenizer, text encoder, transformer, vae, scheduler), seeded."""
    from diffusers import (
        AutoencoderKLWan,
        UniPCMultistepScheduler,
        WanTransformer3DModel,
    )
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2,
                                          num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                                          pad_token_id=0, eos_token_id=1))
    transformer = WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                        in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, text_dim=TEXT_DIM,
                                        freq_dim=32, ffn_dim=64, num_layers=2)
    with torch.no_grad():  # diffusers zero-initialises some tables: random values make every weight matter
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    vae = AutoencoderKLWan(base_dim=8, z_dim=LATENT_CHANNELS, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                           temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                           latents_std=[1.5, 0.8, 1.2, 1.0])
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return tokenizer(), encoder, transformer, vae, scheduler


def write_diffusers_dir(out: Path, seed: int = 0) -> Path:
    from diffusers import WanPipeline

    tok, encoder, transformer, vae, scheduler = components(seed)
    WanPipeline(tokenizer=tok, text_encoder=encoder, transformer=transformer, vae=vae,
                scheduler=scheduler).save_pretrained(str(out))
    return out


def write_original_dir(out: Path, seed: int = 0) -> Path:
    """The same networks as `write_diffusers_dir(seed)` in Wan's own layout and names."""
    from safetensors.torch import save_file

    from sf.models.convert import convert_state_dict
    from sf.models.wan import diffusers_vae_to_wan, transformers_t5_to_wan

    tok, encoder, transformer, vae, _ = components(seed)
    out.mkdir(parents=True, exist_ok=True)
    ours = convert_state_dict(transformer.state_dict(), "diffusers", "sf")
    save_file({k: v.contiguous() for k, v in convert_state_dict(ours, "sf", "wan").items()},
              str(out / "diffusion_pytorch_model.safetensors"))
    config = transformer.config
    (out / "config.json").write_text(json.dumps({  # the fields of Wan's own config.json (text_dim is not one)
        "_class_name": "WanModel", "model_type": "t2v", "dim": config.num_attention_heads * config.attention_head_dim,
        "ffn_dim": config.ffn_dim, "freq_dim": config.freq_dim, "in_dim": config.in_channels,
        "out_dim": config.out_channels, "num_heads": config.num_attention_heads, "num_layers": config.num_layers,
        "eps": config.eps, "text_len": 512}, indent=2))
    torch.save(diffusers_vae_to_wan(vae.state_dict(), num_res_blocks=1), out / "Wan2.1_VAE.pth")
    torch.save({k: v.to(torch.bfloat16) for k, v in transformers_t5_to_wan(encoder.state_dict()).items()},
               out / "models_t5_umt5-xxl-enc-bf16.pth")
    tok.save_pretrained(str(out / "google" / "umt5-xxl"))
    return out
