"""The layering the code promises (docs/architecture.md), read off the source with `ast`: one engine seam, models
that know nothing of training, a library that never imports the repository's `eval/`, a project that stands alone."""

import ast
import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SF = REPO / "sf"
SEAM = SF / "distributed.py"


def sources(root: Path) -> list[Path]:
    return sorted(root.rglob("*.py"))


def imported_modules(path: Path, root: Path = REPO) -> list[str]:
    """Every module a file imports (absolute names; relative imports resolved against the file's package)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append(".".join(base + ([node.module] if node.module else [])))
            else:
                found.append(node.module)
                found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def uses_torch_distributed(path: Path) -> bool:
    """`torch.distributed.<anything>` used as an attribute (without importing it by name)."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Attribute) and node.attr == "distributed" and isinstance(node.value, ast.Name) \
                and node.value.id == "torch":
            return True
    return False


def test_only_the_seam_touches_deepspeed_or_torch_distributed():
    offenders = []
    for path in sources(SF):
        if path == SEAM:
            continue
        modules = imported_modules(path)
        if any(m == "deepspeed" or m.startswith("deepspeed.") or m.startswith("torch.distributed") for m in modules):
            offenders.append(str(path.relative_to(REPO)))
        elif uses_torch_distributed(path):
            offenders.append(f"{path.relative_to(REPO)} (torch.distributed.*)")
    assert offenders == [], "import deepspeed / call torch.distributed only in sf/distributed.py"


def test_the_library_never_imports_the_repository_eval_folder():
    offenders = [str(p.relative_to(REPO)) for p in sources(SF)
                 if any(m == "eval" or m.startswith("eval.") for m in imported_modules(p))]
    assert offenders == []


def test_models_import_nothing_of_sf_outside_models_and_io():
    allowed = ("sf.models", "sf.io")
    offenders = {}
    for path in sources(SF / "models"):
        bad = [m for m in imported_modules(path) if (m == "sf" or m.startswith("sf."))
               and not any(m == a or m.startswith(a + ".") for a in allowed)]
        if bad:
            offenders[str(path.relative_to(REPO))] = bad
    assert offenders == {}


def test_the_checks_above_can_fail(tmp_path):
    """The readers see what they look for (so an empty offender list means something)."""
    sample = tmp_path / "pkg" / "mod.py"
    sample.parent.mkdir()
    sample.write_text("import torch\nfrom deepspeed.zero import Init\nfrom .sibling import x\n"
                      "def f():\n    return torch.distributed.get_rank()\n")
    modules = imported_modules(sample, root=tmp_path)
    assert "deepspeed.zero" in modules and "pkg.sibling" in modules
    assert uses_torch_distributed(sample)


def tracked_files() -> list[Path]:
    try:
        listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [REPO / line for line in listed.splitlines() if line and not line.startswith("sf/assets/")]


def test_the_project_stands_alone():
    """No file points at documents outside the repository or at issue numbers: docs/ and the code say it all."""
    pattern = re.compile(r"DESIGN\.md|\.\./shared|\bissue #\d+|\(issue \d+\)|\bissue \d+\b", re.IGNORECASE)
    hits = []
    for path in tracked_files():
        if path.suffix in (".png", ".safetensors", ".gif", ".mp4") or not path.is_file():
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if pattern.search(line):
                hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()[:80]}")
    assert hits == []
