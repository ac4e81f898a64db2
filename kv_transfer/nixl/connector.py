"""The NIXL backend: vLLM's own NixlConnector (pull mode), made fit for small CPU hosts. Named in
kv_transfer/backend.py; it runs inside vLLM's engine process and reads `NixlExtraConfig` (kv_transfer/config.py).

Prefill keeps a finished prompt's blocks on a lease; decode's connector READs them straight from prefill's KV
cache over UCX (DRAM here, RDMA/GPU-direct where available) and renews the lease while it has the request.

`SplitserveNixlConnector` is vLLM's pull-mode NixlConnector with two CPU pathologies removed (docs/kv-transfer.md):
1. On the CPU platform, vLLM moves the model thread onto the last core of each NUMA node when the connector's
   worker half is built; on a 2-core host both engines would then compute on core 1. We restore the affinity
   the engine had (vLLM's VLLM_CPU_OMP_THREADS_BIND) once the worker half is built.
2. NIXL's default progress thread busy-polls a whole core per agent (its Python API hard-codes a zero delay), and
   without a thread a READ moves only when the source's engine loop polls, between steps: under load every
   hand-over waited out one of prefill's forward passes (seconds on a CPU). We build the agent with a progress
   thread that waits `transfer.nixl_progress_interval_us` between passes: transfers move during the forward pass
   at ~3% of a core per agent.
3. With that thread, two threads of an engine share its UCX worker, on the engine's own cores. UCX's default lock
   spins: while decode's model thread held the worker mid-READ and waited for the core, the progress thread spun
   out its time slice, and an in-step READ took 2-4x the kernel's copy. We build the agent with UCX's mutex
   (UCX_USE_MT_MUTEX), so that the waiting thread sleeps (bench/results/nixl_mt_mutex).
All three are configurable (`transfer.keep_engine_affinity`, `transfer.nixl_progress_interval_us`,
`transfer.nixl_ucx_lock`).

It also loads a split's KV inside the decode step that computes it, where vLLM's loads it in the background and
computes it a step later (`transfer.is_load_in_step`, the default; kv_transfer/nixl/in_step.py, scheduler_side.py,
worker_side.py).
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker as _nixl_base_worker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector import NixlBaseConnector, NixlPullConnector

from kv_transfer.config import NixlExtraConfig
from kv_transfer.nixl.in_step import ReadyEngines, SplitserveNixlStats
from kv_transfer.nixl.scheduler_side import InStepNixlScheduler
from kv_transfer.nixl.worker_side import InStepNixlWorker


# UCX reads its configuration from the environment when NIXL makes the agent's UCX context.
UCX_LOCK_ENV = "UCX_USE_MT_MUTEX"
_UCX_LOCK_VALUES = {"mutex": "y", "spin": "n"}


@contextlib.contextmanager
def _ucx_lock(kind: str) -> Iterator[None]:
    """UCX contexts made inside wait for a busy worker as `kind` says ("mutex": asleep, "spin": UCX's default),
    unless the environment already sets UCX_USE_MT_MUTEX (the user's own UCX setting wins)."""
    if UCX_LOCK_ENV in os.environ:
        yield
        return
    os.environ[UCX_LOCK_ENV] = _UCX_LOCK_VALUES[kind]
    try:
        yield
    finally:
        del os.environ[UCX_LOCK_ENV]


@contextlib.contextmanager
def _agent_progress(interval_us: int | None, ucx_lock: str) -> Iterator[None]:
    """Agents built inside get NIXL's progress thread waiting `interval_us` between passes (None: no thread), and
    UCX's `ucx_lock` on their worker. vLLM builds its agent from `nixl_agent_config(...)` and NIXL's Python agent
    then sets the thread's delay to 0 on the C++ config; neither exposes it, so both calls are wrapped for as long
    as vLLM builds its worker."""
    original_config = _nixl_base_worker.nixl_agent_config
    if original_config is None:  # NIXL not importable: let vLLM raise its own clear error
        yield
        return
    bindings = sys.modules[original_config.__module__].nixlBind  # the nixl_cu12/nixl_cu13 build vLLM imported
    original_agent = bindings.nixlAgent

    def config_with_progress(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_prog_thread"] = interval_us is not None
        return original_config(*args, **kwargs)

    def agent_with_delay(name: str, agent_config: Any) -> Any:
        if interval_us is not None:
            agent_config.pthrDelay = interval_us
        return original_agent(name, agent_config)

    _nixl_base_worker.nixl_agent_config, bindings.nixlAgent = config_with_progress, agent_with_delay
    try:
        with _ucx_lock(ucx_lock):
            yield
    finally:
        _nixl_base_worker.nixl_agent_config, bindings.nixlAgent = original_config, original_agent


class SplitserveNixlConnector(NixlPullConnector):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any):
        # vLLM's NixlPullConnector.__init__, with our scheduler and worker halves in place of vLLM's.
        NixlBaseConnector.__init__(self, vllm_config, role, kv_cache_config)
        extra = NixlExtraConfig.model_validate(vllm_config.kv_transfer_config.kv_connector_extra_config or {})
        self._reported_engines: frozenset[str] | None = None
        if role == KVConnectorRole.SCHEDULER:
            self.connector_scheduler = InStepNixlScheduler(vllm_config, self.engine_id, kv_cache_config,
                                                           is_load_in_step=extra.is_load_in_step)
            return
        affinity = os.sched_getaffinity(0)
        with _agent_progress(extra.progress_interval_us, extra.ucx_lock):
            self.connector_worker = InStepNixlWorker(vllm_config, self.engine_id, kv_cache_config,
                                                     load_timeout_s=extra.load_timeout_s)
        if extra.keep_engine_affinity:
            os.sched_setaffinity(0, affinity)

    def build_connector_worker_meta(self) -> ReadyEngines | None:
        """The prefill engines the worker holds a connection to, when they changed (in_step.py, step 1)."""
        engine_ids = self.connector_worker.ready_engine_ids()
        if engine_ids == self._reported_engines:
            return None
        self._reported_engines = engine_ids
        return ReadyEngines(engine_ids)

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> SplitserveNixlStats:
        return SplitserveNixlStats(data=data) if data is not None else SplitserveNixlStats()
