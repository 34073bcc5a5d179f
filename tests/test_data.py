"""Prompt shards and PromptStream: exact epochs over ranks/workers, resampling, resume, corrupt data, padding."""

import json
import os
import random
import tarfile

import pytest
import torch

import sf  # noqa: F401  (torchvision fix before open_clip)
from sf.data import (
    CorruptSample,
    PromptDataConfig,
    PromptStream,
    ShardWriter,
    decode_tensors,
    encode_tensors,
    iter_samples,
    list_shards,
    write_prompt_shards,
)
from sf.data.prompts import shuffled

NUM_PROMPTS = 40


def _prompts(n=NUM_PROMPTS):
    return [f"prompt number {i} with {'many ' * (i % 4)}words" for i in range(n)]


def _all_keys(n=NUM_PROMPTS):
    return {f"{i:09d}" for i in range(n)}


@pytest.fixture
def shard_dir(tmp_path):
    """40 prompts in 8 shards of 5."""
    write_prompt_shards(_prompts(), str(tmp_path / "shards"), samples_per_shard=5, progress=False)
    return str(tmp_path / "shards")


def _take(stream, n):
    batches = []
    for batch in stream:
        batches.append(batch)
        if len(batches) == n:
            break
    return batches


def _keys(batches):
    return [key for batch in batches for key in batch["key"]]


# ------------------------------------------------------------------------------------------------- shards helpers


def test_tensor_roundtrip_and_corrupt_payloads():
    tensors = {"features": torch.randn(5, 3).half(), "mask": torch.tensor([True, True, False, True, False])}
    decoded = decode_tensors(encode_tensors(tensors))
    assert set(decoded) == {"features", "mask"}
    assert decoded["features"].dtype == torch.float16 and torch.equal(decoded["features"], tensors["features"])
    assert decoded["mask"].dtype == torch.bool and torch.equal(decoded["mask"], tensors["mask"])
    payload = encode_tensors(tensors)
    for bad in (b"garbage", payload[:20], payload[: len(payload) - 3], b""):
        with pytest.raises(CorruptSample):
            decode_tensors(bad)


def test_list_shards_specs(shard_dir, tmp_path):
    expected = [os.path.join(shard_dir, f"prompts-{i:06d}.tar") for i in range(8)]
    assert list_shards(shard_dir) == expected
    assert list_shards(os.path.join(shard_dir, "*.tar")) == expected
    assert list_shards(os.path.join(shard_dir, "prompts-{000002..000004}.tar")) == expected[2:5]
    assert list_shards([expected[3], expected[1]]) == [expected[3], expected[1]]
    assert list_shards(f"{expected[0]}::{expected[7]}") == [expected[0], expected[7]]
    missing = str(tmp_path / "nothing-*.tar")
    with pytest.raises(ValueError, match="nothing-"):
        list_shards(missing)
    with pytest.raises(ValueError, match="nothing-"):
        PromptStream(PromptDataConfig(shards=missing))
    with pytest.raises(ValueError, match="empty shards spec"):
        list_shards("")


def test_write_prompt_shards_layout(tmp_path):
    prompts = [{"prompt": "a red ball", "key": "red", "meta": {"color": "red"}}, "a blue cube", "ünïcode ✓"]
    paths = write_prompt_shards(prompts, str(tmp_path), samples_per_shard=2, progress=False)
    assert [os.path.basename(p) for p in paths] == ["prompts-000000.tar", "prompts-000001.tar"]
    samples = list(iter_samples(paths))
    assert [s["__key__"] for s in samples] == ["red", "000000001", "000000002"]
    assert [s["txt"].decode("utf-8") for s in samples] == ["a red ball", "a blue cube", "ünïcode ✓"]
    assert json.loads(samples[0]["json"]) == {"color": "red"}
    assert all("emb.safetensors" not in s for s in samples)
    with pytest.raises(ValueError, match="duplicate"):
        write_prompt_shards(["a", {"prompt": "b", "key": "000000000"}], str(tmp_path / "dup"), progress=False)


