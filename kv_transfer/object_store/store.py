"""The KV store: who holds which request's KV blocks, for how long, and how much memory that takes.

Life cycle of one transfer (key = the request's id):
1. `open(key, layout)`: prefill announces a transfer, at its first layer, and does not wait for the answer. The
   store reserves `layout.nbytes` against its bound, or refuses (decode's claim then gets `KVStoreFullError` and
   recomputes). A lease starts.
2. `add_parts(key, layout, first_index, located)`: prefill hands over the object references of every part (layer)
   in one message once the last layer is staged, again without waiting. It carries the layout too: Ray does not
   order an async actor's calls, so it may arrive first and open the transfer itself.
3. Decode reads the references from the receipt its KV handle carries (receipt.py): no store call on the
   request's path. Only a handle without one (the receipt missed its engine step) makes decode `claim(key)`: it
   waits until every part has arrived (and, for `OPEN_GRACE_S`, for an `open` still on its way), then gets the
   references and a renewed lease.
4. `release(key, is_fetched)`: decode has copied the KV into its own blocks (`is_fetched`: by receipt, counted as a
   claim); the store drops the references, so Ray frees the objects. A lease that runs out first drops them the
   same way (`KVExpiredError` for a late claim).

Ownership: the store holds references, never the bytes; an object lives as long as the process that put it
(prefill's engine worker) and as long as the store references it. Each prefill replica creates its own store
(`create_store`), so the store is owned by that replica: Ray restarts it (empty) if it crashes, and it goes away
with the replica, whose engine made the KV. Decode finds it by the name that travels in the KV handle.
`KVStoreState` (store_state.py) is the bookkeeping, plain Python, tested with a fake clock; `KVStoreActor` is the
actor, which also publishes its occupancy and lease expirations through Ray's metrics (`StoreMetrics`), by store.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from kv_transfer.errors import KVStoreFullError, KVTimeoutError, KVTransferError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.store_state import KVStoreState, StoreCounters

logger = logging.getLogger("splitserve.kv_transfer")

# How long a claim waits for a transfer the store has not heard of. Prefill announces a transfer before its answer
# leaves the engine, but another caller's message can overtake it; past this, the key is not coming.
OPEN_GRACE_S = 2.0
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
        self._changed: asyncio.Condition | None = None  # made on the actor's event loop, at first use
        self._reaper: asyncio.Task | None = None
        self._metrics = StoreMetrics(name, capacity_bytes)

    def _condition(self) -> asyncio.Condition:
        if self._changed is None:
            self._changed = asyncio.Condition()
            self._reaper = asyncio.get_running_loop().create_task(self._reap())
        return self._changed

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(min(MAX_PUBLISH_INTERVAL_S, max(0.05, self._state.lease_s / 4)))
            if self._state.expire():
                async with self._condition():
                    self._condition().notify_all()  # claims waiting on an expired transfer end now
            self._metrics.publish(self._state.counters())

    async def open(self, key: str, layout: KVLayout) -> bool:
        """Whether the transfer is (now) open; False when the store is full. Never raises for a refusal: prefill
        does not wait for this answer, and an error nobody reads would only be logged by Ray."""
        async with self._condition():
            try:
                self._state.open(key, layout)
                return True
            except KVStoreFullError as exc:
                logger.info("%s", exc)
                return False
            except KVTransferError as exc:  # released or expired before its announcement arrived
                logger.info("%s", exc)
                return False
            finally:
                self._condition().notify_all()
                self._metrics.publish(self._state.counters())

    async def add_parts(self, key: str, layout: KVLayout, first_index: int,
                        located: list[tuple[list[Any], int]]) -> None:
        """Parts first_index.. as (their chunk's ObjectRef wrapped in a list, so that Ray passes it unresolved
        instead of fetching the bytes; the part's position in that chunk). Opens the transfer if its `open` has
        not arrived yet; parts of a refused, expired or released transfer are dropped, and Ray frees them."""
        async with self._condition():
            try:
                self._state.add_parts(key, first_index, located, layout=layout)
            except KVTransferError as exc:
                logger.warning("parts of %s dropped: %s", key, exc)
            self._condition().notify_all()

    async def claim(self, key: str, timeout_s: float) -> list[tuple[list[Any], int]]:
        """For each part in order: ([the chunk's ObjectRef], the part's position in that chunk)."""
        deadline = time.monotonic() + timeout_s
        async with self._condition():
            try:  # an `open` may still be on its way: give it a moment before the key counts as unknown
                await asyncio.wait_for(self._condition().wait_for(lambda: self._state.phase(key) != "unknown"),
                                       timeout=min(OPEN_GRACE_S, timeout_s))
            except asyncio.TimeoutError:
                pass
            if self._state.phase(key) == "waiting":
                try:
                    await asyncio.wait_for(self._condition().wait_for(lambda: self._state.phase(key) != "waiting"),
                                           timeout=max(0.0, deadline - time.monotonic()))
                except asyncio.TimeoutError:
                    raise KVTimeoutError(f"the KV of {key!r} did not fully arrive within {timeout_s} s") from None
            return self._state.claim(key)  # raises the reason for an unknown or closed key

    async def release(self, key: str, is_fetched: bool = False) -> bool:
        """`is_fetched`: decode read the parts by the handle's receipt, without claiming them."""
        self._condition()
        is_released = self._state.release(key, is_fetched=is_fetched)
        self._metrics.publish(self._state.counters())
        return is_released

    async def counters(self) -> StoreCounters:
        self._condition()  # the owner asks once at start-up: from then on the reaper publishes the gauges
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
