"""Run `sf.train` as a real multi-process job (torchrun over gloo) from tests, optionally killing it mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from sf.distributed import free_port

REPO = Path(__file__).resolve().parents[1]



def job_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", WANDB_MODE="offline", WANDB_SILENT="true",
        PYTHONWARNINGS="ignore", PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false",
    )
    env.update({k: str(v) for k, v in extra.items()})
    return env


def train_command(run_dir: Path, overrides: list[str], nproc: int = 2) -> list[str]:
    base = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--master_port={free_port()}",
            "-m", "sf.train"] if nproc > 1 else [sys.executable, "-m", "sf.train"]
    return base + list(overrides) + [f"hydra.run.dir={run_dir}"]


def run_train(run_dir: Path, overrides: list[str], nproc: int = 2, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run to completion; raise with the job's output tail when it fails."""
    result = subprocess.run(train_command(run_dir, overrides, nproc), cwd=REPO, env=job_env(**env),
                            capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{(result.stdout + result.stderr)[-6000:]}")
    return result


def run_job(run_dir: Path, overrides: list[str], nproc: int = 1, timeout: float = 300, **env) -> subprocess.CompletedProcess:
    """Run to the end, whatever the outcome (tests of failures read returncode and stderr)."""
    return subprocess.run(train_command(run_dir, overrides, nproc), cwd=REPO, env=job_env(**env),
                          capture_output=True, text=True, timeout=timeout)


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    """The non-empty lines a failed job printed on stderr that are not library chatter (warnings, progress)."""
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def run_and_kill(run_dir: Path, overrides: list[str], kill_after_step: int, nproc: int = 2, timeout: float = 300,
                 when=None) -> None:
    """Start a job and SIGKILL its whole process tree once metrics.jsonl has reached `kill_after_step` and, if
    given, `when()` is true (e.g. while a checkpoint is being written)."""
    proc = subprocess.Popen(train_command(run_dir, overrides, nproc), cwd=REPO, env=job_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"job ended (rc {proc.returncode}) before reaching step {kill_after_step}")
            if any(row["step"] >= kill_after_step for row in read_metrics(run_dir)) and (when is None or when()):
                break
            time.sleep(0.01 if when else 0.05)
        else:
            raise AssertionError(f"job did not reach step {kill_after_step} in {timeout}s")
    finally:
        kill_tree(proc.pid)
        proc.wait()


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it at once, like a node failure.

    torchrun's workers do not stay in its process group, so killing the group alone leaves them running.
    """
    try:
        root = psutil.Process(pid)
        victims = root.children(recursive=True) + [root]
    except psutil.NoSuchProcess:
        return
    for p in victims:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(victims, timeout=30)
    assert not alive, f"processes survived SIGKILL: {alive}"


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return rows
