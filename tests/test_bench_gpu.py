"""The GPU benchmark's code path at toy size on the CPU: it builds the Wan recipe's job, streams and steps it, and
reports consistent figures (the figures themselves come from a GPU: docs/benchmarks.md)."""

import json
import subprocess
import sys

import pytest

from launch import REPO, job_env


@pytest.mark.slow
def test_bench_gpu_tiny_runs_the_whole_path(tmp_path):
    result = subprocess.run([sys.executable, "-m", "eval.bench_gpu", "--tiny", "--out", str(tmp_path),
                             "--stream-repeats", "1", "--peak-repeats", "2", "--threads", "1"],
                            cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / "bench_gpu_tiny.json").read_text())
    stream = saved["stream"]
    assert stream["video_frames"] == 1 + 4 * (6 - 1)  # 6 latent frames through the VAE's 4x time compression
    dit, with_vae = stream["dit"], stream["with_vae"]
    assert 0 < dit["first_chunk_s"] < with_vae["first_chunk_s"] and 0 < dit["seconds"] < with_vae["seconds"]
    assert with_vae["fps"] == pytest.approx(21 / with_vae["seconds"], rel=1e-3) and with_vae["fps"] < dit["fps"]
    for role in ("generator_step", "critic_step"):
        step = saved[role]
        assert step["s"] > 0 and step["flops"] > 0 and step["loss"] == step["loss"]  # finite loss, counted work
        assert step["achieved_tflops_per_s"] == pytest.approx(step["flops"] / step["s"] / 1e12, rel=1e-2, abs=1e-3)
    # the generator step runs the teacher twice (CFG) and the critic on top of what a critic step does
    assert saved["generator_step"]["flops"] > saved["critic_step"]["flops"]
    assert saved["matmul_peak_tflops_per_s"] > 0 and saved["targets_met"] is None
