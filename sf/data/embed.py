"""`sf-embed`: a prompt file into webdataset prompt shards with the text encoder's features cached.

    sf-embed --model /ckpt/Wan2.1-T2V-1.3B --prompts prompts.txt --out data/prompts_umt5
    torchrun --nproc_per_node=8 -m sf.data.embed --model ... --prompts ... --out ...     # 8 processes

Shard i holds prompts [i * samples_per_shard, (i + 1) * samples_per_shard) as ``txt`` + ``emb.safetensors``
(features trimmed to the prompt's tokens, bf16, and their mask). Rank r of a multi-process run writes the shards
i = r mod world size; each shard is written under a temporary name and renamed when complete, so a re-run (also
after a kill) writes only the shards that are missing. ``embed.json`` records what the shards were made from (the
prompt file's path, size and sha256, the encoder, the text length, the shard count): a re-run against another
prompt file or encoder is refused rather than mixed in. ``prompt_table.safetensors`` holds the features of the
fixed prompts — the negative prompt and the sample prompts — which the trainer, its sample videos and task=ode
read from there, so a run with cached features never loads the encoder.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

import torch

from sf.data.prompts import (
    file_record,
    read_prompt_file,
    write_prompt_shards,
    write_prompt_table,
)

RECORD = "embed.json"
TABLE = "prompt_table.safetensors"


def embed_prompts(
    model: str, prompts_file: str, out_dir: str, *, negative_prompt: str | None = None,
    sample_prompts: list[str] | None = None, samples_per_shard: int = 1000, batch_size: int = 16,
    max_length: int | None = None, rank: int = 0, world_size: int = 1, device: str = "cpu",
    dtype: torch.dtype = torch.float32, progress: bool = True,
) -> dict:
    """Write this rank's missing shards (and, on rank 0, the record and the fixed prompts' table); returns the
    record. `model` is a Wan model directory (UMT5) ; `negative_prompt` defaults to Wan's standard one."""
    from sf.models.text import load_umt5
    from sf.models.wan import WAN_NEGATIVE_PROMPT, WAN_TEXT_LENGTH

    out = Path(out_dir)
    prompts = read_prompt_file(prompts_file)
    negative = WAN_NEGATIVE_PROMPT if negative_prompt is None else negative_prompt
    samples = list(sample_prompts or prompts[:4])
    num_shards = -(-len(prompts) // samples_per_shard)
    record = {"source": file_record(prompts_file), "prompts": len(prompts), "model": str(Path(model).resolve()),
              "max_length": max_length or WAN_TEXT_LENGTH, "samples_per_shard": samples_per_shard,
              "shards": num_shards, "negative_prompt": negative, "sample_prompts": samples}
    _check_record(out / RECORD, record)

    todo = [i for i in range(rank, num_shards, world_size) if not (out / _shard_name(i)).exists()]
    table_missing = rank == 0 and not (out / TABLE).exists()
    if not todo and not table_missing:
        return record
    encoder = load_umt5(model, device=device, dtype=dtype, max_length=record["max_length"])
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        (out / RECORD).write_text(json.dumps(record, indent=1, ensure_ascii=False) + "\n")
    if table_missing:
        fixed = [negative, *samples]
        features, mask = encoder(fixed)
        write_prompt_table(out / TABLE, fixed, features, mask, source=f"UMT5 of {record['model']}",
                           sample_prompts=samples)
    for i in todo:
        part = prompts[i * samples_per_shard:(i + 1) * samples_per_shard]
        items = [{"prompt": p, "key": f"{i * samples_per_shard + j:09d}"} for j, p in enumerate(part)]
        tmp = out / f".tmp-{rank}"
        shutil.rmtree(tmp, ignore_errors=True)  # what a killed run of this rank left half-written
        written = write_prompt_shards(items, str(tmp), samples_per_shard=len(items) or 1, encoder=encoder,
                                      batch_size=batch_size, feature_dtype=torch.bfloat16,
                                      prefix=f"shard{i:06d}", progress=progress)
        for k, extra in enumerate(written[1:], start=1):  # the writer's size cap split the shard: keep every part
            os.replace(extra, out / _shard_name(i).replace(".tar", f"-{k}.tar"))
        os.replace(written[0], out / _shard_name(i))  # last: its name marks the shard complete, a re-run skips it
        tmp.rmdir()
    return record


def _shard_name(index: int) -> str:
    return f"prompts-{index:06d}.tar"


def _check_record(path: Path, record: dict) -> None:
    """Shards already in the folder must have been made the same way (else they would be mixed)."""
    if not path.exists():
        return
    old = json.loads(path.read_text())
    for key, what in (("source", "prompt file"), ("model", "model"), ("max_length", "text length"),
                      ("samples_per_shard", "shard size"), ("negative_prompt", "negative prompt"),
                      ("sample_prompts", "set of sample prompts")):
        was, now = old.get(key), record[key]
        if key == "source":
            was, now = (was or {}).get("sha256"), now["sha256"]
        if was != now:
            raise ValueError(f"{path.parent} holds shards made with another {what} (see {path}): use another --out, "
                             f"or delete that folder")


def completeness(shards_dir: str | Path) -> str | None:
    """What is missing from an sf-embed output folder, or None when every recorded shard is there."""
    folder = Path(shards_dir)
    if not (folder / RECORD).exists():
        return None
    record = json.loads((folder / RECORD).read_text())
    missing = [i for i in range(record["shards"]) if not (folder / _shard_name(i)).exists()]
    if missing:
        return f"{len(missing)} of its {record['shards']} shards are missing (first: {_shard_name(missing[0])})"
    if not (folder / TABLE).exists():
        return f"{TABLE} is missing"
    return None


def main(argv: list[str] | None = None) -> None:
    """sf-embed: cache a Wan text encoder's features of a prompt file into prompt shards (see the module doc)."""
    from sf.io import existing_file, one_line_errors, writable_dir

    @one_line_errors
    def run(args) -> None:
        existing_file(Path(args.prompts), "--prompts")
        existing_file(Path(args.model), "--model")
        writable_dir(Path(args.out))
        rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
        record = embed_prompts(args.model, args.prompts, args.out, negative_prompt=args.negative_prompt,
                               sample_prompts=args.sample_prompt, samples_per_shard=args.samples_per_shard,
                               batch_size=args.batch_size, max_length=args.max_length, rank=rank, world_size=world,
                               device=device, dtype=dtype, progress=not args.no_progress)
        if rank == 0:
            print(f"{args.out}: {record['prompts']} prompts in {record['shards']} shards "
                  f"({record['max_length']} tokens), fixed prompts in {TABLE}")

    parser = argparse.ArgumentParser(prog="sf-embed", description=main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--model", required=True, help="a Wan2.1 model directory (diffusers or original layout)")
    parser.add_argument("--prompts", required=True, help="a text file, one prompt per line")
    parser.add_argument("--out", required=True, help="the shards folder (then data.shards=<it>)")
    parser.add_argument("--negative-prompt", default=None, help="default: Wan's standard negative prompt")
    parser.add_argument("--sample-prompt", action="append", default=None,
                        help="a prompt of the sample videos (repeatable; default: the first 4 prompts)")
    parser.add_argument("--samples-per-shard", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=None, help="text tokens (default: Wan's 512)")
    parser.add_argument("--no-progress", action="store_true")
    run(parser.parse_args(argv))


if __name__ == "__main__":
    main()
