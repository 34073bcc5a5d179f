"""`make demo`: self-forcing distillation of the shipped world teacher into a 4-step causal student, evaluated.

    python -m eval.demo                               # outputs/demo/<time>/: run, report.json, report.md, plots, videos
    python -m eval.demo --steps 4 --num-videos 4      # a shortened schedule (the tests)

0. The world's weights (VAE, teacher, ODE init, text tower, classifier) come from sf/assets/world (or --assets);
   when they are missing they are built first by the project's recipes (`make assets`, eval/assets.py).
1. `sf-train experiment=demo`: DMD self-forcing from the ODE init, with the teacher as the real score and a
   critic initialised from it, as a DeepSpeed job.
2. `sf/world/evaluate.py` on the same evaluation captions (world `val` split): the teacher (48 guided steps), the ODE
   init and the distilled student (4 steps, streamed chunk by chunk), plus each intermediate checkpoint of the
   run (metric vs step) and long rollouts of the causal models (drift vs horizon).
3. `sf/world/report.py`: report.json (teacher / ode_init / student: oracle_score, components, NFE and seconds per
   frame), report.md, plots/*.png, samples/side_by_side.{mp4,gif}; the summary table is printed.

Acceptance (docs/benchmarks.md): the student keeps >= 90 % of the teacher's oracle score with >= 10x fewer
network evaluations per frame, and beats the ODE init.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import sf  # noqa: F401
from eval.assets import SHIPPED

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.90  # student / teacher oracle score
MIN_NFE_REDUCTION = 10.0


def distil(run_dir: Path, assets: Path, steps: int | None, processes: int, overrides: list[str]) -> None:
    """The training job from the weights in `assets` (resumes when run_dir already holds a checkpoint)."""
    cmd = [f"hydra.run.dir={run_dir}", "experiment=demo", "trainer.keep_last=0",
           f"model.checkpoint={assets / 'ode_init.safetensors'}", f"teacher.checkpoint={assets / 'teacher.safetensors'}",
           f"text.pretrained={assets / 'text_encoder.safetensors'}", f"codec.checkpoint={assets / 'vae.safetensors'}",
           f"data.shards={assets / 'train_prompts.txt'}", *overrides]
    if steps is not None:
        cmd += [f"trainer.max_steps={steps}", f"trainer.checkpoint_every={max(1, steps // 2)}"]
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, (os.cpu_count() or 1) // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads}
    if processes > 1:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                    "-m", "sf.train"]
    else:
        launcher = [sys.executable, "-m", "sf.train"]
    print(f"[demo] $ {' '.join(launcher[1:] + cmd)}", flush=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "train.log", "a") as log:
        code = subprocess.call(launcher + cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if code != 0:
        tail = (run_dir / "train.log").read_text().strip().splitlines()[-1:] or [""]
        raise SystemExit(f"error: distillation failed (exit {code}), see {run_dir / 'train.log'}: {tail[0]}")


def acceptance(report: dict) -> dict:
    teacher, student, ode = report["teacher"], report["student"], report["ode_init"]
    ratio = student["oracle_score"] / teacher["oracle_score"] if teacher["oracle_score"] > 0 else 0.0
    reduction = teacher["nfe_per_frame"] / student["nfe_per_frame"]
    result = {"student_vs_teacher": round(ratio, 4), "target": TARGET, "nfe_reduction": round(reduction, 2),
              "nfe_target": MIN_NFE_REDUCTION, "beats_ode_init": student["oracle_score"] > ode["oracle_score"]}
    result["passed"] = ratio >= TARGET and reduction >= MIN_NFE_REDUCTION and result["beats_ode_init"]
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.demo", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--run-dir", type=Path, default=None, help="default: outputs/demo/<date_time>")
    parser.add_argument("--steps", type=int, default=None, help="training iterations (default: the experiment's)")
    parser.add_argument("--num-videos", type=int, default=32, help="evaluation videos per model")
    parser.add_argument("--teacher-steps", type=int, default=48, help="the teacher's sampling steps")
    parser.add_argument("--processes", type=int, default=1, help="training processes (DeepSpeed ranks)")
    parser.add_argument("--assets", type=Path, default=None,
                        help="the world's weights (default: sf/assets/world, built by `make assets` when missing)")
    parser.add_argument("overrides", nargs="*", help="extra sf-train overrides, e.g. optim.generator.lr=1e-5")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    run_dir = args.run_dir or ROOT / "outputs" / "demo" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")

    import torch

    from sf.world.evaluate import ASSETS, EvalConfig, WorldEvaluator, load_net
    from sf.world.report import ORACLE_DEFINITION, format_table, write_report
    from sf.checkpoint import list_checkpoints

    assets = args.assets or ASSETS
    missing = [name for name in SHIPPED if not (assets / name).exists()]
    if missing and args.assets is not None:
        raise SystemExit(f"error: {assets} lacks {', '.join(missing)} (build them: python -m eval.assets --install {assets})")
    if missing:
        print(f"[demo] no world weights in {assets} yet: building them with the project's recipes (make assets)",
              flush=True)
        build_assets(ROOT / "build" / "assets", assets)

    distil(run_dir, assets, args.steps, args.processes, args.overrides)
    trained = time.perf_counter()

    checkpoints = list_checkpoints(run_dir)
    rollout = _rollout(checkpoints[-1])
    evaluator = WorldEvaluator(EvalConfig(num_videos=args.num_videos, teacher_steps=args.teacher_steps), assets)
    report, samples, drift = {}, {}, {}
    report["teacher"], videos = evaluator.evaluate_teacher(load_net(assets / "teacher.safetensors"))
    samples["teacher"] = videos[:4]
    history = []
    ode_net = load_net(assets / "ode_init.safetensors")
    report["ode_init"], videos = evaluator.evaluate_student(ode_net, rollout)
    samples["ode_init"] = videos[:4]
    drift["ode_init"] = evaluator.drift(ode_net, rollout)
    history.append({"step": 0, "oracle_score": report["ode_init"]["oracle_score"],
                    "num_videos": report["ode_init"]["num_videos"], **report["ode_init"]["components"]})
    for checkpoint in checkpoints:  # intermediate ones on the first history_videos captions only (time)
        final = checkpoint == checkpoints[-1]
        student = load_net(checkpoint / "export" / "generator_ema.safetensors")
        result, videos = evaluator.evaluate_student(student, rollout,
                                                    count=None if final else evaluator.cfg.history_videos)
        step = int(checkpoint.name.split("_")[-1])
        history.append({"step": step, "oracle_score": result["oracle_score"], "num_videos": result["num_videos"],
                        **result["components"]})
        if final:
            report["student"] = {**result, "weights": str(checkpoint / "export" / "generator_ema.safetensors"),
                                 "training_steps": step}
            samples["student"] = videos[:4]
            drift["student"] = evaluator.drift(student, rollout)
    report["vae_round_trip"] = evaluator.vae_round_trip(evaluator.cfg.history_videos)  # every model's ceiling
    report["acceptance"] = acceptance(report)
    report["oracle_definition"] = ORACLE_DEFINITION
    report["timing"] = {"train_s": round(trained - begin, 1), "eval_s": round(time.perf_counter() - trained, 1),
                        "total_s": round(time.perf_counter() - begin, 1), "threads": torch.get_num_threads()}
    report["commands"] = [" ".join(["python -m eval.demo", *(argv if argv is not None else sys.argv[1:])])]
    report["history"] = history
    path = write_report(run_dir, report, history=history, drift=drift, samples=samples,
                        captions=evaluator.captions[:4], metrics_path=run_dir / "metrics.jsonl")
    print(format_table(report))
    print(f"report: {path}")


def build_assets(out: Path, target: Path) -> None:
    from eval.assets import Plan, build, install

    install(out, build(out, Plan()), target)


def _rollout(checkpoint: Path):
    """The run's rollout config (its step list and chunking), from the checkpoint's resolved config."""
    from sf.config import read_run_config

    return read_run_config(checkpoint).task.rollout


if __name__ == "__main__":
    main()
