"""The transport seam of this slice: vLLM's NixlConnector, configured per role, without NIXL's busy thread."""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

from kv_transfer.nixl_handoff import (
    CONNECTOR_CLASS,
    CONNECTOR_MODULE,
    _agent_without_progress_thread,
    buffer_device,
    kv_transfer_config,
)
from serve_app.config import TransferConfig


def test_prefill_produces_and_decode_consumes_through_our_connector():
    transfer = TransferConfig(kv_lease_s=45)
    prefill = kv_transfer_config(transfer, is_producer=True, engine_id="prefill-0-a")
    decode = kv_transfer_config(transfer, is_producer=False, engine_id="decode-0-b")
    assert (prefill["kv_role"], decode["kv_role"]) == ("kv_producer", "kv_consumer")
    assert prefill["kv_connector"] == CONNECTOR_CLASS and prefill["kv_connector_module_path"] == CONNECTOR_MODULE
    assert prefill["kv_buffer_device"] == "cpu"
    assert prefill["kv_connector_extra_config"]["kv_lease_duration"] == 45
    assert decode["engine_id"] == "decode-0-b"


def test_agents_built_inside_the_guard_have_no_progress_thread_and_the_guard_restores_vllm():
    original = base_worker.nixl_agent_config
    with _agent_without_progress_thread():
        # vLLM calls it exactly like this in NixlConnectorWorker.__init__.
        config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
        assert config.enable_pthread is False
        assert config.num_threads == 4
    assert base_worker.nixl_agent_config is original
    assert original(num_threads=4).enable_pthread is True  # NIXL's default: the busy-polling thread


def test_nixl_reads_the_engines_own_kv_cache_unless_told_to_stage_through_host_memory():
    assert buffer_device(TransferConfig()) == "cpu"  # this host: vLLM's CPU platform
    assert buffer_device(TransferConfig(), engine_device_type="cuda") == "cuda"  # GPU-direct
    assert buffer_device(TransferConfig(nixl_buffer_device="cpu"), engine_device_type="cuda") == "cpu"  # staged
