"""An in-process `KVTransport` for tests: the object store's own bookkeeping (`KVStoreState`) behind a condition
variable, with no Ray. It passes the same contract suite as the object store (test_transport_contract.py), which
is what shows that the contract, not one implementation, is what the connector's worker half relies on.

Named stores live in an `InProcessStores` registry that a test's sending and receiving sides share, as the
object store's sides share a Ray cluster.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np

from kv_transfer.errors import KVNotFoundError, KVPayloadError, KVStoreFullError, KVTimeoutError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.store import OPEN_GRACE_S
from kv_transfer.object_store.store_state import KVStoreState, StoreCounters
from kv_transfer.transport import KVTicket, Part


@dataclass
class InProcessStore:
    state: KVStoreState
    changed: threading.Condition = field(default_factory=threading.Condition)

    def counters(self) -> StoreCounters:
        with self.changed:
            self.state.expire()
            return self.state.counters()


class InProcessStores:
    def __init__(self) -> None:
        self._stores: dict[str, InProcessStore] = {}

    def create(self, name: str, *, capacity_bytes: int, lease_s: float) -> InProcessStore:
        store = self._stores[name] = InProcessStore(KVStoreState(capacity_bytes, lease_s, name=name))
        return store

    def get(self, name: str) -> InProcessStore:
        if name not in self._stores:
            raise KVNotFoundError(f"no KV store named {name!r}")
        return self._stores[name]


class InProcessTransport:
    name = "in_process"

    def __init__(self, stores: InProcessStores, home_store: str | None = None):
        """`home_store`: the store this side sends through (prefill); None for a receiver only (decode)."""
        self._stores = stores
        self._home_store = home_store

    def open(self, key: str, layout: KVLayout) -> KVTicket:
        if self._home_store is None:
            raise RuntimeError("this transport only receives: it has no store of its own")
        store = self._stores.get(self._home_store)
        with store.changed:
            try:  # as the object store's sender: a refusal is not raised here, the receiver gets it
                store.state.open(key, layout)
            except KVStoreFullError:
                pass
        return KVTicket(source=self._home_store, key=key, layout=layout)

    def send(self, ticket: KVTicket, first_index: int, parts: list[Part]) -> None:
        checked = [ticket.layout.check_part(first_index + offset, part) for offset, part in enumerate(parts)]
        # Copied, as the object store copies into shared memory: the sender may reuse its blocks at once.
        copies = [[np.array(segment) for segment in segments] for segments in checked]
        store = self._stores.get(ticket.source)
        with store.changed:
            store.state.add_parts(ticket.key, first_index, copies, layout=ticket.layout)
            store.changed.notify_all()

    def take_receipt(self, key: str) -> str | None:
        """None: this transport's receiver always claims from the store (the fallback path of the object store's)."""
        return None

    def receive(self, source: str, key: str, expected: KVLayout, timeout_s: float,
                receipt: str | None = None) -> list[list[np.ndarray]]:
        store = self._stores.get(source)
        deadline = time.monotonic() + timeout_s
        with store.changed:
            # As the object store's claim: an `open` on its way gets a moment before the key counts as unknown.
            store.changed.wait_for(lambda: store.state.phase(key) != "unknown", timeout=min(OPEN_GRACE_S, timeout_s))
            if not store.changed.wait_for(lambda: store.state.phase(key) != "waiting",
                                          timeout=max(0.0, deadline - time.monotonic())):
                raise KVTimeoutError(f"the KV of {key!r} did not fully arrive within {timeout_s} s")
            parts = store.state.claim(key)
        if len(parts) != expected.num_parts:
            raise KVPayloadError(f"{key!r} has {len(parts)} parts; expected {expected.num_parts}")
        return [expected.check_part(index, part) for index, part in enumerate(parts)]

    def release(self, source: str, key: str) -> None:
        store = self._stores.get(source)
        with store.changed:
            store.state.release(key)
