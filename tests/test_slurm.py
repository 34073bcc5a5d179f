"""sf-train under a real slurm (a private one-node cluster): launch/slurm/train.sbatch with two tasks, a job
requeued mid-run that resumes to the uninterrupted run's exact losses, and a Hydra sweep through
hydra-submitit-launcher (`hydra/launcher=slurm`). Skipped where slurm/munge are not installed or not root."""

import math
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from launch import REPO, job_env, read_metrics, run_train
from slurm_cluster import slurm_cluster  # noqa: F401  (the session fixture)

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

SBATCH = REPO / "launch" / "slurm" / "train.sbatch"
SMOKE = ["experiment=smoke"]
COMPARED = ("loss/", "grad_norm/", "dmd/")  # metric prefixes that must match an uninterrupted run exactly
ALIVE = ("PENDING", "RUNNING", "COMPLETING", "REQUEUED")  # a job's states until it ends (requeues included)


def slurm_env(cluster) -> dict:
    """tests/launch.py's training environment, through the private cluster (and with this test's python)."""
    settings = {k: v for k, v in job_env().items() if os.environ.get(k) != v}
    return {**cluster.env, **settings, "PY": sys.executable}


def tail(path: Path, chars: int = 6000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else f"({path} does not exist)"


def submit_train(cluster, tmp_path: Path, overrides: list[str]) -> tuple[str, Path, Path]:
    """sbatch launch/slurm/train.sbatch on 2 tasks; returns (job id, run dir, the job's output file)."""
    run_dir, out = tmp_path / "run", tmp_path / "slurm.out"
    job = cluster.sbatch(["--nodes=1", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={out}", SBATCH,
                          *overrides, f"hydra.run.dir={run_dir}"], cwd=REPO, env=slurm_env(cluster))
    return job, run_dir, out


def steps(rows: list[dict]) -> list[int]:
    return [r["step"] for r in rows]


def test_sbatch_two_tasks_train_to_the_end(slurm_cluster, tmp_path):  # noqa: F811
    job, run_dir, out = submit_train(slurm_cluster, tmp_path, SMOKE + ["trainer.max_steps=4"])
    info = slurm_cluster.wait(job, timeout=240)
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']}\n{tail(out)}"
    assert info["Restarts"] == "0" and info["NumTasks"] == "2", info
    log = out.read_text()
    assert f"[sf] job {job} restart 0: 2 tasks" in log, log[-3000:]

    rows = read_metrics(run_dir)
    assert steps(rows) == [1, 2, 3, 4], tail(out)
    assert all(math.isfinite(r["loss/critic"]) for r in rows)
    generator_rows = [r for r in rows if "loss/generator" in r]
    assert len(generator_rows) == 2 and all(math.isfinite(r["loss/generator"]) for r in generator_rows)
    # srun started two ranks (SLURM_PROCID 0 and 1) that trained one model together
    f0, f1 = ((run_dir / f"fingerprints_rank{rank}.json").read_text() for rank in (0, 1))
    assert f0 == f1
    assert not (run_dir / "fingerprints_rank2.json").exists()


def wait_for_step(cluster, job: str, run_dir: Path, out: Path, step: int, restarts: int, timeout: float = 240) -> None:
    """Until the job's `restarts`-th run has logged `step` (it must stay queued or running meanwhile)."""
    deadline = time.time() + timeout
    while True:
        info = cluster.job(job)
        assert info is not None and info["JobState"] in ALIVE, f"{info}\n{tail(out)}"
        if int(info["Restarts"]) == restarts and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        assert time.time() < deadline, f"job {job} run {restarts} never reached step {step}\n{tail(out)}"
        time.sleep(0.2)


def test_requeued_job_resumes_to_the_uninterrupted_losses(slurm_cluster, tmp_path):  # noqa: F811
    """SIGUSR1 as before the time limit (the ranks checkpoint and exit, train.sbatch requeues the job), then
    `scontrol requeue` (SIGTERM to every process, slurm kills the script and requeues): each time the same job
    resumes where it stopped, and its metrics equal an uninterrupted run's."""
    max_steps = 24
    overrides = SMOKE + [f"trainer.max_steps={max_steps}", "trainer.checkpoint_every=5"]
    with ThreadPoolExecutor(1) as pool:  # the reference (torchrun, same world size) runs meanwhile
        reference = pool.submit(run_train, tmp_path / "reference", overrides, nproc=2, timeout=400)
        job, run_dir, out = submit_train(slurm_cluster, tmp_path, overrides)

        wait_for_step(slurm_cluster, job, run_dir, out, 7, restarts=0)  # a few steps past the first checkpoint
        slurm_cluster.signal(job, "USR1")
        wait_for_step(slurm_cluster, job, run_dir, out, 14, restarts=1)  # resumed, and past its next checkpoint
        slurm_cluster.requeue(job)  # last: its PREEMPTED marker is left behind for the final run to ignore

        info = slurm_cluster.wait(job, timeout=300)
        reference.result()  # raises with the output tail when the reference run failed
    expected = {r["step"]: r for r in read_metrics(tmp_path / "reference")}

    log = out.read_text()
    assert info["JobState"] == "COMPLETED", f"job {job}: {info['JobState']}\n{log[-6000:]}"
    # the same job came back once per interruption (the marker left by the SIGTERM-killed run must not requeue
    # the final run once more)
    assert info["Restarts"] == "2", f"Restarts={info['Restarts']}\n{log[-6000:]}"
    history = slurm_cluster.history[job]
    assert [h["Restarts"] for h in history if h["JobState"] == "RUNNING"] == [0, 1, 2], history
    for restart in range(3):
        assert log.count(f"[sf] job {job} restart {restart}:") == 1, log[-6000:]

    # Each time every rank checkpointed at the end of its step, and the next run resumed from there.
    stops = [int(s) for s in re.findall(r"\[sf\] preempted: checkpoint saved at step (\d+)", log)]
    assert len(stops) == 2 and 7 <= stops[0] < 14 <= stops[1] < max_steps, (stops, log[-6000:])
    for stop in stops:
        assert f"resumed from {run_dir / 'checkpoints' / f'step_{stop:06d}'} at step {stop}" in log, log[-6000:]
    # train.sbatch requeued the job itself after SIGUSR1 only (`scontrol requeue` killed the script)
    assert log.count(f"[sf] preempted: checkpoint saved, requeueing job {job}") == 1, log[-6000:]
    assert not (run_dir / "PREEMPTED").exists()

    rows = read_metrics(run_dir)
    assert steps(rows) == list(range(1, max_steps + 1)), steps(rows)  # every step once: none lost or repeated
    assert steps(expected.values()) == list(range(1, max_steps + 1))
    for r in rows:
        keys = {k for k in expected[r["step"]] if k.startswith(COMPARED)}
        assert keys and keys == {k for k in r if k.startswith(COMPARED)}, r["step"]
        for k in sorted(keys):
            assert r[k] == expected[r["step"]][k], (k, r["step"], r[k], expected[r["step"]][k])


@pytest.mark.parametrize("launcher", ["slurm", "submitit_slurm"])  # ours, and the plugin's own defaults
def test_hydra_sweep_through_submitit(slurm_cluster, tmp_path, launcher):  # noqa: F811
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sf.train", "-m", f"hydra/launcher={launcher}", *SMOKE, "trainer.max_steps=2",
           "seed=1,2", f"hydra.sweep.dir={sweep}"]
    try:
        result = subprocess.run(cmd, cwd=REPO, env=slurm_env(slurm_cluster), capture_output=True, text=True,
                                timeout=300)
    except subprocess.TimeoutExpired as e:
        logs = "\n".join(f"--- {p}\n{tail(p, 2000)}" for p in sorted(sweep.glob(".submitit/*/*.out")))
        raise AssertionError(f"sweep did not finish: {e}\n{logs}\n{slurm_cluster.logs()}") from e
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]

    # one slurm array task per sweep point, each returned its result to the launcher
    tasks = sorted(p for p in (sweep / ".submitit").glob("*_*") if p.is_dir())
    assert [p.name.split("_")[-1] for p in tasks] == ["0", "1"], tasks
    assert all(len(list(p.glob("*_result.pkl"))) == 1 for p in tasks)
    submission = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    assert f"{sys.executable} -u -m submitit.core._submit" in submission  # the jobs run this very python
    assert "#SBATCH --ntasks-per-node=1" in submission
    assert ("export OMP_NUM_THREADS=" in submission) == (launcher == "slurm")  # our config's setup line

    losses = []
    for num, seed in ((0, 1), (1, 2)):
        rows = read_metrics(sweep / str(num))
        assert steps(rows) == [1, 2], (num, output[-3000:])
        assert all(math.isfinite(r["loss/critic"]) for r in rows)
        assert f"seed: {seed}" in (sweep / str(num) / ".hydra" / "config.yaml").read_text()
        losses.append(rows[-1]["loss/critic"])
    assert losses[0] != losses[1]  # each job got its own sweep point


