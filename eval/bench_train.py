"""Benchmark: the cost of one generator update of self forcing, and the memory ZeRO-3 saves.

Three measurements, one JSON summary (printed, and written with a PNG plot into --out):

1. Generator-step time, self forcing vs diffusion forcing, at equal model and batch. One step is a whole
   generator update: rollout, DMD loss (teacher with CFG, i.e. a conditional and an unconditional forward,
   and the critic, both under no_grad), backward, AdamW step. Plain single-process torch, no DeepSpeed, so the
   figures isolate the algorithm. The exit step is random in training; here it is FIXED per measurement
   (k = 0..3) for fairness, and the report gives each k and the mean over k (a uniform exit-step draw).
     self_forcing          sf.distill.rollout.self_forcing_rollout: the cache holds the student's own outputs
     diffusion_forcing     sf.distill.rollout.diffusion_forcing_rollout: the same chunk loop, the cache holds
                           independently noised random "real" latents
     diffusion_forcing_parallel  (supplementary) diffusion forcing as usually trained: ONE block-causal
                           forward with grad over the whole noised real video, no rollout
2. Achieved FLOP/s of a self-forcing generator step (FLOPs counted with torch.utils.flop_counter) against the
   machine's matmul peak measured in the same process and thread count (a large square matmul, median of
   several): fp32 on CPU; bf16 autocast on a CUDA device (GPU path, marked; not measured on the CPU machines).
3. Per-rank parameter + optimizer bytes under ZeRO-3 vs ZeRO-0 at 2 ranks: the program starts one torchrun job
   per stage and precision (`--memory --stage S` below; fp32 and bf16 by default), each rank builds the
   generator role with sf.distributed.build_trainable and the real engine_config, runs one
   forward/backward/step so the optimizer state exists, and counts what it holds (`Trainable.held_bytes`).

Timings use `--threads` torch threads (default 1: on a shared 2-core machine a second thread makes timings
swing) and report medians over `--repeats`, measurements interleaved across methods.

    python -m eval.bench_train                              # full default run (tiny, 21 frames in chunks of 3)
    python -m eval.bench_train --flavor debug --num-frames 6 --latent-hw 4 4 --repeats 1 --skip-memory
    python -m torch.distributed.run --nproc_per_node=2 eval/bench_train.py --memory --stage 3   # one memory job
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script (e.g. by torchrun): make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

import sf  # noqa: F401  (torchvision compatibility before anything imports diffusers)
from sf.diffusion.flow import add_noise, dmd_timestep, t_to_sigma, x0_from_flow
from sf.distill.losses import dmd_loss, x0_predictor
from sf.distill.rollout import RolloutConfig, diffusion_forcing_rollout, self_forcing_rollout
from sf.distributed import free_port
from sf.models.dit import VideoDiT, dit_config

REPO = Path(__file__).resolve().parents[1]
CFG_SCALE = 3.0  # the recipe's guidance: real = cond + 3 (cond - uncond)
METHODS = ("self_forcing", "diffusion_forcing")
TARGETS = {"sf_over_df": 1.5, "peak_fraction": 0.40, "zero3_over_zero0": 0.55}


# ----------------------------------------------------------------------------------------------- setup


class Setup:
    """Generator (trainable, AdamW), frozen teacher and critic, prompt features and the rollout config."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        torch.manual_seed(0)
        cfg = dit_config(args.flavor)
        teacher = VideoDiT(cfg)
        self.generator = VideoDiT(cfg).to(device)
        self.critic = VideoDiT(cfg).to(device)
        self.generator.load_state_dict(teacher.state_dict())  # both start from the teacher, as in training
        self.critic.load_state_dict(teacher.state_dict())
        self.teacher = teacher.to(device).requires_grad_(False).eval()
        self.critic.requires_grad_(False)  # frozen inside the generator's loss (Trainable.frozen in training)
        self.optimizer = torch.optim.AdamW(self.generator.parameters(), lr=2e-6, betas=(0.0, 0.999), weight_decay=0.01)
        self.rollout = RolloutConfig(num_frames=args.num_frames, frames_per_block=args.frames_per_block)
        self.shape = (args.batch, args.num_frames, cfg.in_channels, *args.latent_hw)
        self.context = torch.randn(args.batch, args.text_len, cfg.text_dim, device=device)
        self.negative = torch.randn(args.batch, args.text_len, cfg.text_dim, device=device)
        self.device = device
        self.rng = torch.Generator(device=device).manual_seed(1)

    def autocast(self):
        """bf16 autocast on a GPU (GPU-only path); fp32 on CPU."""
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    def randn(self) -> torch.Tensor:
        return torch.randn(self.shape, generator=self.rng, device=self.device)


