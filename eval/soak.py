"""Kill/resume soak: SIGKILL a 2-rank job at random moments, rerun it, and check that nothing changed.

    python -m eval.soak --trials 8 --out build/soak          # half the kills while a checkpoint is being written

One uninterrupted reference run, then `--trials` runs of the same command, each killed once — every process of
it at once, like a node failure — either between steps (at a random step) or while a checkpoint folder
(`step_N.tmp`) is being written, and rerun to the end. A trial is exact when every metrics row (losses, gradient
norms, learning rates; not timings) and every tensor and metadata entry of the final checkpoint's exports equal
the reference's bit for bit. Prints and writes `soak.json`; exits non-zero unless every trial is exact.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(run_dir: Path, args) -> list[str]:
    from sf.distributed import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.ranks}",
            f"--master_port={free_port()}", "-m", "sf.train", "experiment=smoke", f"deepspeed=zero{args.stage}",
            f"trainer.max_steps={args.steps}", f"trainer.checkpoint_every={args.checkpoint_every}",
            "logger.progress=false", f"hydra.run.dir={run_dir}"]


def environment() -> dict:
    return {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
            "WANDB_SILENT": "true"}


def rows(run_dir: Path) -> dict[int, dict]:
    out = {}
    path = run_dir / "metrics.jsonl"
    for line in (path.read_text().splitlines() if path.exists() else []):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # the line being written
            continue
        out[row["step"]] = {k: v for k, v in row.items() if not k.startswith("time/")}
    return out


def run(run_dir: Path, args) -> None:
    done = subprocess.run(command(run_dir, args), cwd=ROOT, env=environment(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"error: a run failed ({done.returncode}): {(done.stdout + done.stderr)[-2000:]}")


def run_and_kill(run_dir: Path, args, when) -> str:
    """Start the job, SIGKILL its whole process tree when `when()` says so; what the moment was."""
    import psutil

    proc = subprocess.Popen(command(run_dir, args), cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + args.timeout
    moment = "finished before the kill"
    while proc.poll() is None and time.time() < deadline:
        moment = when()
        if moment:
            break
        time.sleep(0.005)
    victims = psutil.Process(proc.pid).children(recursive=True) + [psutil.Process(proc.pid)] \
        if proc.poll() is None else []
    for p in victims:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(victims, timeout=30)
    proc.wait()
    return moment or "timed out"


def exports(run_dir: Path) -> dict[str, tuple[dict, dict]]:
    """Every exported file of the final checkpoint: its tensors (as bytes) and its metadata but the run config
    (which names its own run dir: the trials' differ from the reference's). Not the file's own bytes:
    safetensors writes the metadata in an arbitrary order."""
    from sf.config import RUN_CONFIG_KEY
    from sf.io import read_safetensors

    final = sorted((run_dir / "checkpoints").glob("step_[0-9]*[0-9]"))[-1] / "export"
    out = {}
    for path in sorted(final.glob("*.safetensors")):
        tensors, metadata = read_safetensors(path)
        metadata.pop(RUN_CONFIG_KEY, None)
        out[path.name] = ({k: t.numpy().tobytes() for k, t in tensors.items()}, metadata)
    return out


def trial(index: int, args, reference_rows: dict, reference_exports: dict) -> dict:
    rng = random.Random(f"soak-{args.seed}-{index}")
    run_dir = args.out / f"trial_{index:02d}"
    mid_checkpoint = index % 2 == 1
    target = rng.randrange(2, args.steps - 1)

    def when():
        reached = max(rows(run_dir), default=0) >= target
        if not reached:
            return None
        if not mid_checkpoint:
            return f"between steps, after step {max(rows(run_dir))}"
        writing = sorted((run_dir / "checkpoints").glob("step_*.tmp")) if (run_dir / "checkpoints").exists() else []
        return f"while writing {writing[0].name}" if writing else None

    moment = run_and_kill(run_dir, args, when)
    run(run_dir, args)  # the documented recovery: the same command
    got = rows(run_dir)
    differing = sorted(step for step in reference_rows if got.get(step) != reference_rows[step])
    same_exports = exports(run_dir) == reference_exports
    return {"trial": index, "killed": moment, "steps": len(got), "differing_steps": differing,
            "exports_identical": same_exports, "exact": not differing and same_exports and len(got) == args.steps}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m eval.soak", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--checkpoint-every", type=int, default=3)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--stage", type=int, default=2, help="ZeRO stage")
    parser.add_argument("--seed", type=int, default=0, help="draws the kill moments")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--out", type=Path, default=ROOT / "build" / "soak")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    reference = args.out / "reference"
    if not (reference / "checkpoints").exists():
        run(reference, args)
    reference_rows, reference_exports = rows(reference), exports(reference)
    results = []
    for index in range(args.trials):
        results.append(trial(index, args, reference_rows, reference_exports))
        print(json.dumps(results[-1]), flush=True)
    summary = {"command": "python -m eval.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
               "exact": sum(r["exact"] for r in results), "trials": len(results), "results": results,
               "seconds": round(time.perf_counter() - began, 1)}
    (args.out / "soak.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(f"{summary['exact']}/{summary['trials']} trials exact ({summary['seconds']} s); {args.out / 'soak.json'}")
    if summary["exact"] != summary["trials"]:
        raise SystemExit(1)
    return summary


if __name__ == "__main__":
    main()
