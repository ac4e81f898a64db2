"""kv_transfer/backend.py: `auto` is decided once (NIXL when it imports and its probe moves bytes, else the object
store), and each engine's `kv_transfer_config` is built in this one place from the user's TransferConfig."""

from __future__ import annotations

import importlib
import subprocess
import sys
from types import SimpleNamespace

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1

from kv_transfer.backend import CONNECTORS, kv_transfer_config, nixl_buffer_device, resolve_backend, store_name
from kv_transfer.config import NixlExtraConfig, ObjectStoreExtraConfig, TransferConfig
from kv_transfer.nixl.probe import can_use_nixl


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
        kv_transfer_config(TransferConfig(backend="auto"), is_producer=True, engine_id="e")


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_each_connector_named_here_is_a_vllm_connector(name):
    class_name, module = CONNECTORS[name]
    assert issubclass(getattr(importlib.import_module(module), class_name), KVConnectorBase_V1)


def test_nixl_prefill_produces_and_decode_consumes_through_our_connector():
    transfer = TransferConfig(backend="nixl", kv_lease_s=45)
    prefill = kv_transfer_config(transfer, is_producer=True, engine_id="prefill-0-a")
    decode = kv_transfer_config(transfer, is_producer=False, engine_id="decode-0-b")
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert (prefill["kv_connector"], prefill["kv_connector_module_path"]) == CONNECTORS["nixl"]
    assert prefill["kv_buffer_device"] == "cpu"
    assert prefill["kv_load_failure_policy"] == "recompute"
    assert decode["engine_id"] == "decode-0-b"
    # The typed extra config round-trips, and the lease is vLLM's own key.
    assert NixlExtraConfig.model_validate(prefill["kv_connector_extra_config"]).kv_lease_duration == 45


def test_object_store_prefill_sends_through_its_own_store_and_decode_has_none(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "get_runtime_context",
                        lambda: SimpleNamespace(gcs_address="127.0.0.1:6379", namespace="serve"))
    transfer = TransferConfig(backend="object_store", load_timeout_s=7, is_layer_by_layer=False, is_load_in_step=False)
    prefill = kv_transfer_config(transfer, is_producer=True, engine_id="prefill-0-a")
    decode = kv_transfer_config(transfer, is_producer=False, engine_id="decode-0-b")
    assert (prefill["kv_connector"], prefill["kv_connector_module_path"]) == CONNECTORS["object_store"]
    assert "kv_buffer_device" not in prefill
    sent, received = (ObjectStoreExtraConfig.model_validate(config["kv_connector_extra_config"])
                      for config in (prefill, decode))
    assert sent == ObjectStoreExtraConfig(ray_address="127.0.0.1:6379", ray_namespace="serve",
                                          store_name=store_name("prefill-0-a"), load_timeout_s=7,
                                          is_layer_by_layer=False, is_load_in_step=False)
    assert received.store_name is None


def test_nixl_reads_the_engines_own_kv_cache_unless_told_to_stage_through_host_memory():
    assert nixl_buffer_device(TransferConfig()) == "cpu"  # this host: vLLM's CPU platform
    assert nixl_buffer_device(TransferConfig(), engine_device_type="cuda") == "cuda"  # GPU-direct
    assert nixl_buffer_device(TransferConfig(nixl_buffer_device="cpu"), engine_device_type="cuda") == "cpu"  # staged


def test_building_a_config_never_imports_the_nixl_connector():
    """The NIXL connector's module resets Python logging when imported: the replica that builds its engine's config
    must not import it (vLLM imports it inside the engine process)."""
    code = ("import sys; from kv_transfer.backend import kv_transfer_config; from kv_transfer.config import "
            "TransferConfig; kv_transfer_config(TransferConfig(backend='nixl'), is_producer=True, engine_id='e'); "
            "print(sorted(name for name in sys.modules if 'nixl.connector' in name))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout
