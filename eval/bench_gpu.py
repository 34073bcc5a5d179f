"""Benchmark: the Wan-1.3B shape on one GPU, random weights. One command, one JSON (printed, and written into --out):

1. Streaming inference (`sf.generate.stream_timed`, what sf-generate runs): 480x832 video, 21 latent frames
   (81 frames) in chunks of 3, the 4-step student, bf16; first-chunk latency and frames per second with the
   DiT alone and with each chunk decoded by the Wan2.1 VAE's causal decoder (random weights, the released
   architecture). The median of --stream-repeats after one warm-up video.
2. One generator step and one critic step of the distillation itself: `sf.tasks.distill.DistillJob` built
   from experiment=wan1.3b_selfforcing (teacher, generator and critic at wan-1.3b, DeepSpeed ZeRO-2 bf16 engines
   with their fp32 masters, the recipe's activation checkpointing, 512 text tokens), on one rank. For each: wall
   time, peak GPU memory, and achieved TFLOP/s (FLOPs counted by torch.utils.flop_counter on the same step,
   whose exit step is a function of the step index) against a bf16 matmul peak measured in the same run.

    python -m eval.bench_gpu --out docs/figures                 # the GPU run (meant to fit 8 minutes; not yet measured)
    python -m eval.bench_gpu --tiny --out /tmp/b                # the same code at toy size on the CPU (the test)

Targets (docs/benchmarks.md): stream faster than the 17 FPS and 0.69 s first-chunk latency the Self-Forcing paper
reports for its Wan-1.3B student on one H100, decoding included.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import sf  # noqa: F401  (torchvision compatibility before anything imports diffusers)
from eval.bench_train import flop_counter, matmul_peak

TARGETS = {"fps": 17.0, "first_chunk_s": 0.69}  # the reference on one H100, VAE decoding included
WAN = dict(flavor="wan-1.3b", latent_hw=(60, 104), num_frames=21, text_len=512, vae="wan2.1", peak_size=8192)
TINY = dict(flavor="tiny", latent_hw=(4, 4), num_frames=6, text_len=8, vae="world", peak_size=256)


def _sizes(args: argparse.Namespace) -> dict:
    return dict(TINY if args.tiny else WAN)


def _dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


# ----------------------------------------------------------------------------------------------- the job


def build_job(sizes: dict, run_dir: Path, device: torch.device):
    """DistillJob of the Wan recipe at `sizes`, random weights, the text features a random table (no encoder)."""
    from sf import distributed
    from sf.config import compose_config, to_train_config
    from sf.data.prompts import write_prompt_table
    from sf.models.dit import dit_config
    from sf.tasks import Runtime, make_job

    width = dit_config(sizes["flavor"]).text_dim
    prompts = [f"a benchmark prompt number {i}" for i in range(8)]
    (run_dir / "prompts.txt").write_text("\n".join(prompts) + "\n")
    gen = torch.Generator().manual_seed(0)
    table = [""] + prompts  # the negative prompt (empty here) and the training prompts
    write_prompt_table(run_dir / "table.safetensors", table, torch.randn(len(table), sizes["text_len"], width,
                                                                         generator=gen),
                       torch.ones(len(table), sizes["text_len"], dtype=torch.bool), source="random")
    precision = "bf16" if device.type == "cuda" else "fp32"
    overrides = [
        "experiment=wan1.3b_selfforcing", "teacher.checkpoint=random", f"teacher.flavor={sizes['flavor']}",
        f"model.flavor={sizes['flavor']}", f"critic.flavor={sizes['flavor']}", "text.kind=open_clip",
        f"text.table={run_dir / 'table.safetensors'}", f"text.max_length={sizes['text_len']}", "text.negative_prompt=",
        "codec.kind=identity", f"data.shards={run_dir / 'prompts.txt'}", "data.num_workers=0", "logger=jsonl",
        f"task.latent_height={sizes['latent_hw'][0]}", f"task.latent_width={sizes['latent_hw'][1]}",
        f"task.rollout.num_frames={sizes['num_frames']}", f"task.rollout.grad_window_frames={sizes['num_frames']}",
        f"trainer.precision={precision}",
    ]
    cfg = to_train_config(compose_config(overrides))
    d = distributed.init_distributed()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    ds_config = distributed.engine_config(cfg.deepspeed, cfg.data.batch_size, cfg.trainer.grad_accum_steps,
                                          cfg.trainer.grad_clip, dtype == torch.bfloat16)
    return make_job(cfg, Runtime(d, run_dir, dtype, ds_config))


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def time_step(job, role: str, step: int, device: torch.device, peak: float) -> dict:
    """One `role` step at index `step`: wall time and peak memory, then its FLOPs (the same step again, counted)."""
    from sf.generate import Clock

    run = job.generator_step if role == "generator" else job.critic_step
    clock = Clock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = clock()
    metrics = run(step)
    seconds = clock() - start
    peak_gib = _peak_gib(device)
    with flop_counter() as counter:
        run(step)
    flops = counter.get_total_flops()
    return {"s": round(seconds, 4), "peak_gib": peak_gib, "flops": flops,
            "achieved_tflops_per_s": round(flops / seconds / 1e12, 3),
            "fraction_of_matmul_peak": round(flops / seconds / peak, 4),
            "loss": round(float(metrics.get(f"loss/{role}", float("nan"))), 6)}


# ----------------------------------------------------------------------------------------------- streaming


def stream(job, sizes: dict, device: torch.device, repeats: int) -> dict:
    """Streaming inference of the job's generator: the DiT alone, then with the VAE's causal decoder."""
    from sf.generate import Clock, decoder, stream_timed
    from sf.models.vae import WanVAE

    dtype = _dtype(device)
    net = job.generator.module.eval()
    rollout = job.task.rollout
    torch.manual_seed(0)
    vae = WanVAE.from_flavor(sizes["vae"]).to(device=device, dtype=dtype).eval()
    context = torch.randn(1, sizes["text_len"], net.cfg.text_dim, device=device, dtype=dtype)
    noise = torch.randn(1, sizes["num_frames"], net.cfg.in_channels, *sizes["latent_hw"], device=device, dtype=dtype)
    clock, out = Clock(device), {}
    video_frames = vae.video_frames(sizes["num_frames"])
    if device.type == "cuda":  # the streaming peak, not the job's build and the matmul benchmark
        torch.cuda.reset_peak_memory_stats(device)
    for name, decode in (("dit", lambda latents: latents[0]), ("with_vae", None)):
        runs = []
        for _ in range(repeats + 1):  # the first is a warm-up (kernel selection, allocator)
            decoding = decode or decoder(vae)  # a fresh causal decoder per video
            runs.append(stream_timed(net, context, noise, rollout, decoding, lambda frames: None, None, clock))
        runs = runs[1:]
        seconds = statistics.median(r["dit_s"] + r["decode_s"] for r in runs)
        out[name] = {"first_chunk_s": round(statistics.median(r["first_chunk_s"] for r in runs), 4),
                     "seconds": round(seconds, 4), "fps": round(video_frames / seconds, 3)}
    out["video_frames"] = video_frames
    out["peak_gib"] = _peak_gib(device)
    job.generator.module.train()
    return out


# ----------------------------------------------------------------------------------------------- the run


def benchmark(args: argparse.Namespace) -> dict:
    from sf import distributed

    sizes = _sizes(args)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    if device.type == "cpu" and not args.tiny:
        raise SystemExit("error: no GPU here; bench_gpu measures a GPU (--tiny runs the same code on the CPU)")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ["DS_ACCELERATOR"] = device.type  # DeepSpeed's accelerator is the device measured (make exports cpu)
    started = time.perf_counter()
    peak = matmul_peak(sizes["peak_size"], args.peak_repeats, device)
    with tempfile.TemporaryDirectory() as tmp:
        job = build_job(sizes, Path(tmp), device)
        try:
            built_s = time.perf_counter() - started
            streaming = stream(job, sizes, device, args.stream_repeats)
            steps = {}
            for role in ("generator", "critic"):
                time_step(job, role, 0, device, peak)  # warm-up
                steps[role] = time_step(job, role, 1, device, peak)
        finally:
            distributed.shutdown()
    with_vae = streaming["with_vae"]
    summary = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "mode": "tiny (CPU, toy sizes)" if args.tiny else "Wan-1.3B shape",
        "shape": {"flavor": sizes["flavor"], "latent_frames": sizes["num_frames"], "latent_hw": sizes["latent_hw"],
                  "frames_per_block": 3, "denoising_steps": 4, "text_tokens": sizes["text_len"],
                  "dtype": str(_dtype(device)).removeprefix("torch.")},
        "matmul_peak_tflops_per_s": round(peak / 1e12, 3),
        "stream": streaming, "generator_step": steps["generator"], "critic_step": steps["critic"],
        "targets": {"fps": f">= {TARGETS['fps']}", "first_chunk_s": f"<= {TARGETS['first_chunk_s']}"},
        "targets_met": None if args.tiny else {"fps": with_vae["fps"] >= TARGETS["fps"],
                                               "first_chunk_s": with_vae["first_chunk_s"] <= TARGETS["first_chunk_s"]},
        "build_s": round(built_s, 1), "total_s": round(time.perf_counter() - started, 1),
    }
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.bench_gpu", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="where bench_gpu*.json goes")
    parser.add_argument("--tiny", action="store_true", help="toy sizes on the CPU: the code path, not a figure")
    parser.add_argument("--stream-repeats", type=int, default=3)
    parser.add_argument("--peak-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = benchmark(args)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("bench_gpu_tiny.json" if args.tiny else "bench_gpu.json")
    path.write_text(json.dumps(summary, indent=1) + "\n")
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