def test_prompt_file_becomes_shards_the_stream_reads(tmp_path):
    from sf.tasks.distill import prepare_prompt_shards

    (tmp_path / "prompts.txt").write_text("first prompt\n\nsecond prompt\nthird\n", encoding="utf-8")
    out = prepare_prompt_shards(str(tmp_path / "prompts.txt"), tmp_path / "run", rank=0)
    cfg = PromptDataConfig(shards=out, batch_size=3, resample=False, shuffle_buffer=0)
    stream = PromptStream(cfg)
    assert [b["prompt"] for b in stream] == [["first prompt", "second prompt", "third"]]


def test_shuffle_buffer_is_bounded():
    pulled = []

    def source():
        for i in range(100):
            pulled.append(i)
            yield i

    out = []
    for item in shuffled(source(), 7, random.Random(0)):
        assert len(pulled) - len(out) <= 7 + 1  # the buffer plus the item being handed out
        out.append(item)
    assert sorted(out) == list(range(100)) and out != list(range(100))


# ------------------------------------------------------------------------------------------------- epochs and splitting


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_epoch_over_two_ranks_covers_dataset_once(shard_dir, num_workers):
    cfg = PromptDataConfig(shards=shard_dir, batch_size=3, num_workers=num_workers, resample=False, seed=3)
    per_rank = [_keys(list(PromptStream(cfg, rank=rank, world_size=2))) for rank in range(2)]
    everything = per_rank[0] + per_rank[1]
    assert len(everything) == len(set(everything)) == NUM_PROMPTS  # no key twice, across ranks or workers
    assert set(everything) == _all_keys()
    assert not set(per_rank[0]) & set(per_rank[1])


def test_ordered_stream_without_shuffle(shard_dir):
    stream = PromptStream(PromptDataConfig(shards=shard_dir, batch_size=4, shuffle_buffer=0, resample=False))
    assert _keys(list(stream)) == sorted(_all_keys())


def test_iterating_a_finished_epoch_starts_the_next(shard_dir):
    stream = PromptStream(PromptDataConfig(shards=shard_dir, batch_size=4, resample=False))
    first, second = _keys(list(stream)), _keys(list(stream))
    assert set(first) == set(second) == _all_keys() and first != second
    assert stream.epoch == 1


def test_resampled_stream_is_endless_reshuffled_and_deterministic(shard_dir):
    cfg = PromptDataConfig(shards=shard_dir, batch_size=4, resample=True, seed=5)
    keys = _keys(_take(PromptStream(cfg), 30))  # 120 samples = 3 epochs of 40
    epochs = [keys[i * NUM_PROMPTS : (i + 1) * NUM_PROMPTS] for i in range(3)]
    assert all(set(epoch) == _all_keys() for epoch in epochs)  # batches span epochs, every epoch is complete
    assert epochs[0] != epochs[1] != epochs[2]
    assert keys == _keys(_take(PromptStream(cfg), 30))
    other_seed = PromptDataConfig(shards=shard_dir, batch_size=4, resample=True, seed=6)
    assert keys != _keys(_take(PromptStream(other_seed), 30))


