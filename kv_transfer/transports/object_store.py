"""KV through Ray's object store, tracked by the KV-store actor. Works wherever Ray runs; CPU staging.

Sender: each part is `ray.put` (one copy into shared memory) and its reference handed to the store.
Receiver: the store returns the references once all parts are in; `ray.get` maps them without a copy (same
node) or pulls them (other node), and the caller copies them into its own blocks. Releasing drops the store's
references, and Ray frees the objects.
"""

from __future__ import annotations

import numpy as np
import ray

from kv_transfer.errors import KVPayloadError
from kv_transfer.layout import KVLayout
from kv_transfer.store import KVTicket

STORE_CALL_TIMEOUT_S = 30.0


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, store: ray.actor.ActorHandle):
        self._store = store
        self._received: dict[str, list[np.ndarray]] = {}

    def open(self, key: str, layout: KVLayout) -> KVTicket:
        return ray.get(self._store.open.remote(key, layout), timeout=STORE_CALL_TIMEOUT_S)

    def send(self, ticket: KVTicket, first_index: int, parts: list[np.ndarray]) -> None:
        for offset, part in enumerate(parts):
            ticket.layout.check_part(first_index + offset, part)
        refs = [[ray.put(part)] for part in parts]
        # Fire and forget: the receiver's claim waits for these; errors surface there as a timeout.
        self._store.add_parts.remote(ticket.key, first_index, refs)

    def receive(self, key: str, expected: KVLayout, timeout_s: float) -> list[np.ndarray]:
        wrapped = ray.get(self._store.claim.remote(key, timeout_s), timeout=timeout_s + STORE_CALL_TIMEOUT_S)
        if len(wrapped) != expected.num_parts:
            raise KVPayloadError(f"{key!r} has {len(wrapped)} parts; expected {expected.num_parts}")
        parts = ray.get([ref for (ref,) in wrapped], timeout=timeout_s)
        checked = [expected.check_part(index, part) for index, part in enumerate(parts)]
        self._received[key] = checked  # keeps the zero-copy views valid until release
        return checked

    def release(self, key: str) -> None:
        self._received.pop(key, None)
        ray.get(self._store.release.remote(key), timeout=STORE_CALL_TIMEOUT_S)