def generator_step(s: Setup, method: str, exit_step: int | None, inputs: tuple[torch.Tensor, torch.Tensor]) -> int:
    """One generator update of `method` with the exit step fixed to `exit_step`; returns the generator forwards."""
    noise, real = inputs
    fixed = lambda drawn: torch.full_like(drawn, exit_step)  # noqa: E731  (the trainer's sync broadcasts instead)
    with s.autocast():
        if method == "self_forcing":
            out = self_forcing_rollout(s.generator, s.generator.new_cache, noise, s.context, s.rollout,
                                       rng=s.rng, sync=fixed)
            video, forwards = out.video, out.num_forwards
        elif method == "diffusion_forcing":
            out = diffusion_forcing_rollout(s.generator, s.generator.new_cache, real, noise, s.context, s.rollout,
                                            rng=s.rng, sync=fixed)
            video, forwards = out.video, out.num_forwards
        elif method == "diffusion_forcing_parallel":
            video, forwards = _parallel_diffusion_forcing(s, noise, real), 1
        else:
            raise ValueError(f"unknown method {method!r}")
        t = dmd_timestep(torch.rand(s.shape[0], generator=s.rng, device=s.device), s.rollout.shift)
        eps = s.randn()
        real_score = x0_predictor(s.teacher, s.context, CFG_SCALE, s.negative)
        fake_score = x0_predictor(s.critic, s.context)
        loss, _ = dmd_loss(video.float(), real_score, fake_score, t, eps)
    loss.backward()
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    return forwards


def _parallel_diffusion_forcing(s: Setup, noise: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    """x0 of one block-causal forward over the real video, each chunk noised to its own random student step."""
    cfg = s.rollout
    batch, num_frames = noise.shape[:2]
    bounds = cfg.causal.chunk_bounds(num_frames)
    steps = torch.randint(0, cfg.num_steps, (batch, len(bounds)), generator=s.rng, device=s.device)
    chunk_of_frame = torch.tensor([i for i, (a, b) in enumerate(bounds) for _ in range(a, b)], device=s.device)
    t = cfg.timesteps(s.device)[steps[:, chunk_of_frame]]  # (B, F)
    x_t = add_noise(real, noise, t_to_sigma(t))
    return x0_from_flow(x_t, s.generator(x_t, t, s.context, causal=cfg.causal), t_to_sigma(t))


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(s: Setup, args: argparse.Namespace) -> tuple[dict, dict]:
    """Median seconds of each (method, exit step) and of the parallel baseline; forwards per rollout."""
    keys = [(m, k) for k in range(s.rollout.num_steps) for m in METHODS] + [("diffusion_forcing_parallel", None)]
    forwards = {}
    for m, k in keys:  # warm-up (allocator, first-call dispatch) and forward counts
        forwards[(m, k)] = generator_step(s, m, k, (s.randn(), s.randn()))
    samples = {key: [] for key in keys}
    for r in range(args.repeats):
        order = keys if r % 2 == 0 else keys[::-1]  # alternate who goes first
        for m, k in order:
            inputs = (s.randn(), s.randn())  # the "data" is not part of the step
            _sync(s.device)
            start = time.perf_counter()
            generator_step(s, m, k, inputs)
            _sync(s.device)
            samples[(m, k)].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in samples.items()}, forwards


# ----------------------------------------------------------------------------------------------- FLOPs


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QK^T and PV of the CPU flash kernel: 4 B H Lq Lk D (the dense count, as torch counts the GPU kernels)."""
    b, h, lq, d = query_shape
    return 4 * b * h * lq * key_shape[-2] * d


def _sdpa_cpu_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                             **kwargs) -> int:
    """dV, dP, dQ, dK: four matmuls of the forward's size, 8 B H Lq Lk D."""
    b, h, lq, d = query_shape
    return 8 * b * h * lq * key_shape[-2] * d


class _GlobalOnly:
    """Stand-in for FlopCounterMode's per-module tracker: we only need the global count, and the tracker's
    backward hooks fail on the rollout's cache writes (views taken under no_grad of tensors that require grad:
    "Expected gradient function to be set")."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def flop_counter():
    """torch's FlopCounterMode counting global totals only, with the CPU attention kernels added."""
    from torch.utils.flop_counter import FlopCounterMode

    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):  # not in torch's registry (CPU kernel)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = _sdpa_cpu_flops
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = _sdpa_cpu_backward_flops
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    counter.mod_tracker = _GlobalOnly()
    return counter


