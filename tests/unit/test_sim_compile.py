"""The simulator's compiled copy (bench/sim_compile.py): the same code, compiled, deciding the same.

1. The copy is built from the checkout's sources (or found, if these sources were built before).
2. Its five modules are extensions in a process run from it, and sources here.
3. One simulation of the default policy, from the sources and from the copy, writes the same requests.csv, byte for
   byte: every decision and every time equal.
4. An edit to a source names another copy; the checkout itself holds no extension.
"""

from __future__ import annotations

import json
import subprocess
import sys

from bench import sim_compile
from bench.processes import PROJECT_ROOT

SIMULATION = ["--config", "bench/sim/configs/host_1p1d.yaml", "--trace", "conv", "--rate", "1.2", "--duration", "300"]


def test_a_compiled_run_decides_and_times_exactly_as_the_sources(tmp_path, capfd):
    # 1. Built or found.
    tree = sim_compile.compiled_tree()
    assert (tree / "COMPILED").exists() and tree.parent == sim_compile.TREES_DIR

    # 2. Extensions there, sources here.
    assert sim_compile.run_compiled("bench.sim_compile", ["--which"]) == 0
    compiled = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert compiled == [path.removesuffix(".py").replace("/", ".") for path in sim_compile.COMPILED_MODULES]
    assert sim_compile.compiled_modules() == []

    # 3. The same simulation both ways.
    subprocess.run([sys.executable, "-m", "bench.simulate", *SIMULATION, "--out", str(tmp_path / "source")],
                   cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert sim_compile.run_compiled("bench.simulate", [*SIMULATION, "--out", str(tmp_path / "compiled")]) == 0
    source, compiled_run = (tmp_path / "source" / "requests.csv").read_text(), \
        (tmp_path / "compiled" / "requests.csv").read_text()
    assert len(source.splitlines()) > 300  # a few hundred requests, the rates learned and used
    assert compiled_run == source
    run = json.loads((tmp_path / "compiled" / "run.json").read_text())
    assert run["commit"] != "unknown"  # the copy's run names the checkout's commit

    # 4. Nothing compiled in the checkout; another source, another copy.
    assert not [path for package in sim_compile.PACKAGES for path in (PROJECT_ROOT / package).rglob("*.so")]
    edited = tmp_path / "checkout"
    for path in sim_compile.source_files(PROJECT_ROOT):
        target = edited / path.relative_to(PROJECT_ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(path.read_bytes())
    assert sim_compile.source_hash(edited) == sim_compile.source_hash(PROJECT_ROOT)
    rates = edited / "deployments" / "scheduling" / "rates.py"
    rates.write_text(rates.read_text() + "\n# an edit\n")
    assert sim_compile.source_hash(edited) != sim_compile.source_hash(PROJECT_ROOT)


def test_a_compiled_plan_runs_its_ray_tasks_from_the_copy_too(tmp_path):
    """Ray puts the driver's working directory (the checkout) first on its workers' sys.path: a plan run from the
    copy must still simulate in the copy (sim_compile.init_ray), and plan exactly as the sources do."""
    plan = ["--config", "bench/sim/configs/host_1p1d.yaml", "--trace", "conv", "--rate", "1", "--duration", "30",
            "--machines", "2", "--policies", "predictive"]
    subprocess.run([sys.executable, "-m", "bench.sim_plan", *plan, "--out", str(tmp_path / "source")],
                   cwd=PROJECT_ROOT, check=True, capture_output=True)
    assert sim_compile.run_compiled("bench.sim_plan", [*plan, "--out", str(tmp_path / "compiled")]) == 0
    every_module = [path.removesuffix(".py").replace("/", ".") for path in sim_compile.COMPILED_MODULES]
    runs = {side: json.loads((tmp_path / side / "run.json").read_text()) for side in ("source", "compiled")}
    assert runs["compiled"]["compiled_modules"] == every_module
    assert runs["compiled"]["tasks_compiled_modules"] == [every_module]
    assert runs["source"]["tasks_compiled_modules"] == [[]]
    assert (tmp_path / "compiled" / "plan.csv").read_text() == (tmp_path / "source" / "plan.csv").read_text()
