"""The real Wan2.1 path end to end on a tiny random Wan directory (diffusers' and transformers' own classes, both
layouts users download): every role loads alike from either layout, UMT5 conditions exactly as diffusers' Wan
pipeline does, sf-embed caches it into shards, the Wan recipes themselves train on two ranks, sf-generate
streams decoded video from the run, and bad input stops in one line before any weights load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wan_dirs

from launch import REPO, error_lines, job_env, read_metrics, run_job, run_train

PROMPTS = wan_dirs.CORPUS + ["a red fox runs through fresh snow", "waves roll onto a beach at dusk",
                             "a small boat drifts on a calm lake"]
# the recipes with only sizes overridden: 4x4 latents, 6 frames in chunks of 3, every step a generator step
SIZES = ["task.latent_height=4", "task.latent_width=4", "task.rollout.num_frames=6", "task.rollout.grad_window_frames=6",
         "task.gen_update_every=1", "trainer.max_steps=2", "trainer.checkpoint_every=2", "trainer.warmup_steps=0"]


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """A diffusers-layout and an original-layout directory of the same random networks, and a prompt file."""
    root = tmp_path_factory.mktemp("wan")
    (root / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return {"diffusers": wan_dirs.write_diffusers_dir(root / "diffusers"),
            "original": wan_dirs.write_original_dir(root / "original"), "prompts": root / "prompts.txt", "root": root}


@pytest.fixture(scope="module")
def embedded(wan):
    """sf-embed's shards of the prompts (2 per shard), made with the diffusers directory's UMT5."""
    from sf.data.embed import main

    out = wan["root"] / "embedded"
    main(["--model", str(wan["diffusers"]), "--prompts", str(wan["prompts"]), "--out", str(out),
          "--samples-per-shard", "2", "--sample-prompt", PROMPTS[0], "--sample-prompt", PROMPTS[5]])
    return out


# ------------------------------------------------------------------------------------------------ loading


def test_both_layouts_give_the_same_transformer(wan):
    from sf.models.convert import load_dit, read_dit_config

    diffusers, original = load_dit(wan["diffusers"]), load_dit(wan["original"])
    assert read_dit_config(wan["diffusers"]) == read_dit_config(wan["original"]) == diffusers.cfg
    assert diffusers.cfg.text_dim == wan_dirs.TEXT_DIM and diffusers.cfg.in_channels == wan_dirs.LATENT_CHANNELS
    a, b = diffusers.state_dict(), original.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_both_layouts_give_the_same_vae(wan):
    from sf.models.vae import load_wan_vae

    diffusers, original = load_wan_vae(wan["diffusers"]), load_wan_vae(wan["original"])
    a, b = diffusers.vae.state_dict(), original.vae.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # the original VAE file holds no latent statistics; the diffusers config does
    assert diffusers.latents_mean.tolist() == pytest.approx([0.1, -0.2, 0.3, 0.0])


def test_both_layouts_give_the_same_umt5_up_to_the_bf16_file(wan):
    """The original layout ships the encoder in bf16: it equals the diffusers one rounded to bf16, exactly."""
    from sf.models.text import load_umt5

    diffusers, original = load_umt5(wan["diffusers"]), load_umt5(wan["original"])
    a, b = diffusers.encoder.state_dict(), original.encoder.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k].to(torch.bfloat16).float(), b[k]) for k in a)
    assert diffusers.tokenizer(PROMPTS).input_ids == original.tokenizer(PROMPTS).input_ids


def test_original_files_of_something_else_are_one_line_errors(wan, tmp_path):
    """A .pth where Wan's VAE or T5 should be, holding other tensors: ValueError naming the file, no traceback."""
    from sf.models.text import load_umt5, umt5_width
    from sf.models.vae import load_wan_vae

    other = tmp_path / "other"
    shutil.copytree(wan["original"], other)
    for name in ("Wan2.1_VAE.pth", "models_t5_umt5-xxl-enc-bf16.pth"):
        torch.save({"something.weight": torch.zeros(2, 2)}, other / name)
    with pytest.raises(ValueError, match=r"Wan2.1_VAE.pth: not a Wan VAE state dict"):
        load_wan_vae(other)
    with pytest.raises(ValueError, match=r"enc-bf16.pth: not a Wan T5 encoder state dict"):
        load_umt5(other)
    with pytest.raises(ValueError, match=r"enc-bf16.pth: not a Wan T5 encoder state dict"):
        umt5_width(other)


