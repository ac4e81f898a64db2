"""bench/provenance.py: a result names the commit it measured, the versions and the host, and can tell whether
the code changed since."""

from __future__ import annotations

import re

from bench.provenance import changed_since, provenance


def test_provenance_names_the_commit_versions_and_host():
    found = provenance()
    assert re.fullmatch(r"[0-9a-f]{12}|unknown", found["commit"])
    assert isinstance(found["is_dirty"], bool)
    assert {"ray", "openai"} <= set(found["versions"])
    assert found["host"]["num_cores"] >= 1 and found["host"]["memory_gib"] > 0 and found["host"]["python"]


def test_changes_since_a_commit_are_listed_and_an_unknown_commit_is_not_guessed():
    commit = provenance()["commit"]
    if commit != "unknown":
        assert changed_since(commit) == [] or all(isinstance(path, str) for path in changed_since(commit))
        assert changed_since(commit, paths=("no-such-path",)) == []
    assert changed_since("0" * 40) is None