def count_flops(s: Setup, method: str, exit_step: int | None) -> int:
    """FLOPs (matmuls, convolutions, attention; forward and backward) of one generator step."""
    inputs = (s.randn(), s.randn())
    with flop_counter() as counter:
        generator_step(s, method, exit_step, inputs)
    return counter.get_total_flops()


def matmul_peak(size: int, repeats: int, device: torch.device) -> float:
    """FLOP/s of a square matmul (fp32 on CPU, bf16 on a GPU), the median of `repeats` after a warm-up."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    torch.mm(a, b, out=out)
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        torch.mm(a, b, out=out)
        _sync(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


# ----------------------------------------------------------------------------------------------- memory


def memory_job(args: argparse.Namespace) -> dict:
    """One rank of a `--memory` torchrun job: build the generator engine, one step, count held bytes."""
    from sf import distributed

    d = distributed.init_distributed()
    try:
        torch.manual_seed(0)
        model = VideoDiT(dit_config(args.flavor))
        precision = args.memory_precision[0]
        bf16 = precision == "bf16"
        config = distributed.engine_config(distributed.DeepSpeedConfig(stage=args.stage), micro_batch=1,
                                           grad_accum=1, grad_clip=10.0, bf16=bf16)
        role = distributed.build_trainable(model, distributed.RoleSpec("generator", distributed.OptimizerConfig()),
                                           config)
        dtype = torch.bfloat16 if bf16 else torch.float32
        cfg = model.cfg
        x = torch.randn(1, args.frames_per_block, cfg.in_channels, *args.latent_hw, device=d.device, dtype=dtype)
        t = torch.full((1,), 500.0, device=d.device)
        context = torch.randn(1, args.text_len, cfg.text_dim, device=d.device, dtype=dtype)
        role.step(role(x, t, context).float().square().mean())
        result = {"rank": d.rank, "world_size": d.world_size, "stage": args.stage,
                  "precision": precision, **role.held_bytes()}
        if args.memory_out:
            Path(args.memory_out, f"rank{d.rank}.json").write_text(json.dumps(result))
        else:
            print(json.dumps(result), flush=True)
        return result
    finally:
        distributed.shutdown()



def run_memory_jobs(args: argparse.Namespace, precision: str) -> dict:
    """Launch one torchrun job per ZeRO stage (0 and 3) at `--world-size` ranks and collect per-rank bytes."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if not torch.cuda.is_available():
        env["DS_ACCELERATOR"] = "cpu"
    stages = {}
    for stage in (0, 3):
        with tempfile.TemporaryDirectory() as tmp:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.world_size}",
                   "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                   "-m", "eval.bench_train", "--memory", "--stage", str(stage), "--flavor", args.flavor,
                   "--memory-precision", precision, "--frames-per-block", str(args.frames_per_block),
                   "--latent-hw", *map(str, args.latent_hw), "--text-len", str(args.text_len), "--memory-out", tmp]
            start = time.perf_counter()
            done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=args.memory_timeout)
            if done.returncode != 0:
                raise RuntimeError(f"memory job (stage {stage}) failed with {done.returncode}:\n"
                                   f"{(done.stdout + done.stderr)[-4000:]}")
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(args.world_size)]
        stages[f"stage{stage}"] = {"per_rank": ranks, "max_total_bytes": max(r["total_bytes"] for r in ranks),
                                   "job_s": round(time.perf_counter() - start, 1)}
    ratio = stages["stage3"]["max_total_bytes"] / stages["stage0"]["max_total_bytes"]
    return {"world_size": args.world_size, "precision": precision, **stages,
            "zero3_over_zero0": round(ratio, 4)}


