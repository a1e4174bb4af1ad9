"""The layout rules of DESIGN.md / STYLE.md, checked so that nobody breaks them by accident."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "platform" / "facemae"

# Model math, losses and data transforms are plain code, testable in one CPU process (STYLE.md 2).
PURE_MODULES = ["data/images.py", "data/masking.py", "data/synthetic.py", "data/recordio.py",
                "data/verification_bin.py", "data/shards.py", "config.py",
                "models/__init__.py", "models/mae.py", "models/fr.py", "models/registry.py",
                "losses/__init__.py", "losses/irm.py", "losses/margin.py", "losses/reconstruction.py",
                "train/__init__.py", "train/steps.py", "eval/verification.py", "measures/__init__.py",
                "measures/privacy.py", "measures/fidelity.py", "models/weights.py"]
FORBIDDEN = ("ray", "deepspeed", "torch.distributed")


def test_platform_is_not_a_package():
    # A package named `platform` would shadow the standard-library module that ray and torch import.
    assert not (ROOT / "platform" / "__init__.py").exists(), "remove platform/__init__.py"
    import platform

    assert hasattr(platform, "python_version"), f"`platform` resolves to {platform.__file__}, not the stdlib"


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("rel", [m for m in PURE_MODULES if (PKG / m).exists()])
def test_pure_modules_import_no_cluster_code(rel):
    bad = {n for n in _imports(PKG / rel) if any(n == f or n.startswith(f + ".") for f in FORBIDDEN)}
    assert not bad, f"{rel} imports {bad}; keep cluster code out of models, losses and transforms"


def test_import_walker_catches_a_forbidden_import(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import torch.distributed as dist\nfrom ray import train\n")
    assert _imports(bad) >= {"torch.distributed", "ray"}


def test_package_imports_and_console_script_exists():
    assert importlib.import_module("facemae").__file__.startswith(str(PKG))
    exe = Path(sys.executable).parent / "facemae"
    assert exe.exists(), "the facemae console script is missing: run scripts/setup.sh"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    for command in ("ingest", "mask", "verify"):
        assert command in out


def test_layout_folders_exist():
    for folder in ("platform/facemae", "jobs", "jobs/configs", "clusters", "tests", "benchmarks"):
        assert (ROOT / folder).is_dir(), folder
    for config in (ROOT / "jobs" / "configs").glob("*.yaml"):
        if not config.stem.endswith("_smoke"):
            assert (config.parent / f"{config.stem}_smoke.yaml").exists(), f"{config.name} has no _smoke twin"


# STYLE.md 12: imports flow one way. Each folder may import only from the floors below it; train,
# generate and eval share a floor and do not import each other (pure metrics live in measures/,
# weights I/O in models/weights.py).
FLOORS = {
    "console.py": 0, "storage.py": 0, "allocator.py": 0, "metrics.py": 0, "losses": 0, "measures": 0,
    "models": 1, "config.py": 2, "cluster.py": 3, "data": 4,
    "tracking.py": 4,
    "train": 5, "generate": 5, "eval": 5, "report.py": 5, "tune": 6, "pipeline.py": 6, "attacks.py": 6,
    "experiment.py": 7, "frontier.py": 8, "sdk.py": 9, "cli.py": 10, "__init__.py": 11,
}


def _floor(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if parts[0] != "facemae" or len(parts) < 2:
        return None
    for name in (parts[1], parts[1] + ".py"):
        if name in FLOORS:
            return name, FLOORS[name]
    return None


def test_imports_run_only_down_the_floors():
    upward = []
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        here = rel.parts[0]
        own = FLOORS[here]
        for name in _imports(path):
            target = _floor(name)
            if target and target[0] != here and target[1] >= own:
                upward.append(f"{rel} imports {name}")
    assert not upward, "imports that run up or sideways:\n" + "\n".join(upward)