def test_umt5_features_are_the_diffusers_wan_pipeline_s(wan):
    """512 tokens, features zeroed past each prompt's mask: what WanPipeline conditions its transformer on."""
    from diffusers import WanPipeline

    from sf.models.text import load_umt5

    pipe = WanPipeline.from_pretrained(str(wan["diffusers"]), local_files_only=True)
    theirs = pipe._get_t5_prompt_embeds(PROMPTS[:3], max_sequence_length=512, device=torch.device("cpu"))
    ours, mask = load_umt5(wan["diffusers"])(PROMPTS[:3])
    assert ours.shape == theirs.shape == (3, 512, wan_dirs.TEXT_DIM)
    assert not ours[~mask].any()  # exactly zero after the end token
    # the same fp32 encoder on the same tokens; only the summation order of a 2-layer forward may differ
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------------ sf-embed


def test_sf_embed_writes_cached_shards_and_a_table_of_fixed_prompts(wan, embedded):
    from sf.data.embed import completeness
    from sf.data.prompts import decode_prompt, read_prompt_table
    from sf.data.shards import iter_samples, list_shards
    from sf.models.text import load_umt5
    from sf.models.wan import WAN_NEGATIVE_PROMPT

    shards = list_shards(str(embedded))
    assert len(shards) == 4 and completeness(embedded) is None
    samples = [decode_prompt(raw) for raw in iter_samples(shards)]
    assert [s["prompt"] for s in samples] == PROMPTS
    encoder = load_umt5(wan["diffusers"])
    features, mask = encoder(PROMPTS)
    for i, sample in enumerate(samples):  # bf16 up to the last real token
        n = int(mask[i].sum())
        assert sample["mask"].shape == (n,) and sample["mask"].all()
        assert torch.equal(sample["features"], features[i, :n].to(torch.bfloat16))
    table, meta = read_prompt_table(embedded / "prompt_table.safetensors")
    assert list(table) == [WAN_NEGATIVE_PROMPT, PROMPTS[0], PROMPTS[5]]
    assert json.loads(meta["sample_prompts"]) == [PROMPTS[0], PROMPTS[5]] and meta["max_length"] == "512"
    negative, negative_mask = encoder([WAN_NEGATIVE_PROMPT])
    n = int(negative_mask.sum())
    assert torch.equal(table[WAN_NEGATIVE_PROMPT][0], negative[0, :n].to(torch.bfloat16).float())


def test_sf_embed_resumes_and_refuses_to_mix(wan, embedded, tmp_path, capsys):
    from sf.data.embed import completeness, main

    out = tmp_path / "copy"
    shutil.copytree(embedded, out)
    kept = [name for name in sorted(p.name for p in out.iterdir()) if name.endswith((".tar", ".safetensors"))]
    before = {name: (out / name).stat().st_mtime_ns for name in kept}
    (out / "prompts-000002.tar").unlink()
    assert "1 of its 4 shards are missing (first: prompts-000002.tar)" in completeness(out)
    args = ["--model", str(wan["diffusers"]), "--prompts", str(wan["prompts"]), "--out", str(out),
            "--samples-per-shard", "2", "--sample-prompt", PROMPTS[0], "--sample-prompt", PROMPTS[5]]
    main(args)  # writes the missing shard only
    assert completeness(out) is None
    assert (out / "prompts-000002.tar").read_bytes() == (embedded / "prompts-000002.tar").read_bytes()
    untouched = [name for name in kept if name != "prompts-000002.tar"]
    assert {name: (out / name).stat().st_mtime_ns for name in untouched} == {name: before[name] for name in untouched}
    with pytest.raises(SystemExit) as exit_info:
        main([*args[:-4], "--negative-prompt", "blurry"])
    assert exit_info.value.code == 1
    assert "holds shards made with another negative prompt" in capsys.readouterr().err


