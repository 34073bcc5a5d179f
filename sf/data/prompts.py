"""Prompt data for DMD training (data-free: prompts only, optionally with cached text embeddings).

Shards hold samples ``{__key__, txt, [emb.safetensors], [json]}`` where ``emb.safetensors`` stores ``features``
(L, D) and ``mask`` (L,) bool. `PromptStream` turns them into batches

    {"key": list[str], "prompt": list[str],
     "num_skipped": int,                                       # corrupt samples skipped so far on this rank
     "features": (B, L, D) float32, "mask": (B, L) bool}      # the last two only when every sample has them

with node and worker splitting, seeded shuffling, infinite resampling and an exactly resumable position.
Resampled streams give full batches that run on across epochs; a finite epoch's last batch may be short.

How the order is defined (and why resume is exact): a stream has ``world_size x max(1, num_workers)`` *slots*.
In epoch e every rank permutes the shard list with the same seeded RNG (seed, e), takes every world_size-th
shard, and each worker every num_workers-th of those: the slots partition the shards. A slot reads its shards
in that order through a shuffle buffer seeded by (seed, e, rank, worker). A slot's position is (epoch, number of
samples of that epoch's shuffled stream already consumed); the main process takes batches from the workers in a
fixed rotation. Saving the positions, the rotation and the counters is enough to rebuild the same future:
a resumed slot re-reads its epoch and skips the consumed samples (cheap for prompt data) before batching again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
import warnings
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from sf.data.shards import (
    CorruptSample,
    ShardWriter,
    SkipCounter,
    decode_tensors,
    decode_text,
    iter_samples,
    list_shards,
    safe_decode,
)

EMBEDDING = "emb.safetensors"  # tar member holding the cached text features of a sample
_STATE_VERSION = 1


@dataclass
class PromptDataConfig:
    """Where the prompt shards are and how to stream them."""

    shards: str = ""  # a directory of *.tar, a glob, a brace pattern, or several joined with '::'
    batch_size: int = field(default=1, metadata={"min": 1})
    num_workers: int = field(default=0, metadata={"min": 0})  # DataLoader worker processes; 0: in the training process
    shuffle_buffer: int = field(default=100, metadata={"min": 0})  # samples held for shuffling; <= 1 keeps the order
    resample: bool = True  # True: endless stream, reshuffled every epoch; False: one epoch per iteration
    seed: int = 0


# ----------------------------------------------------------------------------------------------------------- writing


def write_prompt_shards(
    prompts: Iterable[str | dict[str, Any]],
    out_dir: str,
    samples_per_shard: int = 1000,
    encoder: torch.nn.Module | None = None,
    batch_size: int = 64,
    feature_dtype: torch.dtype = torch.float16,
    prefix: str = "prompts",
    progress: bool = True,
) -> list[str]:
    """Write prompts into ``<prefix>-%06d.tar`` shards; with an encoder, cache its token features in each sample.

    A prompt is a string or a dict ``{"prompt": str, "key": str (optional), "meta": dict (optional)}``; keys
    default to the running index. Cached features are trimmed to the last real token and stored as
    `feature_dtype`. Returns the shard paths.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    total = len(prompts) if hasattr(prompts, "__len__") else None
    seen_keys: set[str] = set()
    with ShardWriter(out_dir, prefix, samples_per_shard, total=total, progress=progress) as writer:
        for chunk in _chunks(_prompt_items(prompts, seen_keys), batch_size):
            embeddings = _cache_embeddings(encoder, [item["prompt"] for item in chunk], feature_dtype)
            for item, embedding in zip(chunk, embeddings):
                sample = {"__key__": item["key"], "txt": item["prompt"]}
                if embedding is not None:
                    sample[EMBEDDING] = embedding
                if item.get("meta") is not None:
                    sample["json"] = item["meta"]
                writer.write(sample)
    return writer.paths


def _prompt_items(prompts: Iterable[str | dict[str, Any]], seen_keys: set[str]) -> Iterator[dict[str, Any]]:
    """Normalise prompts into dicts with a unique key."""
    for index, prompt in enumerate(prompts):
        item = {"prompt": prompt} if isinstance(prompt, str) else dict(prompt)
        if not isinstance(item.get("prompt"), str):
            raise ValueError(f"prompt #{index} must be a str or a dict with a str 'prompt', got {prompt!r}")
        item["key"] = str(item.get("key", f"{index:09d}"))
        if item["key"] in seen_keys:
            raise ValueError(f"duplicate prompt key {item['key']!r}")
        seen_keys.add(item["key"])
        yield item


