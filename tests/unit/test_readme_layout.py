"""The README's layout section maps each step of a request to its modules; every module it names exists and
imports, so the map cannot go stale (a renamed or moved module fails here)."""

from __future__ import annotations

import importlib
import re

from serve_app.config import PROJECT_ROOT

STEPS = ["HTTP", "router", "hand-off", "prefill", "KV out", "transport", "decode", "tokens"]


def _layout_section() -> str:
    readme = (PROJECT_ROOT / "README.md").read_text()
    start = readme.index("## Layout")
    return readme[start:readme.index("\n## ", start + 1)]


def _step_rows() -> dict[str, list[str]]:
    rows = re.findall(r"^\| ([^|]+?) \| (.+?) \|$", _layout_section(), flags=re.MULTILINE)
    return {step: re.findall(r"`([\w/]+\.py)`", modules) for step, modules in rows if step not in ("step", "---")}


def test_every_step_of_a_request_has_modules_in_the_map():
    rows = _step_rows()
    assert list(rows) == STEPS
    assert all(rows.values()), rows


def test_every_module_the_layout_names_exists_and_imports():
    named = {path for paths in _step_rows().values() for path in paths}
    assert len(named) >= len(STEPS)
    for path in sorted(named):
        assert (PROJECT_ROOT / path).is_file(), path
        importlib.import_module(path.removesuffix(".py").replace("/", "."))


def test_every_file_the_tree_names_exists():
    """Each line of the folder tree names files of its folder (a subfolder's lines are indented under it)."""
    tree = _layout_section().split("```")[1]
    top = folder = ""
    for line in tree.splitlines():
        words = line.split()
        if words and words[0].endswith("/"):
            folder = top + words[0] if line.startswith(" ") else words[0]
            top = top if line.startswith(" ") else words[0]
        for file_name in re.findall(r"\b(\w+\.py)\b", line):
            assert (PROJECT_ROOT / folder / file_name).is_file(), (folder, file_name, line)
