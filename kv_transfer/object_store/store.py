"""The KV store: who holds which request's KV blocks, for how long, and how much memory that takes.

Life cycle of one transfer (key = the request's id):
1. `open(key, layout)`: prefill announces a transfer. The store reserves `layout.nbytes` against its bound, or
   refuses (`KVStoreFullError`: prefill keeps nothing and decode will recompute). A lease starts.
2. `add_chunk(key, first_index, num_parts, ref)`: prefill hands over one object reference per batch of parts
   (layers), as they are staged.
3. `claim(key)`: decode waits until every part has arrived, then gets the references and a renewed lease.
4. `release(key)`: decode has copied the KV into its own blocks; the store drops the references, so Ray frees
   the objects. A lease that runs out first drops them the same way (`KVExpiredError` for a late claim).

Ownership: the store holds references, never the bytes; an object lives as long as the process that put it
(prefill's engine worker) and as long as the store references it. Each prefill replica creates its own store
(`create_store`), so the store is owned by that replica: Ray restarts it (empty) if it crashes, and it goes away
with the replica, whose engine made the KV. Decode finds it by the name that travels in the KV handle.
`KVStoreState` (store_state.py) is the bookkeeping, plain Python, tested with a fake clock; `KVStoreActor` is the
actor, which also publishes its occupancy and lease expirations through Ray's metrics (`StoreMetrics`), by store.
"""

from __future__ import annotations

import asyncio
from typing import Any

from kv_transfer.errors import KVTimeoutError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.store_state import KVStoreState, StoreCounters
from kv_transfer.transport import KVTicket

# Ray drops a gauge's series when it is not set again within two metric-export intervals (20 s by default): the
# reaper republishes the store's gauges at least this often, also when no request comes.
MAX_PUBLISH_INTERVAL_S = 5.0


class StoreMetrics:
    """What an operator watches on a store: memory held against its bound, transfers open, leases expired."""

    def __init__(self, name: str, capacity_bytes: int):
        from ray.util import metrics

        tags = {"store": name}
        self.bytes_in_use = metrics.Gauge("splitserve_kv_store_bytes_in_use", "KV bytes the store holds.",
                                          tag_keys=("store",))
        self.capacity = metrics.Gauge("splitserve_kv_store_capacity_bytes", "The store's memory bound.",
                                      tag_keys=("store",))
        self.open_transfers = metrics.Gauge("splitserve_kv_store_open_transfers",
                                            "Transfers opened and not yet released or expired.", tag_keys=("store",))
        self.expired = metrics.Counter("splitserve_kv_store_leases_expired",
                                       "Transfers dropped because decode did not release them within the lease.",
                                       tag_keys=("store",))
        self.rejected_full = metrics.Counter("splitserve_kv_store_rejected_full",
                                             "Transfers refused because the store was full (decode recomputes).",
                                             tag_keys=("store",))
        for metric in (self.bytes_in_use, self.capacity, self.open_transfers, self.expired, self.rejected_full):
            metric.set_default_tags(tags)
        self._capacity_bytes = capacity_bytes
        for counter in (self.expired, self.rejected_full):  # exist at 0 before the first event (as export_zero)
            counter._record(0)
        self._num_expired = self._num_rejected_full = 0  # already counted

    def publish(self, counters: StoreCounters) -> None:
        self.capacity.set(self._capacity_bytes)
        self.bytes_in_use.set(counters.num_bytes_in_use)
        self.open_transfers.set(counters.num_open)
        if counters.num_expired > self._num_expired:
            self.expired.inc(counters.num_expired - self._num_expired)
        if counters.num_rejected_full > self._num_rejected_full:
            self.rejected_full.inc(counters.num_rejected_full - self._num_rejected_full)
        self._num_expired, self._num_rejected_full = counters.num_expired, counters.num_rejected_full


class KVStoreActor:
    """The store as an async Ray actor: claims wait for parts still in flight; a reaper enforces leases."""

    def __init__(self, capacity_bytes: int, lease_s: float, name: str):
        self._state = KVStoreState(capacity_bytes, lease_s, name=name)
        self._arrivals: dict[str, asyncio.Event] = {}
        self._reaper: asyncio.Task | None = None
        self._metrics = StoreMetrics(name, capacity_bytes)

    def _ensure_reaper(self) -> None:
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap())

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(MAX_PUBLISH_INTERVAL_S, max(0.05, self._state.lease_s / 4)))
            for key in self._state.expire():
                self._arrivals.pop(key, None)
            self._metrics.publish(self._state.counters())

    async def open(self, key: str, layout: KVLayout) -> KVTicket:
        self._ensure_reaper()
        try:
            ticket = self._state.open(key, layout)
        finally:
            self._metrics.publish(self._state.counters())
        self._arrivals[key] = asyncio.Event()
        return ticket

    async def add_chunk(self, key: str, first_index: int, num_parts: int, wrapped_ref: list[Any]) -> None:
        """Parts first_index.. first_index+num_parts-1 are the items of one object; `wrapped_ref` holds its
        ObjectRef in a list, so that Ray passes the reference unresolved instead of fetching the bytes."""
        located = [(wrapped_ref, position) for position in range(num_parts)]
        if self._state.add_parts(key, first_index, located):
            self._arrivals[key].set()

    async def claim(self, key: str, timeout_s: float) -> list[tuple[list[Any], int]]:
        """For each part in order: ([the chunk's ObjectRef], the part's position in that chunk)."""
        self._ensure_reaper()
        if not self._state.is_complete(key):
            try:
                await asyncio.wait_for(self._arrivals[key].wait(), timeout=timeout_s)
            except asyncio.TimeoutError:
                raise KVTimeoutError(f"the KV of {key!r} did not fully arrive within {timeout_s} s") from None
        return self._state.claim(key)

    async def release(self, key: str) -> bool:
        self._arrivals.pop(key, None)
        is_released = self._state.release(key)
        self._metrics.publish(self._state.counters())
        return is_released

    async def counters(self) -> StoreCounters:
        self._ensure_reaper()  # the owner asks once at start-up: from then on the gauges are published
        return self._state.counters()


def create_store(*, name: str, capacity_bytes: int, lease_s: float, namespace: str | None = None) -> Any:
    """The named store actor, owned by the calling process (a prefill replica) and placed on its node, where
    prefill's objects are. Ray restarts it if it crashes while its owner lives; a restarted store is empty, so
    transfers in flight fail with KVNotFoundError and decode recomputes them."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=True)
    return (
        ray.remote(KVStoreActor)
        .options(name=name, namespace=namespace, get_if_exists=True, max_restarts=-1, num_cpus=0,
                 scheduling_strategy=here)
        .remote(capacity_bytes, lease_s, name)
    )
