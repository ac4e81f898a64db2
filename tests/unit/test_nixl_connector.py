"""Our NIXL connector is vLLM's NixlConnector without NIXL's busy progress thread (kv_transfer/nixl/connector.py)."""

from __future__ import annotations

from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

from kv_transfer.nixl.connector import _agent_without_progress_thread


def test_agents_built_inside_the_guard_have_no_progress_thread_and_the_guard_restores_vllm():
    original = base_worker.nixl_agent_config
    with _agent_without_progress_thread():
        # vLLM calls it exactly like this in NixlConnectorWorker.__init__.
        config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
        assert config.enable_pthread is False
        assert config.num_threads == 4
    assert base_worker.nixl_agent_config is original
    assert original(num_threads=4).enable_pthread is True  # NIXL's default: the busy-polling thread