def _chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` items (the last one shorter)."""
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


@torch.no_grad()
def _cache_embeddings(
    encoder: torch.nn.Module | None, prompts: list[str], dtype: torch.dtype
) -> list[dict[str, torch.Tensor] | None]:
    """Per prompt: its features up to the last real token and their mask, or None without an encoder."""
    if encoder is None:
        return [None] * len(prompts)
    return trimmed_rows(*encoder(prompts), dtype)


def trimmed_rows(features: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Per row of features (B, L, D) / mask (B, L): {"features" (l, D) in `dtype`, "mask" (l,)} up to its last real
    token (what shards store; `collate_prompts` pads them back)."""
    rows = []
    for row_features, row_mask in zip(features, mask):
        real = row_mask.nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        rows.append({"features": row_features[:length].to(dtype).contiguous(), "mask": row_mask[:length].clone()})
    return rows


# ----------------------------------------------------------------------------------------------------------- decoding


def decode_prompt(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw sample -> {"key", "prompt", ["features" (L, D), "mask" (L,)]}; raises CorruptSample on bad data."""
    decoded = {"key": sample["__key__"], "prompt": decode_text(sample)}
    if EMBEDDING in sample:
        decoded["features"], decoded["mask"] = check_embedding(decode_tensors(sample[EMBEDDING]))
    return decoded


def check_embedding(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Validate cached features/mask and zero the features at padding."""
    features, mask = tensors.get("features"), tensors.get("mask")
    if features is None or mask is None:
        raise CorruptSample(f"embedding needs 'features' and 'mask', got {sorted(tensors)}")
    if features.ndim != 2 or not features.is_floating_point():
        raise CorruptSample(f"features must be a (L, D) float tensor, got {tuple(features.shape)} {features.dtype}")
    if mask.dtype != torch.bool or mask.shape != features.shape[:1]:
        raise CorruptSample(f"mask must be (L,)={tuple(features.shape[:1])} bool, got {tuple(mask.shape)} {mask.dtype}")
    if not torch.isfinite(features).all():
        raise CorruptSample("features contain inf or nan")
    return features.masked_fill(~mask[:, None], 0), mask


def collate_prompts(samples: list[dict[str, Any]]) -> dict[str, Any]:
    """Decoded samples -> batch; features are padded to the longest sample (mask False, features 0 there)."""
    batch: dict[str, Any] = {"key": [s["key"] for s in samples], "prompt": [s["prompt"] for s in samples]}
    if not all("features" in s for s in samples):
        return batch  # mixed cached/uncached batches carry prompts only; encoders fall back to the text
    dims = {s["features"].shape[1] for s in samples}
    if len(dims) != 1:
        raise ValueError(f"cached text features of different widths {sorted(dims)} in one batch: {batch['key']}")
    length = max(s["features"].shape[0] for s in samples)
    features = torch.zeros(len(samples), length, dims.pop())  # (B, L, D)
    mask = torch.zeros(len(samples), length, dtype=torch.bool)  # (B, L)
    for row, sample in enumerate(samples):
        n = sample["features"].shape[0]
        features[row, :n] = sample["features"].float()
        mask[row, :n] = sample["mask"]
    batch["features"], batch["mask"] = features, mask
    return batch


def read_prompt_file(path: str | Path) -> list[str]:
    """The prompts of a text file, one per line (blank lines skipped); ValueError naming the file (and the line)
    when it is missing, not UTF-8, or holds no prompt."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {path} does not exist")
    prompts = []
    for number, raw in enumerate(path.read_bytes().splitlines(), 1):
        try:
            line = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exn:
            raise ValueError(f"prompt file {path}, line {number}: not UTF-8 text ({exn.reason} at byte "
                             f"{exn.start})") from None
        if line:
            prompts.append(line)
    if not prompts:
        raise ValueError(f"prompt file {path} holds no prompt (only blank lines)")
    return prompts


def file_record(path: str | Path) -> dict[str, Any]:
    """What a file was when something was made from it: its absolute path, size and sha256."""
    path = Path(path).resolve()
    return {"path": str(path), "bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}


def write_prompt_table(path: str | Path, prompts: list[str], features: torch.Tensor, mask: torch.Tensor,
                       source: str, dtype: torch.dtype = torch.bfloat16, sample_prompts: list[str] = ()) -> Path:
    """Features (N, L, D) and masks (N, L) of fixed prompts (the negative prompt, sample prompts) as one safetensors
    file: each trimmed to its real tokens, with the prompts, their encoder, length L and which of them the sample
    videos show in the metadata."""
    unknown = [p for p in sample_prompts if p not in prompts]
    if unknown:
        raise ValueError(f"sample prompts {unknown[:2]} are not among the table's prompts")
    from safetensors.torch import save_file

    tensors = {}
    for i, row in enumerate(trimmed_rows(features, mask, dtype)):
        tensors[f"{i}.features"], tensors[f"{i}.mask"] = row["features"], row["mask"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"prompts": json.dumps(list(prompts), ensure_ascii=False), "encoder": source,
            "max_length": str(features.shape[1]), "width": str(features.shape[2]),
            "sample_prompts": json.dumps(list(sample_prompts), ensure_ascii=False)}
    save_file(tensors, str(path), metadata=meta)
    return path


def read_prompt_table(path: str | Path) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, str]]:
    """{prompt: (features (L, D), mask (L,))} of a prompt table, and its metadata (encoder, max_length, width,
    sample_prompts: JSON)."""
    from sf.io import read_safetensors

    tensors, meta = read_safetensors(path)
    try:
        prompts = json.loads(meta["prompts"])
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: not a prompt table (no prompts in its metadata: {e})") from None
    return {p: (tensors[f"{i}.features"].float(), tensors[f"{i}.mask"]) for i, p in enumerate(prompts)}, meta


def prompt_features(encoder: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features (B, L, D) and mask (B, L) of a batch: its cached features when it carries them (fitted to the
    encoder's `max_length`), else the encoder's features of its prompts."""
    if "features" in batch:
        from sf.models.text import fit_length

        return fit_length(batch["features"], batch["mask"], encoder.max_length)
    return encoder(batch["prompt"])


# ----------------------------------------------------------------------------------------------------------- one slot


def _rng(*parts: Any) -> random.Random:
    """A Random seeded from the parts (string seeding is stable across processes and runs)."""
    return random.Random(":".join(str(part) for part in parts))


def shuffled(items: Iterable[Any], buffer_size: int, rng: random.Random) -> Iterator[Any]:
    """Approximate shuffle through a buffer of at most `buffer_size` items (memory stays bounded)."""
    buffer: list[Any] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        index = rng.randrange(buffer_size)
        yield buffer[index]
        buffer[index] = item
    rng.shuffle(buffer)
    yield from buffer


class _SlotBatches(IterableDataset):
    """Batches of one rank, one per DataLoader worker slot, tagged with the slot's position after each batch.

    Yields batch dicts with ``_worker``, ``_position`` ([epoch, consumed]) and ``num_skipped`` (corrupt samples
    met since the previous batch of this slot); a finite slot ends with ``{"_end": True, ...}``.
    """

    def __init__(self, shards: list[str], cfg: PromptDataConfig, rank: int, world_size: int, starts: list[list[int]]):
        super().__init__()
        self.shards, self.cfg, self.rank, self.world_size = shards, cfg, rank, world_size
        self.starts = [list(start) for start in starts]

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        assert num_workers == len(self.starts), (num_workers, len(self.starts))
        yield from self.slot_batches(worker, num_workers)

    def slot_shards(self, epoch: int, worker: int, num_workers: int) -> list[str]:
        """This slot's shards in epoch `epoch`: a seeded permutation split by rank, then by worker."""
        shards = list(self.shards)
        if self.cfg.shuffle_buffer > 1:
            _rng(self.cfg.seed, "shards", epoch).shuffle(shards)  # identical on every rank and worker
        return shards[self.rank :: self.world_size][worker::num_workers]

    def _epoch_samples(self, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Raw samples (and error markers) of one epoch of this slot, shuffled."""
        shards = self.slot_shards(epoch, worker, num_workers)
        samples = iter_samples(shards)
        if self.cfg.shuffle_buffer > 1:
            rng = _rng(self.cfg.seed, "buffer", epoch, self.rank, worker)
            samples = shuffled(samples, self.cfg.shuffle_buffer, rng)
        return samples

    def _positioned_samples(self, worker: int, num_workers: int) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(epoch, index in epoch, raw sample) from the slot's start position on, skipping what was consumed."""
        start_epoch, start_index = self.starts[worker]
        epochs = itertools.count(start_epoch) if self.cfg.resample else [start_epoch]
        for epoch in epochs:
            count = 0
            for index, sample in enumerate(self._epoch_samples(epoch, worker, num_workers)):
                count += 1
                if epoch == start_epoch and index < start_index:
                    continue  # fast-forward of a resumed slot: no decoding
                yield epoch, index, sample
            if count == 0 and self.cfg.resample:
                shards = self.slot_shards(epoch, worker, num_workers)
                raise ValueError(f"prompt shards {shards} hold no sample: an endless stream would never yield")

    def slot_batches(self, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
        """Batches of decoded samples; each carries the slot position after it and the skips since the last one."""
        skipped = SkipCounter()
        reported = 0
        pending: list[dict[str, Any]] = []
        position = list(self.starts[worker])
        for position, sample in self._decoded(worker, num_workers, skipped):
            if sample is not None:
                pending.append(sample)
            if len(pending) == self.cfg.batch_size:
                yield _tagged(collate_prompts(pending), worker, position, skipped.count - reported)
                pending, reported = [], skipped.count
        if pending:  # only a finite stream ends: its last batch may be short
            yield _tagged(collate_prompts(pending), worker, position, skipped.count - reported)
            reported = skipped.count
        yield _tagged({"_end": True}, worker, position, skipped.count - reported)

    def _decoded(
        self, worker: int, num_workers: int, skipped: SkipCounter
    ) -> Iterator[tuple[list[int], dict[str, Any] | None]]:
        """(position after the sample, decoded sample or None when skipped), guarding against all-corrupt epochs."""
        epoch_seen, epoch_good, epoch_whole = None, 0, False
        for epoch, index, raw in self._positioned_samples(worker, num_workers):
            if epoch != epoch_seen:
                if epoch_whole and epoch_good == 0:
                    self._no_valid_sample(epoch_seen, worker, num_workers)
                epoch_seen, epoch_good, epoch_whole = epoch, 0, index == 0
            sample = safe_decode(raw, decode_prompt, skipped)
            epoch_good += sample is not None
            yield [epoch, index + 1], sample

    def _no_valid_sample(self, epoch: int, worker: int, num_workers: int) -> None:
        """An endless stream whose whole epoch was corrupt would spin forever: stop with a clear message."""
        shards = self.slot_shards(epoch, worker, num_workers)
        raise ValueError(f"no valid prompt sample in shards {shards} (epoch {epoch}): all were corrupt")


def _tagged(item: dict[str, Any], worker: int, position: list[int], num_skipped: int) -> dict[str, Any]:
    """Attach the bookkeeping the main process needs to hand batches out in order and to resume."""
    item.update(_worker=worker, _position=position, num_skipped=num_skipped)
    return item


# ----------------------------------------------------------------------------------------------------------- stream


class PromptStream:
    """Iterable of prompt batches for one rank; see the module docstring for the order and the resume logic."""

    def __init__(self, cfg: PromptDataConfig, rank: int = 0, world_size: int = 1):
        _check_config(cfg, rank, world_size)
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.shards = list_shards(cfg.shards)
        self.num_slots = max(1, cfg.num_workers)
        if len(self.shards) < world_size * self.num_slots:
            raise ValueError(
                f"shards {cfg.shards!r} give {len(self.shards)} shards but {world_size} ranks x {self.num_slots} "
                f"workers need at least {world_size * self.num_slots}: write smaller shards or use fewer workers"
            )
        self.batches = 0  # batches handed out so far
        self.num_skipped = 0  # corrupt samples met so far (also in every batch as "num_skipped")
        self._start_epoch(0)

    @property
    def epoch(self) -> int:
        """The oldest epoch any worker slot is still reading."""
        return min(epoch for epoch, _ in self._positions)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if not any(self._active):  # a finished finite epoch: iterating again starts the next one
            self._start_epoch(max(epoch for epoch, _ in self._positions) + 1)
        slots = _SlotBatches(self.shards, self.cfg, self.rank, self.world_size, self._positions)
        if self.cfg.num_workers == 0:
            return self._in_rotation(slots.slot_batches(0, 1))
        loader = DataLoader(slots, batch_size=None, num_workers=self.cfg.num_workers)
        return self._in_rotation(iter(loader))

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-able position: per-slot (epoch, samples consumed), the rotation, the counters."""
        return {
            "version": _STATE_VERSION,
            "rank": self.rank,
            "layout": self._layout(),
            "positions": [list(position) for position in self._positions],
            "active": list(self._active),
            "next_worker": self._next_worker,
            "batches": self.batches,
            "num_skipped": self.num_skipped,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where `state` was taken; a changed layout restarts at a fresh epoch (with a warning)."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown PromptStream state version {state.get('version')!r}")
        if state["rank"] != self.rank:
            raise ValueError(f"PromptStream state of rank {state['rank']} loaded on rank {self.rank}")
        self.batches, self.num_skipped = int(state["batches"]), int(state["num_skipped"])
        if state["layout"] != self._layout():
            warnings.warn(
                f"prompt data layout changed ({state['layout']} -> {self._layout()}): "
                "the position cannot be kept exactly, restarting at the next epoch",
                stacklevel=2,
            )
            self._start_epoch(max(epoch for epoch, _ in state["positions"]) + 1)
            return
        self._positions = [list(position) for position in state["positions"]]
        self._active = list(state["active"])
        self._next_worker = int(state["next_worker"])

    def _layout(self) -> dict[str, Any]:
        """What the saved positions depend on."""
        return {
            "world_size": self.world_size,
            "num_workers": self.cfg.num_workers,
            "num_shards": len(self.shards),
            "seed": self.cfg.seed,
            "shuffle_buffer": self.cfg.shuffle_buffer,
            "resample": self.cfg.resample,
        }

    def _start_epoch(self, epoch: int) -> None:
        """Every slot at the start of `epoch`, rotation at worker 0."""
        self._positions = [[epoch, 0] for _ in range(self.num_slots)]
        self._active = [True] * self.num_slots
        self._next_worker = 0

    def _in_rotation(self, items: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        """Hand out batches worker by worker in a fixed rotation, whatever order the loader delivers them in."""
        pending: list[deque] = [deque() for _ in range(self.num_slots)]
        while any(self._active):
            worker = self._next_worker
            while not pending[worker]:
                item = next(items, None)
                assert item is not None, "a prompt worker stopped without its end marker"
                pending[item["_worker"]].append(item)
            batch = self._account(pending[worker].popleft())
            if batch is not None:
                self.batches += 1
                yield batch

    def _account(self, item: dict[str, Any]) -> dict[str, Any] | None:
        """Record a slot's new position and skip count; None for an end marker."""
        worker = item.pop("_worker")
        self._positions[worker] = list(item.pop("_position"))
        self.num_skipped += int(item["num_skipped"])
        ended = item.pop("_end", False)
        if ended:
            self._active[worker] = False
        self._next_worker = self._following_worker(worker)
        if ended:
            return None
        item["num_skipped"] = self.num_skipped
        return item

    def _following_worker(self, worker: int) -> int:
        """The next active slot after `worker` in the rotation (itself when it is the only one left)."""
        for step in range(1, self.num_slots + 1):
            candidate = (worker + step) % self.num_slots
            if self._active[candidate]:
                return candidate
        return worker


def _check_config(cfg: PromptDataConfig, rank: int, world_size: int) -> None:
    """Reject values that cannot work, with the field's name."""
    if cfg.batch_size < 1:
        raise ValueError(f"data batch_size must be >= 1, got {cfg.batch_size}")
    if cfg.num_workers < 0:
        raise ValueError(f"data num_workers must be >= 0, got {cfg.num_workers}")
    if cfg.shuffle_buffer < 0:
        raise ValueError(f"data shuffle_buffer must be >= 0, got {cfg.shuffle_buffer}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a world of size {world_size}")