# ------------------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("num_workers,resample", [(0, True), (2, True), (2, False)])
def test_resume_continues_with_exactly_the_next_batches(shard_dir, num_workers, resample):
    cfg = PromptDataConfig(shards=shard_dir, batch_size=3, num_workers=num_workers, resample=resample, seed=1)
    reference = _take(PromptStream(cfg, rank=1, world_size=2), 12)  # 20 samples per rank: 7 batches per epoch
    stream = PromptStream(cfg, rank=1, world_size=2)
    head = _take(stream, 7)
    state = json.loads(json.dumps(stream.state_dict()))  # small and JSON-able
    resumed = PromptStream(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    tail = _take(resumed, 5)
    assert _keys(head) == _keys(reference[:7])
    assert _keys(tail) == _keys(reference[7:12])
    assert resumed.batches == 7 + len(tail)
    if not resample:  # 20 samples per rank; one epoch ends the iteration
        assert len(reference) == (7 if num_workers == 0 else 8) and len(tail) == len(reference) - 7


def test_resume_in_the_middle_of_a_finite_epoch(shard_dir):
    cfg = PromptDataConfig(shards=shard_dir, batch_size=3, num_workers=2, resample=False, seed=2)
    reference = list(PromptStream(cfg))
    stream = PromptStream(cfg)
    _take(stream, 5)
    resumed = PromptStream(cfg)
    resumed.load_state_dict(stream.state_dict())
    assert _keys(list(resumed)) == _keys(reference[5:])


def test_load_state_checks_rank_and_warns_on_new_layout(shard_dir):
    cfg = PromptDataConfig(shards=shard_dir, batch_size=2)
    stream = PromptStream(cfg, rank=0, world_size=2)
    _take(stream, 3)
    with pytest.raises(ValueError, match="rank 0 loaded on rank 1"):
        PromptStream(cfg, rank=1, world_size=2).load_state_dict(stream.state_dict())
    single = PromptStream(cfg)
    with pytest.warns(UserWarning, match="layout changed"):
        single.load_state_dict(stream.state_dict())
    assert single.epoch == 1 and single.batches == 3


# ------------------------------------------------------------------------------------------------- corrupt data


def _write_corrupt_dataset(root):
    """Two good shards, one shard with 6 corrupt samples, one truncated tar, one non-tar file."""
    good = {f"good{i:02d}": f"good prompt {i}" for i in range(12)}
    items = list(good.items())
    emb = encode_tensors({"features": torch.randn(4, 8), "mask": torch.tensor([True, True, True, False])})
    ones = torch.ones(2, 8)
    with ShardWriter(str(root), "a", samples_per_shard=5, progress=False) as writer:
        for key, prompt in items[:10]:
            writer.write({"__key__": key, "txt": prompt, "emb.safetensors": emb})
    bad = [
        {"__key__": "bad_utf8", "txt": b"\xff\xfe broken", "emb.safetensors": emb},
        {"__key__": "bad_emb_garbage", "txt": "fine", "emb.safetensors": b"not safetensors at all"},
        {"__key__": "bad_emb_truncated", "txt": "fine", "emb.safetensors": emb[:30]},
        {"__key__": "bad_emb_no_mask", "txt": "fine", "emb.safetensors": encode_tensors({"features": ones})},
        {"__key__": "bad_emb_nan", "txt": "fine", "emb.safetensors": encode_tensors(
            {"features": torch.full((2, 8), float("nan")), "mask": torch.ones(2, dtype=torch.bool)})},
        {"__key__": "bad_no_txt", "json": {"meta": 1}},
    ]
    with ShardWriter(str(root), "b", samples_per_shard=100, progress=False) as writer:
        writer.write({"__key__": items[10][0], "txt": items[10][1], "emb.safetensors": emb})
        for sample in bad:
            writer.write(sample)
        writer.write({"__key__": items[11][0], "txt": items[11][1], "emb.safetensors": emb})
    # a tar cut inside its third sample: the first two samples survive, the rest of the shard is one error
    with ShardWriter(str(root), "c", samples_per_shard=100, progress=False) as writer:
        for i in range(3):
            writer.write({"__key__": f"cut{i}", "txt": f"cut prompt {i} " * 50, "emb.safetensors": emb})
    cut = root / "c-000000.tar"
    data = cut.read_bytes()
    with tarfile.open(cut) as tar:
        third = [m for m in tar.getmembers() if m.name.startswith("cut2")][0]
    cut.write_bytes(data[: third.offset_data + 10])
    good.update({"cut0": None, "cut1": None})
    (root / "d-000000.tar").write_bytes(b"this is not a tar file" * 40)
    return set(good), len(bad) + 2


@pytest.mark.parametrize("num_workers", [0, 2])
def test_corrupt_samples_are_counted_and_skipped(tmp_path, num_workers):
    good, num_bad = _write_corrupt_dataset(tmp_path)
    assert len(list_shards(str(tmp_path))) == 5
    cfg = PromptDataConfig(shards=str(tmp_path), batch_size=4, num_workers=num_workers, resample=False)
    stream = PromptStream(cfg)
    batches = list(stream)
    assert set(_keys(batches)) == good and len(_keys(batches)) == len(good)
    assert stream.num_skipped == num_bad == 8
    assert batches[-1]["num_skipped"] == num_bad
    assert [b["num_skipped"] for b in batches] == sorted(b["num_skipped"] for b in batches)  # running total


def test_skip_count_survives_resume(tmp_path):
    _write_corrupt_dataset(tmp_path)
    cfg = PromptDataConfig(shards=str(tmp_path), batch_size=2, resample=True, seed=4)
    reference = _take(PromptStream(cfg), 20)
    stream = PromptStream(cfg)
    _take(stream, 9)
    resumed = PromptStream(cfg)
    resumed.load_state_dict(stream.state_dict())
    tail = _take(resumed, 11)
    assert _keys(tail) == _keys(reference[9:])
    assert [b["num_skipped"] for b in tail] == [b["num_skipped"] for b in reference[9:]]
    assert reference[-1]["num_skipped"] > 8  # the endless stream met the corrupt samples again in later epochs


def test_all_corrupt_endless_stream_raises_instead_of_hanging(tmp_path):
    (tmp_path / "x-000000.tar").write_bytes(b"garbage" * 100)
    with pytest.raises(ValueError, match="no valid prompt sample"):
        next(iter(PromptStream(PromptDataConfig(shards=str(tmp_path), resample=True))))


def test_config_errors(shard_dir):
    with pytest.raises(ValueError, match="batch_size"):
        PromptStream(PromptDataConfig(shards=shard_dir, batch_size=0))
    with pytest.raises(ValueError, match="rank 2"):
        PromptStream(PromptDataConfig(shards=shard_dir), rank=2, world_size=2)
    with pytest.raises(ValueError, match="need at least 12"):
        PromptStream(PromptDataConfig(shards=shard_dir, num_workers=3), rank=0, world_size=4)


# ------------------------------------------------------------------------------------------------- cached embeddings


def test_cached_features_are_padded_per_batch(tmp_path):
    lengths = [3, 7, 5, 1, 6]
    tensors = [torch.randn(n, 16) for n in lengths]
    with ShardWriter(str(tmp_path), "emb", progress=False) as writer:
        for i, features in enumerate(tensors):
            mask = torch.ones(len(features), dtype=torch.bool)
            embedding = {"features": features.half(), "mask": mask}
            writer.write({"__key__": f"k{i}", "txt": f"p{i}", "emb.safetensors": embedding})
    cfg = PromptDataConfig(shards=str(tmp_path), batch_size=5, shuffle_buffer=0, resample=False)
    (batch,) = list(PromptStream(cfg))
    assert set(batch) == {"key", "prompt", "features", "mask", "num_skipped"}
    assert batch["features"].shape == (5, 7, 16) and batch["features"].dtype == torch.float32
    assert batch["mask"].dtype == torch.bool and batch["mask"].sum(1).tolist() == lengths
    for row, features in enumerate(tensors):
        n = lengths[row]
        assert torch.equal(batch["features"][row, :n], features.half().float())
        assert batch["mask"][row, :n].all() and not batch["mask"][row, n:].any()
        assert (batch["features"][row, n:] == 0).all()


def test_mixed_batches_carry_prompts_only(tmp_path):
    with ShardWriter(str(tmp_path), "mix", progress=False) as writer:
        embedding = {"features": torch.ones(2, 4), "mask": torch.ones(2, dtype=torch.bool)}
        writer.write({"__key__": "a", "txt": "with", "emb.safetensors": embedding})
        writer.write({"__key__": "b", "txt": "without"})
    (batch,) = list(PromptStream(PromptDataConfig(shards=str(tmp_path), batch_size=2, resample=False)))
    assert set(batch) == {"key", "prompt", "num_skipped"} and sorted(batch["prompt"]) == ["with", "without"]