# ----------------------------------------------------------------------------------------------- report


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    ms = summary["generator_step_ms"]
    labels = [f"k={k}" for k in ms["self_forcing"]["per_exit_step"]] + ["mean"]
    xs = range(len(labels))
    ax = axes[0]
    for i, method in enumerate(METHODS):
        values = list(ms[method]["per_exit_step"].values()) + [ms[method]["mean"]]
        ax.bar([x + (i - 0.5) * 0.38 for x in xs], values, width=0.38, label=method.replace("_", " "))
    ax.axhline(ms["diffusion_forcing_parallel"], color="gray", ls="--", lw=1, label="DF, one parallel forward")
    ax.set_xticks(list(xs), labels)
    ax.set_ylim(0, 1.35 * max(ax.get_ylim()[1], ms["diffusion_forcing_parallel"]))  # room for the legend
    ax.set_ylabel("ms per generator step (median)")
    ax.set_title(f"self forcing / diffusion forcing = {summary['sf_over_df']:.2f}x", fontsize=9)
    ax.legend(fontsize=7, loc="upper left", ncol=2)

    ax = axes[1]
    fl = summary["flops"]
    names = ["matmul peak"] + [f"SF k={k}" for k in fl["achieved_per_exit_step"]] + ["SF mean"]
    values = [fl["peak_flops_per_s"]] + list(fl["achieved_per_exit_step"].values()) + [fl["achieved_flops_per_s"]]
    ax.bar(range(len(values)), [v / 1e9 for v in values], color=["gray"] + ["tab:blue"] * (len(values) - 1))
    ax.set_xticks(range(len(values)), names, rotation=30, fontsize=7)
    ax.set_ylabel("GFLOP/s")
    ax.set_title(f"achieved / peak = {100 * fl['peak_fraction']:.1f} %", fontsize=9)

    ax = axes[2]
    memory = summary.get("memory")
    if memory:
        bars = [(f"ZeRO-{stage}\n{precision}", mem[f"stage{stage}"]["per_rank"])
                for precision, mem in memory.items() for stage in (0, 3)]
        bottom = [0.0] * len(bars)
        for part in ("parameters", "fp32_master", "optimizer_state"):
            vals = [max(r[f"{part}_bytes"] for r in ranks) / 2**20 for _, ranks in bars]
            ax.bar([name for name, _ in bars], vals, bottom=bottom, label=part.replace("_", " "))
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_ylabel("MiB per rank (max over ranks)")
        ratios = ", ".join(f"{p} {m['zero3_over_zero0']:.3f}" for p, m in memory.items())
        ax.set_title(f"{next(iter(memory.values()))['world_size']} ranks; ZeRO-3 / ZeRO-0: {ratios}", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "memory not measured\n(--skip-memory)", ha="center", va="center")
        ax.set_axis_off()
    fig.suptitle(f"{summary['flavor']}: {summary['num_frames']} latent frames in chunks of "
                 f"{summary['frames_per_block']}, {summary['latent_hw'][0]}x{summary['latent_hw'][1]} latents, "
                 f"batch {summary['batch']}, {summary['device']} ({summary['threads']} thread)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def benchmark(args: argparse.Namespace) -> dict:
    """Measurements 1 and 2 in this process, 3 through torchrun jobs; the summary dict."""
    threads = torch.get_num_threads()
    try:
        return _benchmark(args)
    finally:
        torch.set_num_threads(threads)  # leave the caller's process as it was (tests call main())


def _benchmark(args: argparse.Namespace) -> dict:
    wall = time.perf_counter()
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    s = Setup(args, device)

    med, forwards = time_steps(s, args)
    steps = range(s.rollout.num_steps)
    ms = {m: {"per_exit_step": {str(k): round(1000 * med[(m, k)], 2) for k in steps}} for m in METHODS}
    for m in METHODS:
        ms[m]["mean"] = round(statistics.mean(1000 * med[(m, k)] for k in steps), 2)
    ms["diffusion_forcing_parallel"] = round(1000 * med[("diffusion_forcing_parallel", None)], 2)

    flops = {k: count_flops(s, "self_forcing", k) for k in steps}
    achieved = {str(k): flops[k] / med[("self_forcing", k)] for k in steps}
    achieved_mean = sum(flops.values()) / sum(med[("self_forcing", k)] for k in steps)  # uniform exit mixture
    flops_parallel = count_flops(s, "diffusion_forcing_parallel", None)
    peak = matmul_peak(args.peak_size, args.peak_repeats, device)

    summary = {
        "flavor": args.flavor,
        "num_frames": args.num_frames,
        "frames_per_block": args.frames_per_block,
        "latent_hw": list(args.latent_hw),
        "batch": args.batch,
        "text_len": args.text_len,
        "device": device.type,
        "dtype": "bf16 autocast (GPU path)" if device.type == "cuda" else "fp32",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "generator_step_ms": ms,
        "generator_forwards_per_rollout": {str(k): forwards[("self_forcing", k)] for k in steps},
        "sf_over_df": round(ms["self_forcing"]["mean"] / ms["diffusion_forcing"]["mean"], 3),
        "sf_over_df_per_exit_step": {str(k): round(med[("self_forcing", k)] / med[("diffusion_forcing", k)], 3)
                                     for k in steps},
        "sf_over_df_parallel": round(ms["self_forcing"]["mean"] / ms["diffusion_forcing_parallel"], 3),
        "flops": {
            "self_forcing_per_exit_step": {str(k): v for k, v in flops.items()},
            "diffusion_forcing_parallel": flops_parallel,
            "achieved_per_exit_step": {k: round(v) for k, v in achieved.items()},
            "achieved_flops_per_s": round(achieved_mean),
            "achieved_diffusion_forcing_parallel": round(flops_parallel / med[("diffusion_forcing_parallel", None)]),
            "peak_flops_per_s": round(peak),
            "peak_matmul": f"{args.peak_size}^3 {'bf16' if device.type == 'cuda' else 'fp32'}",
            "peak_fraction": round(achieved_mean / peak, 6),
        },
    }
    if not args.skip_memory:
        summary["memory"] = {precision: run_memory_jobs(args, precision) for precision in args.memory_precision}
    met = {
        "sf_over_df <= 1.5": summary["sf_over_df"] <= TARGETS["sf_over_df"],
        "peak_fraction >= 0.40": summary["flops"]["peak_fraction"] >= TARGETS["peak_fraction"],
    }
    for precision, mem in summary.get("memory", {}).items():
        met[f"zero3_over_zero0 <= 0.55 ({precision})"] = mem["zero3_over_zero0"] <= TARGETS["zero3_over_zero0"]
    summary["targets_met"] = met
    summary["wall_s"] = round(time.perf_counter() - wall, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"bench_train_{args.flavor}"
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
    plot(summary, args.out / f"{stem}.png")
    return summary


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--flavor", default="tiny", help="DiT flavor of all three networks (debug, tiny, ...)")
    parser.add_argument("--num-frames", type=int, default=21, help="latent frames per rollout")
    parser.add_argument("--frames-per-block", type=int, default=3, help="latent frames per chunk")
    parser.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8), metavar=("H", "W"), help="latent size")
    parser.add_argument("--batch", type=int, default=1, help="samples per generator step")
    parser.add_argument("--text-len", type=int, default=16, help="prompt tokens (random text features)")
    parser.add_argument("--repeats", type=int, default=11, help="timed steps per (method, exit step); medians")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for every timing (peak included)")
    parser.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    parser.add_argument("--peak-size", type=int, default=None, help="square matmul size for the peak "
                        "(default 2048 on CPU, 8192 on a GPU)")
    parser.add_argument("--peak-repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("docs/figures"), help="where the JSON and PNG go")
    parser.add_argument("--skip-memory", action="store_true", help="do not launch the ZeRO memory jobs")
    parser.add_argument("--world-size", type=int, default=2, help="ranks of each memory job")
    parser.add_argument("--memory-precision", choices=("fp32", "bf16"), nargs="+", default=None,
                        help="DeepSpeed precision(s) of the memory jobs, two jobs (ZeRO-0, ZeRO-3) per precision "
                        "(default: fp32 and bf16; a --memory rank: fp32)")
    parser.add_argument("--memory-timeout", type=float, default=300.0, help="seconds per memory job")
    parser.add_argument("--memory", action="store_true", help="run as one rank of a memory job (under torchrun)")
    parser.add_argument("--stage", type=int, default=0, choices=(0, 1, 2, 3), help="ZeRO stage of a --memory rank")
    parser.add_argument("--memory-out", default=None, help="folder for the rank's JSON (default: print it)")
    args = parser.parse_args(argv)
    if args.peak_size is None:
        args.peak_size = 8192 if torch.cuda.is_available() and args.device != "cpu" else 2048
    if args.memory_precision is None:
        args.memory_precision = ["fp32"] if args.memory else ["fp32", "bf16"]
    if args.memory and len(args.memory_precision) != 1:
        parser.error("a --memory rank takes exactly one --memory-precision")
    if args.repeats < 1 or args.num_frames < 1 or args.batch < 1:
        parser.error("--repeats, --num-frames and --batch must be >= 1")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.memory:
        return memory_job(args)
    summary = benchmark(args)
    print(json.dumps(summary, indent=1))
    return summary


if __name__ == "__main__":
    main()
