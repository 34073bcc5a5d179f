"""Launch paths outside slurm: a two-"node" torchrun job on one machine, through launch/torchrun.sh."""

import subprocess
import sys

import pytest

from launch import REPO, free_port, job_env, read_metrics
from sf.checkpoint import list_checkpoints

pytestmark = pytest.mark.slow


def test_two_node_torchrun_trains_and_checkpoints(tmp_path):
    run_dir = tmp_path / "run"
    port = free_port()
    overrides = ["experiment=smoke", "deepspeed=zero2", "trainer.max_steps=4", f"hydra.run.dir={run_dir}"]
    nodes = [
        subprocess.Popen(["bash", "launch/torchrun.sh", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True,
                         env=job_env(NNODES=2, NODE_RANK=rank, NPROC_PER_NODE=1, MASTER_ADDR="127.0.0.1",
                                     MASTER_PORT=port, PY=sys.executable))
        for rank in (0, 1)
    ]
    outputs = [node.communicate(timeout=300)[0] for node in nodes]
    for rank, (node, out) in enumerate(zip(nodes, outputs)):
        assert node.returncode == 0, f"node {rank} failed:\n{out[-4000:]}"
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]
    assert (run_dir / "fingerprints_rank0.json").exists() and (run_dir / "fingerprints_rank1.json").exists()
    assert [c.name for c in list_checkpoints(run_dir)] == ["step_000002", "step_000004"]
    state = (list_checkpoints(run_dir)[-1] / "trainer" / "state.json").read_text()
    assert '"rank": 1' in state  # the second node's rank wrote its data position into the checkpoint


def test_deepspeed_launcher_runs_two_ranks(tmp_path):
    # the `deepspeed` launcher appends --local_rank unless told not to; Hydra would reject it
    run_dir = tmp_path / "run"
    result = subprocess.run(
        ["bash", "launch/deepspeed.sh", "experiment=smoke", "trainer.max_steps=2", f"hydra.run.dir={run_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env=job_env(NPROC_PER_NODE=2, MASTER_PORT=free_port(), PY=sys.executable),
    )
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    assert (run_dir / "fingerprints_rank1.json").exists()
