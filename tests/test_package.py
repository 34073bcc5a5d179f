"""The package installs whole: a wheel carries the configs (as `sf.conf`) and no top-level `eval`, and installed
from that wheel, outside the checkout, `sf-train experiment=smoke` trains."""

import json
import subprocess
import sys
import zipfile

import pytest

from launch import REPO, job_env

pytestmark = pytest.mark.slow


def test_wheel_has_the_configs_and_trains_outside_the_checkout(tmp_path):
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(REPO), "-w", str(tmp_path / "dist")], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("sf-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "sf/conf/config.yaml" in names and "sf/conf/experiment/smoke.yaml" in names
    assert "sf/conf/task/distill.yaml" in names and "sf/assets/prompts/smoke.txt" in names
    assert not [n for n in names if n.startswith("eval/")]

    site = tmp_path / "site"
    installed = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                                str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = job_env(PYTHONPATH=str(site))
    where = subprocess.run([sys.executable, "-c", "import sf, sf.conf; print(sf.__file__)"], cwd=elsewhere, env=env,
                           capture_output=True, text=True, timeout=120)
    assert where.stdout.strip().startswith(str(site)), where.stdout + where.stderr  # not the checkout's sf
    run = subprocess.run([str(site / "bin" / "sf-train"), "experiment=smoke", "hydra.run.dir=run"], cwd=elsewhere,
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:]
    rows = [json.loads(line) for line in (elsewhere / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert (elsewhere / "run" / "checkpoints" / "step_000004" / "export" / "generator.safetensors").exists()
