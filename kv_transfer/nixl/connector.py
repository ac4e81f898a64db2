"""The NIXL backend: vLLM's own NixlConnector (pull mode), made fit for small CPU hosts. Named in
kv_transfer/backend.py; it runs inside vLLM's engine process and reads `NixlExtraConfig` (kv_transfer/config.py).

Prefill keeps a finished prompt's blocks on a lease; decode's connector READs them straight from prefill's KV
cache over UCX (DRAM here, RDMA/GPU-direct where available) and renews the lease while it has the request.

`SplitserveNixlConnector` is vLLM's pull-mode NixlConnector with two CPU pathologies removed (docs/kv-transfer.md):
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

from kv_transfer.config import NixlExtraConfig


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
        if role != KVConnectorRole.WORKER:
            super().__init__(vllm_config, role, kv_cache_config)
            return
        extra = NixlExtraConfig.model_validate(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        affinity = os.sched_getaffinity(0)
        quiet = contextlib.nullcontext() if extra.use_progress_thread else _agent_without_progress_thread()
        with quiet:
            super().__init__(vllm_config, role, kv_cache_config)
        if extra.keep_engine_affinity:
            os.sched_setaffinity(0, affinity)
