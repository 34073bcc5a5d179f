"""Shared fixtures: seeded debug-size networks and the environment every test runs in."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import pytest
import torch

import sf  # noqa: F401  (torchvision compatibility before anything imports diffusers)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def perturb_(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Move every parameter off its initial value (norm weights start at 1) so tests see all of them."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)
    return module


@pytest.fixture(scope="session")
def quick_assets(tmp_path_factory):
    """Every world asset built from scratch by the shortened recipes (`python -m eval.assets --quick`), once."""
    import subprocess
    import sys

    from launch import REPO, job_env

    root = tmp_path_factory.mktemp("assets")
    result = subprocess.run([sys.executable, "-m", "eval.assets", "--out", str(root / "build"), "--quick",
                             "--install", str(root / "world")], cwd=REPO, env=job_env(), capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return root
