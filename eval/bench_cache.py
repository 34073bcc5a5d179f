"""Benchmark: time per chunk vs chunk index for the three ways of giving a causal student its context.

  kv        growing KV cache: each chunk attends to every earlier chunk's cached keys/values
  rolling   window + sink cache: fixed size, so per-chunk cost must stay flat however long the video
  recompute no cache: the whole prefix is re-run through the block-causal masked forward for every chunk

Each chunk costs one forward that also writes the cache (what streaming generation does per denoising step).
Reports the median over repeats per chunk index, checks the targets, writes JSON and a PNG plot.

    python -m eval.bench_cache --flavor tiny --chunks 64 --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import sf  # noqa: F401
from sf.models import CausalConfig, VideoDiT, dit_config


def time_chunks(model, causal, num_chunks, latent_hw, text_len, mode, repeats):
    """Median seconds of each chunk's forward, indexed by chunk (1-based in the report)."""
    fpb = causal.frames_per_block
    h, w = latent_hw
    ctx = torch.randn(1, text_len, model.cfg.text_dim)
    x = torch.randn(1, num_chunks * fpb, model.cfg.in_channels, h, w)
    t = torch.full((1, num_chunks * fpb), 500.0)
    samples = [[] for _ in range(num_chunks)]
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(causal)
            for i in range(num_chunks):
                s, e = i * fpb, (i + 1) * fpb
                start = time.perf_counter()
                if mode == "recompute":
                    model(x[:, :e], t[:, :e], ctx, causal=causal)
                else:
                    model(x[:, s:e], t[:, s:e], ctx, cache=cache, update_cache=True)
                samples[i].append(time.perf_counter() - start)
    return [statistics.median(s) for s in samples]


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=120)
    for mode, times in results.items():
        ax.plot(range(1, len(times) + 1), [1000 * s for s in times], marker=".", label=mode)
    ax.set_xlabel("chunk index")
    ax.set_ylabel("ms per chunk (median)")
    ax.set_yscale("log")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="tiny", help="DiT flavor (debug, tiny, ...)")
    parser.add_argument("--chunks", type=int, default=64, help="chunks for the kv and rolling caches")
    parser.add_argument("--recompute-chunks", type=int, default=16, help="chunks for the no-cache baseline")
    parser.add_argument("--frames-per-block", type=int, default=3)
    parser.add_argument("--window", type=int, default=9, help="local_attn_frames of the rolling cache")
    parser.add_argument("--sink", type=int, default=3, help="sink_frames of the rolling cache")
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8), help="latent height and width")
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--out", type=Path, default=Path("docs/figures"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    model = VideoDiT(dit_config(args.flavor)).eval()
    fpb = args.frames_per_block
    modes = {
        "kv": (CausalConfig(fpb), args.chunks),
        "rolling": (CausalConfig(fpb, local_attn_frames=args.window, sink_frames=args.sink), args.chunks),
        "recompute": (CausalConfig(fpb), args.recompute_chunks),
    }
    time_chunks(model, modes["kv"][0], 4, args.latent_hw, args.text_len, "kv", 1)  # warm-up
    results = {}
    for mode, (causal, chunks) in modes.items():
        results[mode] = time_chunks(model, causal, chunks, args.latent_hw, args.text_len, mode, args.repeats)
        print(f"{mode:>9}: chunk 1 {1000 * results[mode][0]:.2f} ms, chunk {chunks} {1000 * results[mode][-1]:.2f} ms")

    n = args.recompute_chunks
    rolling_flatness = results["rolling"][args.chunks - 1] / results["rolling"][3]
    kv_speedup = results["recompute"][n - 1] / results["kv"][n - 1]
    summary = {
        "flavor": args.flavor,
        "latent_hw": list(args.latent_hw),
        "frames_per_block": fpb,
        "window": args.window,
        "sink": args.sink,
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        f"rolling_chunk{args.chunks}_over_chunk4": round(rolling_flatness, 3),
        f"recompute_over_kv_at_chunk{n}": round(kv_speedup, 2),
        "targets_met": {"rolling_flat_within_10pct": abs(rolling_flatness - 1) <= 0.10, "kv_5x_at_16": kv_speedup >= 5},
        "ms_per_chunk": {m: [round(1000 * s, 3) for s in ts] for m, ts in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"bench_cache_{args.flavor}.json").write_text(json.dumps(summary, indent=1))
    title = f"{args.flavor}: {fpb} frames/chunk, {args.latent_hw[0]}x{args.latent_hw[1]} latents, window {args.window} + sink {args.sink}"
    plot(results, args.out / f"bench_cache_{args.flavor}.png", title)
    print(json.dumps({k: v for k, v in summary.items() if k != "ms_per_chunk"}, indent=1))
    return summary


if __name__ == "__main__":
    main()
