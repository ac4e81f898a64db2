"""The architecture is a checked contract: import-linter's contracts in pyproject.toml hold for the tree, and they
are live (an engine module that imports the router, or a scheduler that reaches Ray, breaks them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from serve_app.config import PROJECT_ROOT

PACKAGES = ("serve_app", "deployments", "kv_transfer", "bench", "tests")
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    # The packages are found on PYTHONPATH first (the editable install would find the project's own otherwise).
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=300)


def test_every_contract_is_kept():
    result = _lint_imports(PROJECT_ROOT)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_engine_module_that_imports_the_router_and_a_scheduler_that_reaches_ray_break_contracts(tmp_path):
    for package in PACKAGES:
        shutil.copytree(PROJECT_ROOT / package, tmp_path / package,
                        ignore=shutil.ignore_patterns("__pycache__", "results", "data"))
    shutil.copy(PROJECT_ROOT / "pyproject.toml", tmp_path)
    engine = tmp_path / "deployments" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom deployments.router import Router  # noqa\n")
    # Ray reached through another module of ours, not imported directly: the contract follows the chain.
    rates = tmp_path / "deployments" / "scheduling" / "rates.py"
    rates.write_text(rates.read_text() + "\nimport deployments.handoff  # noqa\n")

    result = _lint_imports(tmp_path)
    assert result.returncode != 0
    assert "Engine replicas never import the router's modules BROKEN" in result.stdout
    assert "The scheduler is pure" in result.stdout and "deployments BROKEN" in result.stdout