def test_sf_embed_ranks_split_the_shards(wan, embedded, tmp_path):
    """Two ranks write disjoint shards that together are the single-process output, byte for byte."""
    from sf.data.embed import embed_prompts

    kwargs = dict(sample_prompts=[PROMPTS[0], PROMPTS[5]], samples_per_shard=2, progress=False)
    for rank in (1, 0):
        embed_prompts(str(wan["diffusers"]), str(wan["prompts"]), str(tmp_path), rank=rank, world_size=2, **kwargs)
        if rank == 1:
            assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["prompts-000001.tar", "prompts-000003.tar"]
    for shard in embedded.glob("*.tar"):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()


# ------------------------------------------------------------------------------------------------ bad input


def _trains(run_dir, *overrides):
    return run_job(run_dir, ["experiment=wan1.3b_selfforcing", *SIZES, *overrides], timeout=300)


@pytest.mark.slow
def test_bad_input_is_one_line_before_any_weights_load(wan, embedded, tmp_path):
    no_text = tmp_path / "no_text_encoder"
    shutil.copytree(wan["diffusers"], no_text)
    shutil.rmtree(no_text / "text_encoder")
    small_vocab = tmp_path / "small_vocab"  # a text encoder that embeds fewer tokens than its tokenizer has
    shutil.copytree(wan["diffusers"], small_vocab)
    config = json.loads((small_vocab / "text_encoder" / "config.json").read_text())
    (small_vocab / "text_encoder" / "config.json").write_text(json.dumps({**config, "vocab_size": 16}))
    wide = tmp_path / "wide_teacher"  # a teacher that takes 48-wide text
    shutil.copytree(wan["diffusers"], wide)
    config = json.loads((wide / "transformer" / "config.json").read_text())
    (wide / "transformer" / "config.json").write_text(json.dumps({**config, "text_dim": 48}))
    one_shard = tmp_path / "one_shard"
    one_shard.mkdir()
    shutil.copy(embedded / "prompts-000000.tar", one_shard)

    cases = {
        "no text encoder": ([f"teacher.checkpoint={no_text}", f"data.shards={wan['prompts']}"],
                            "has no text encoder"),
        "tokenizer of another encoder": ([f"teacher.checkpoint={small_vocab}", f"data.shards={wan['prompts']}"],
                                         "the tokenizer has"),
        "text width": ([f"teacher.checkpoint={wide}", f"data.shards={embedded}"], "the teacher takes text_dim=48"),
        "too few shards": ([f"teacher.checkpoint={wan['diffusers']}", f"data.shards={one_shard}"],
                           "holds 1 shards, fewer than the 2 ranks"),
        "data.shards unset": ([f"teacher.checkpoint={wan['diffusers']}"], "missing mandatory value: data.shards"),
    }
    for name, (overrides, expected) in cases.items():
        run_dir = tmp_path / re.sub(r"\W", "_", name)
        result = run_job(run_dir, ["experiment=wan1.3b_selfforcing", *SIZES, *overrides], nproc=2, timeout=300)
        lines = error_lines(result)
        assert result.returncode != 0 and len(set(lines)) == 1 and expected in lines[0], (name, result.stderr[-3000:])
        assert "Loading weights" not in result.stderr and not (run_dir / "checkpoints").exists(), name


