"""A compiled copy of the simulator and of the live scheduler's code, for large simulations.

A large run spends its time in five modules: the simulator's (bench/sim/simulator.py, machine.py) and the
scheduler's (deployments/scheduling/loads.py, rates.py, policies.py: the very source the live router imports).
mypyc, mypy's compiler (the Makefile installs it, pinned, into .venv/tools/mypyc, apart from the app's packages:
the app never needs a compiler), turns them into C extensions from their own type annotations: the same source
with the same decisions (tests/unit/test_sim_compile.py replays a run both ways), 2.2 times faster on the scale
benchmark (bench/results/sim/scale_compiled).

1. `compiled_tree()`: the copy for the sources as they are now, under .cache/sim-compiled/<hash of every source
   file of the project's packages>/: the packages' .py files copied, their data folders linked (traces, results),
   then the five modules compiled in place, where their extensions take precedence over the .py beside them.
   Built once per version of the sources (about 15 s, said as it starts) and kept until they change.
2. `run_compiled(module, args)`: runs `python -m module args` in a process whose imports come from that copy (its
   folder first on sys.path), in this working directory. The checkout itself never holds an extension, so the live
   app and every edit to a source run the source; an edited source builds a fresh copy.
3. `compiled_modules()`: which of the five modules a process imported compiled, for a run to say what it ran.

    python -m bench.sim_compile        # build (or find) the copy and print its folder
    python -m bench.sim_scale --compiled   # a large run from it
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib.metadata import distributions
from pathlib import Path
from typing import Any, NoReturn

from bench.processes import PROJECT_ROOT
from bench.result_files import CHECKOUT_ENV

PACKAGES = ("bench", "deployments", "kv_transfer", "serve_app")
COMPILED_FLAG = "--compiled"
COMPILED_TREE_ENV = "SPLITSERVE_COMPILED_TREE"  # set in a process run_compiled starts: its copy
COMPILED_MODULES = ("bench/sim/simulator.py", "bench/sim/machine.py", "deployments/scheduling/loads.py",
                    "deployments/scheduling/rates.py", "deployments/scheduling/policies.py")
# Imports outside the five are taken as they come (typed Any): checking them (pydantic, the engines' packages) took
# the build from 11 s to 4 min, for a run 6% faster.
MYPYC_ARGS = ("--ignore-missing-imports", "--follow-imports=skip")
LINKED_DATA = ("bench/data", "bench/results")  # read (traces, the profile) and written (results) where they are
TREES_DIR = PROJECT_ROOT / ".cache" / "sim-compiled"
MYPYC_TOOL = Path(sys.prefix) / "tools" / "mypyc"  # `make setup`'s (the Makefile's MYPYC_TOOL), never on sys.path


def source_hash(root: Path = PROJECT_ROOT) -> str:
    """Every .py file of the project's packages, the compiler's version and flags: a change to any builds a new
    copy."""
    digest = hashlib.sha256(" ".join([_mypy_version(), *MYPYC_ARGS]).encode())
    for path in source_files(root):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def compiled_tree(root: Path = PROJECT_ROOT, trees_dir: Path = TREES_DIR) -> Path:
    """1. The compiled copy of the current sources, built if missing."""
    tree = trees_dir / source_hash(root)
    if (tree / "COMPILED").exists():
        return tree
    trees_dir.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(prefix="building-", dir=trees_dir))
    for path in source_files(root):
        target = building / path.relative_to(root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
    for data in LINKED_DATA:
        if (root / data).exists():
            (building / data).symlink_to(root / data, target_is_directory=True)
    print(f"compiling {len(COMPILED_MODULES)} modules with mypyc into {tree} (about 15 s, once per version of the "
          "sources)", file=sys.stderr, flush=True)
    log = building / "mypyc.log"
    with open(log, "w") as output:
        built = subprocess.run([sys.executable, "-m", "mypyc", *MYPYC_ARGS, *COMPILED_MODULES], cwd=building,
                               stdout=output, stderr=subprocess.STDOUT,
                               env={**os.environ, "PYTHONPATH": str(MYPYC_TOOL)})
    if built.returncode != 0:
        tail = log.read_text()[-3000:]
        shutil.rmtree(building, ignore_errors=True)
        raise RuntimeError(f"mypyc could not compile the simulator (exit {built.returncode}; mypyc is installed in "
                           f"{MYPYC_TOOL} by `make setup`):\n{tail}")
    shutil.rmtree(building / "build", ignore_errors=True)  # intermediate C sources and objects
    (building / "COMPILED").write_text("\n".join(COMPILED_MODULES) + "\n")
    try:
        building.rename(tree)
    except OSError:  # another process built the same version meanwhile: keep theirs
        shutil.rmtree(building, ignore_errors=True)
    for older in trees_dir.iterdir():  # copies of older sources are never used again
        if older != tree and not older.name.startswith("building-"):
            shutil.rmtree(older, ignore_errors=True)
    return tree


def run_compiled(module: str, args: list[str], root: Path = PROJECT_ROOT) -> int:
    """2. `python -m module args` with imports from the compiled copy; returns its exit status."""
    tree = compiled_tree(root)
    # The copy goes first on sys.path, ahead of the working directory (so relative paths in `args` mean what they
    # mean here) and of the checkout's own install.
    launcher = (f"import runpy, sys; sys.path.insert(0, {str(tree)!r}); sys.argv = [{module!r}, *sys.argv[1:]]; "
                f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    # Its results name the checkout's commit; init_ray finds the copy for the Ray workers it starts.
    environment = {**os.environ, CHECKOUT_ENV: str(root), COMPILED_TREE_ENV: str(tree)}
    return subprocess.run([sys.executable, "-c", launcher, *args], env=environment).returncode


def init_ray(**kwargs: Any) -> None:
    """`ray.init` for a command that may run from the copy (bench.sim_plan's tasks). Ray puts the driver's working
    directory first on its workers' sys.path, where the checkout's own `bench` would shadow the copy's: a run from
    the copy starts Ray in the copy's folder, so that its tasks import what the driver imports (they read no
    relative path)."""
    import ray

    tree = os.environ.get(COMPILED_TREE_ENV)
    with contextlib.chdir(tree) if tree else contextlib.nullcontext():
        ray.init(**kwargs)


def add_compiled_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(COMPILED_FLAG, action="store_true",
                        help="run from a copy of the sources compiled by mypyc (bench/sim_compile.py; built once)")


def run_compiled_instead(module: str, argv: list[str] | None) -> NoReturn:
    """A command given COMPILED_FLAG: the same command in a process that imports the compiled copy, whose exit
    status this process exits with."""
    sys.exit(run_compiled(module, [arg for arg in (sys.argv[1:] if argv is None else argv) if arg != COMPILED_FLAG]))


def compiled_modules() -> list[str]:
    """3. The five modules as this process imported them: the dotted names of those that are extensions."""
    names = [path.removesuffix(".py").replace("/", ".") for path in COMPILED_MODULES]
    return [name for name in names if not str(importlib.import_module(name).__file__).endswith(".py")]


def source_files(root: Path) -> list[Path]:
    """The project's Python sources under `root`, in a fixed order (the data folders left out)."""
    return sorted(path for package in PACKAGES for path in (root / package).rglob("*.py")
                  if not any(path.relative_to(root).is_relative_to(data) for data in LINKED_DATA))


def _mypy_version() -> str:
    found = [distribution.version for distribution in distributions(name="mypy", path=[str(MYPYC_TOOL)])]
    return found[0] if found else "none"  # not installed: the build says so (`make setup` installs it)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--which", action="store_true",
                        help="print the modules this process imports compiled (run through `run_compiled`)")
    args = parser.parse_args(argv)
    print(json.dumps(compiled_modules()) if args.which else compiled_tree())


if __name__ == "__main__":
    main()
