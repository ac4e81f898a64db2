"""`auto` picks NIXL when it imports and its probe moves bytes, else the object store; decided once."""

from __future__ import annotations

import pytest

from kv_transfer.probe import can_use_nixl
from kv_transfer.selection import engine_kv_transfer_config, resolve_backend
from serve_app.config import TransferConfig


def test_auto_follows_the_probe_and_explicit_choices_stay():
    assert resolve_backend(TransferConfig(backend="auto"), probe=lambda: (True, "ok")).backend == "nixl"
    assert resolve_backend(TransferConfig(backend="auto"), probe=lambda: (False, "no")).backend == "object_store"
    never_called = lambda: pytest.fail("the probe runs only for auto")  # noqa: E731
    assert resolve_backend(TransferConfig(backend="object_store"), probe=never_called).backend == "object_store"
    assert resolve_backend(TransferConfig(backend="nixl"), probe=never_called).backend == "nixl"


def test_the_real_probe_passes_on_this_host():
    is_usable, reason = can_use_nixl()
    assert is_usable, reason
    assert reason.startswith("ok: NIXL/UCX moved")
    assert resolve_backend(TransferConfig(backend="auto")).backend == "nixl"


def test_with_nixl_made_unavailable_auto_picks_the_object_store(tmp_path, monkeypatch):
    broken = tmp_path / "nixl"
    broken.mkdir()
    (broken / "__init__.py").write_text("raise ImportError('NIXL removed for this test')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))  # the probe's subprocess now finds this nixl first

    is_usable, reason = can_use_nixl()
    assert not is_usable and "does not import" in reason
    assert resolve_backend(TransferConfig(backend="auto")).backend == "object_store"


def test_engines_never_see_auto():
    with pytest.raises(ValueError, match="auto"):
        engine_kv_transfer_config(TransferConfig(backend="auto"), is_producer=True, engine_id="e")