def interrupted_sweep(cluster, tmp_path, steps: int, at_step: int, interrupt, extra=()) -> tuple[Path, str]:
    """Run a one-job sweep on slurm, `interrupt(job)` once it has logged `at_step`; its sweep dir and output."""
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "sf.train", "-m", "hydra/launcher=slurm", *SMOKE, f"trainer.max_steps={steps}",
           *extra, "seed=1", f"hydra.sweep.dir={sweep}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=slurm_env(cluster), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        deadline = time.time() + 240
        while not any(r["step"] >= at_step for r in read_metrics(sweep / "0")):
            assert proc.poll() is None and time.time() < deadline, f"the sweep job never reached step {at_step}"
            time.sleep(0.2)
        interrupt(cluster.client("squeue", "-h", "-o", "%A").stdout.split()[0])
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return sweep, output


def test_requeued_sweep_job_finishes_before_the_sweep_returns(slurm_cluster, tmp_path):  # noqa: F811
    # a requeued submitit job checkpoints on SIGTERM; it must not report "done" then, or the sweep would return
    # while its requeued run is still training
    sweep, _ = interrupted_sweep(slurm_cluster, tmp_path, 30, 7, slurm_cluster.requeue,
                                 extra=["trainer.checkpoint_every=5"])
    rows = read_metrics(sweep / "0")
    assert steps(rows) == list(range(1, 31))  # the sweep returned only after the requeued run finished
    job_log = "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*log.out")))
    assert "resumed from" in job_log


def test_sweep_job_signalled_before_its_time_limit_checkpoints_at_the_step_end_and_is_requeued(
        slurm_cluster, tmp_path):  # noqa: F811
    """submitit's signal (SIGUSR2, sent `signal_delay_s` before the time limit): every rank finishes its step and
    saves a checkpoint, then submitit's own handler requeues the job, which resumes; the sweep returns after it."""
    sweep, _ = interrupted_sweep(slurm_cluster, tmp_path, 30, 5, lambda job: slurm_cluster.signal(job, "USR2"),
                                 extra=["trainer.checkpoint_every=100"])
    job_log = "".join(p.read_text(errors="replace") for p in sorted(sweep.glob(".submitit/*/*log.out")))
    stops = [int(s) for s in re.findall(r"\[sf\] preempted: checkpoint saved at step (\d+)", job_log)]
    assert len(stops) == 1 and 5 <= stops[0] < 30, job_log[-4000:]  # no checkpoint_every before it: the signal's
    assert f"resumed from {sweep / '0' / 'checkpoints' / f'step_{stops[0]:06d}'} at step {stops[0]}" in job_log
    assert steps(read_metrics(sweep / "0")) == list(range(1, 31))
