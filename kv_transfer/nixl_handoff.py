"""The KV handoff of this slice: vLLM's own NixlConnector over DRAM (UCX), made fit for small CPU hosts.

This is the one seam between splitserve and the KV transport: `kv_transfer_config(...)` is all an engine needs,
and `KVHandle` (handle.py) is all the router sees. Our own transports replace what is behind it.

`SplitserveNixlConnector` is vLLM's pull-mode NixlConnector with two CPU pathologies removed (FACTS.md):
1. On the CPU platform, vLLM moves the model thread onto the last core of each NUMA node when the connector's
   worker half is built; on a 2-core host both engines would then compute on core 1. We restore the affinity
   the engine had (vLLM's VLLM_CPU_OMP_THREADS_BIND) once the worker half is built.
2. NIXL's default progress thread busy-polls a whole core per agent. vLLM's connector already polls transfers
   and notifications from the engine loop every step, so we build the agent without that thread.
Both are opt-out through `transfer.keep_engine_affinity` / `transfer.use_progress_thread`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _nixl_base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlPullConnector

from serve_app.config import TransferConfig

CONNECTOR_CLASS = "SplitserveNixlConnector"
CONNECTOR_MODULE = __name__


@contextlib.contextmanager
def _agent_without_progress_thread() -> Iterator[None]:
    original = _nixl_base_worker.nixl_agent_config
    if original is None:  # NIXL not importable: let vLLM raise its own clear error
        yield
        return

    def config_without_progress_thread(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_prog_thread"] = False
        return original(*args, **kwargs)

    _nixl_base_worker.nixl_agent_config = config_without_progress_thread
    try:
        yield
    finally:
        _nixl_base_worker.nixl_agent_config = original


class SplitserveNixlConnector(NixlPullConnector):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any):
        extra = vllm_config.kv_transfer_config.kv_connector_extra_config or {}
        if role != KVConnectorRole.WORKER:
            super().__init__(vllm_config, role, kv_cache_config)
            return
        affinity = os.sched_getaffinity(0)
        quiet = contextlib.nullcontext() if extra.get("use_progress_thread") else _agent_without_progress_thread()
        with quiet:
            super().__init__(vllm_config, role, kv_cache_config)
        if extra.get("keep_engine_affinity", True):
            os.sched_setaffinity(0, affinity)


def buffer_device(transfer: TransferConfig, engine_device_type: str | None = None) -> str:
    """Where NIXL reads KV from: the engine's KV cache itself (`auto`), or host staging (`cpu`)."""
    if transfer.nixl_buffer_device != "auto":
        return transfer.nixl_buffer_device
    if engine_device_type is None:
        from vllm.platforms import current_platform

        engine_device_type = current_platform.device_type
    return "cuda" if engine_device_type == "cuda" else "cpu"


def kv_transfer_config(transfer: TransferConfig, *, is_producer: bool, engine_id: str) -> dict[str, Any]:
    """vLLM's kv_transfer_config for one engine: producer on prefill, consumer on decode."""
    return {
        "kv_connector": CONNECTOR_CLASS,
        "kv_connector_module_path": CONNECTOR_MODULE,
        "kv_role": "kv_producer" if is_producer else "kv_consumer",
        "engine_id": engine_id,
        "kv_buffer_device": buffer_device(transfer),
        # A failed or expired read makes decode compute those tokens itself instead of failing the request.
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {
            "use_progress_thread": transfer.use_progress_thread,
            "keep_engine_affinity": transfer.keep_engine_affinity,
            # Prefill frees a finished request's blocks after this many seconds unless decode's reads renew it.
            "kv_lease_duration": transfer.kv_lease_s,
        },
    }
