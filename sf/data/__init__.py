"""Webdataset pipelines: shard helpers and the prompt stream for data-free DMD training."""

from sf.data.prompts import (
    PromptDataConfig,
    PromptStream,
    collate_prompts,
    decode_prompt,
    write_prompt_shards,
)
from sf.data.shards import (
    CorruptSample,
    ShardWriter,
    SkipCounter,
    decode_or_skip,
    decode_tensors,
    encode_tensors,
    iter_samples,
    list_shards,
    safe_decode,
)

__all__ = [
    "CorruptSample",
    "PromptDataConfig",
    "PromptStream",
    "ShardWriter",
    "SkipCounter",
    "collate_prompts",
    "decode_or_skip",
    "decode_prompt",
    "decode_tensors",
    "encode_tensors",
    "iter_samples",
    "list_shards",
    "safe_decode",
    "write_prompt_shards",
]