def test_dry_run_says_what_it_would_do_and_loads_nothing(wan, embedded, tmp_path):
    result = run_job(tmp_path / "run", ["experiment=wan1.3b_selfforcing", *SIZES, f"teacher.checkpoint={wan['diffusers']}",
                                        f"data.shards={embedded}", "--dry-run"])
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "dry run of task=distill on 1 rank(s)" in out and "text: features cached in" in out
    assert "codec: wan" in out and "memory: critic (trained)" in out and "data: 4 shards of prompts" in out
    assert not (tmp_path / "run" / "checkpoints").exists()


# ------------------------------------------------------------------------------------------------ the recipes


def _check_run(run_dir: Path, steps: int = 2) -> None:
    rows = read_metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert all(np.isfinite(v) for r in rows for k, v in r.items() if k.startswith("loss/"))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_wan_recipe_trains_on_two_ranks_and_generates(wan, embedded, tmp_path, stage):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["experiment=wan1.3b_selfforcing", *SIZES, f"deepspeed=zero{stage}",
                        f"teacher.checkpoint={wan['diffusers']}", f"data.shards={embedded}"], nproc=2, timeout=600)
    _check_run(run_dir)
    from sf.config import read_run_config

    saved = read_run_config(run_dir / "checkpoints" / "step_000002")  # which text encoder and VAE were used
    assert (saved.text.kind, saved.text.pretrained, saved.text.max_length) == ("umt5", str(wan["diffusers"]), 512)
    assert (saved.codec.kind, saved.codec.checkpoint) == ("wan", str(wan["diffusers"]))
    assert saved.trainer.precision == "bf16"
    if stage == 3:
        return
    # sf-generate from the run: decoded frames, longer than training over the rolling cache
    out = tmp_path / "video.mp4"
    result = subprocess.run([sys.executable, "-m", "sf.generate", str(run_dir), "--prompt", PROMPTS[0], "--prompt",
                             "a prompt the cache does not hold", "--num-frames", "9", "--out", str(out)],
                            cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [line["weights"].endswith("generator_ema.safetensors") for line in lines] == [True, True]
    assert all(line["window"] == 6 and line["dtype"] == "bfloat16" for line in lines)
    from sf.video import decode_mp4

    video = decode_mp4(Path(lines[0]["out"]).read_bytes())
    assert video.shape == (1 + 4 * 8, 32, 32, 3) and lines[0]["frames"] == 33  # 9 latent frames through the VAE
    assert video.std() > 0


@pytest.mark.slow
def test_wan_recipe_from_the_original_layout_trains(wan, tmp_path):
    """A .txt of prompts (encoded online by the original layout's bf16 UMT5) into the same recipe."""
    run_train(tmp_path / "run", ["experiment=wan1.3b_selfforcing", *SIZES, f"teacher.checkpoint={wan['original']}",
                                 f"data.shards={wan['prompts']}", "data.num_workers=0"], nproc=1, timeout=600)
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_14b_teacher_variant_trains_with_a_critic_of_its_own(wan, embedded, tmp_path):
    other = wan_dirs.write_diffusers_dir(tmp_path / "critic_source", seed=1)  # the "1.3B" of the variant
    run_train(tmp_path / "run", ["experiment=wan1.3b_selfforcing_14b_teacher", *SIZES,
                                 f"teacher.checkpoint={wan['diffusers']}", f"critic.checkpoint={other}",
                                 f"model.checkpoint={other}", f"data.shards={embedded}"], nproc=2, timeout=600)
    _check_run(tmp_path / "run")


@pytest.mark.slow
def test_ode_recipe_samples_pairs_on_every_rank_then_regresses(wan, embedded, tmp_path):
    run_dir = tmp_path / "run"
    run_train(run_dir, ["experiment=wan1.3b_ode", "task.latent_height=4", "task.latent_width=4",
                        "task.rollout.num_frames=6", "task.num_pairs=5", "task.num_steps=4", "trainer.max_steps=2",
                        "trainer.checkpoint_every=2", f"teacher.checkpoint={wan['diffusers']}",
                        f"data.shards={embedded}"], nproc=2, timeout=600)
    _check_run(run_dir)
    shards = sorted(p.name for p in (run_dir / "data" / "ode").glob("*.tar"))
    assert shards == ["ode-r000-000000.tar", "ode-r001-000000.tar"]  # three pairs on rank 0, two on rank 1


# ------------------------------------------------------------------------------------------------ every recipe


TRAINED_BY = {  # every experiment in conf/experiment/ and the test that trains it (not only composes it)
    "smoke": ("test_train_distributed.py", "test_two_rank_smoke"),
    "demo": ("test_demo.py", "test_make_demo_on_a_shortened_schedule"),
    "world_vae": ("test_world_recipes.py", "test_make_assets_quick_builds_every_asset_from_scratch"),
    "world_teacher": ("test_world_recipes.py", "test_make_assets_quick_builds_every_asset_from_scratch"),
    "world_ode": ("test_world_recipes.py", "test_make_assets_quick_builds_every_asset_from_scratch"),
    "wan1.3b_selfforcing": ("test_wan.py", "test_wan_recipe_trains_on_two_ranks_and_generates"),
    "wan1.3b_selfforcing_14b_teacher": ("test_wan.py", "test_14b_teacher_variant_trains_with_a_critic_of_its_own"),
    "wan1.3b_ode": ("test_wan.py", "test_ode_recipe_samples_pairs_on_every_rank_then_regresses"),
    "world_sf": ("test_health.py", "test_a_world_run_logs_its_health_to_metrics_jsonl_and_wandb"),
    "world_tf": ("test_baselines.py", "test_the_world_baseline_recipes_train_on_world_latents"),
    "world_df": ("test_baselines.py", "test_the_world_baseline_recipes_train_on_world_latents"),
}


def test_every_experiment_is_trained_by_a_test():
    experiments = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
    assert experiments == sorted(TRAINED_BY), "a new experiment needs a test that trains it (and a row here)"
    for name, (file, test) in TRAINED_BY.items():
        assert re.search(rf"^def {test}\(", (REPO / "tests" / file).read_text(), re.MULTILINE), (name, file, test)


def test_diffusers_export_loads_in_diffusers(tmp_path):
    """Our diffusers-format export is a folder WanTransformer3DModel.from_pretrained takes (accelerate included)."""
    from diffusers import WanTransformer3DModel

    from sf.models import VideoDiT, dit_config
    from sf.models.convert import convert_state_dict, save_dit

    torch.manual_seed(0)
    ours = VideoDiT(dit_config("debug", text_dim=wan_dirs.TEXT_DIM))
    folder = save_dit(ours, tmp_path / "export", fmt="diffusers").parent
    theirs = WanTransformer3DModel.from_pretrained(str(folder), local_files_only=True)
    expected = convert_state_dict(ours.state_dict(), "sf", "diffusers")
    got = theirs.state_dict()
    assert expected.keys() <= got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)


def test_reference_style_training_checkpoints_load_their_ema(tmp_path):
    """A .pt of the reference's layout ({"generator": ..., "generator_ema": ...}, Wan names under `model.`)."""
    from sf.models import VideoDiT, dit_config
    from sf.models.convert import convert_state_dict, load_dit

    torch.manual_seed(0)
    ours = VideoDiT(dit_config("debug"))
    wan_names = convert_state_dict(ours.state_dict(), "sf", "wan")
    torch.save({"generator": {f"model.{k}": v for k, v in wan_names.items()},
                "generator_ema": {f"model.{k}": v + 1 for k, v in wan_names.items()}}, tmp_path / "self_forcing_dmd.pt")
    loaded = load_dit(tmp_path / "self_forcing_dmd.pt", config=ours.cfg).state_dict()
    assert all(torch.equal(loaded[k], v + 1) for k, v in ours.state_dict().items())
