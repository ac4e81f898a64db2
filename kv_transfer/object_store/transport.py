"""The object-store `KVTransport` (kv_transfer/transport.py): KV through Ray's object store, tracked by the KV-store
actors (store.py). Works wherever Ray runs; CPU staging.

Sender (prefill's worker): `open` registers the transfer with this engine's own store; each `send` puts its batch
of parts (layers) as one object (`ray.put`: the one copy into shared memory, straight from the KV cache's
blocks) and hands the reference to the store without waiting.
Receiver (decode's worker): `receive` asks the store named in the KV handle for the references once every part
is in; `ray.get` maps them without a copy (same node) or pulls them (other node), and the caller copies them
into its own blocks. `release` drops the store's references, so Ray frees the objects.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray

from kv_transfer.errors import KVNotFoundError, KVPayloadError
from kv_transfer.layout import KVLayout
from kv_transfer.transport import KVTicket, Part

STORE_CALL_TIMEOUT_S = 30.0


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, home_store: str | None = None, namespace: str | None = None):
        """`home_store`: the store this side sends through (prefill); None for a receiver only (decode)."""
        self._home_store = home_store
        self._namespace = namespace
        self._stores: dict[str, Any] = {}

    def _store(self, name: str) -> Any:
        # Found once by name; a restarted store keeps its name and its handle stays valid.
        if name not in self._stores:
            try:
                self._stores[name] = ray.get_actor(name, namespace=self._namespace)
            except ValueError:
                raise KVNotFoundError(f"no KV store named {name!r}") from None
        return self._stores[name]

    def open(self, key: str, layout: KVLayout) -> KVTicket:
        if self._home_store is None:
            raise RuntimeError("this transport only receives: it has no store of its own")
        return ray.get(self._store(self._home_store).open.remote(key, layout), timeout=STORE_CALL_TIMEOUT_S)

    def send(self, ticket: KVTicket, first_index: int, parts: list[Part]) -> None:
        parts = [ticket.layout.check_part(first_index + offset, part) for offset, part in enumerate(parts)]
        chunk = ray.put(parts)
        # Fire and forget: the receiver's claim waits for the parts; a lost chunk surfaces there as a timeout.
        self._store(ticket.source).add_chunk.remote(ticket.key, first_index, len(parts), [chunk])

    def receive(self, source: str, key: str, expected: KVLayout, timeout_s: float) -> list[list[np.ndarray]]:
        """Every part as its list of segments, read-only and valid until `release`."""
        located = ray.get(self._store(source).claim.remote(key, timeout_s), timeout=timeout_s + STORE_CALL_TIMEOUT_S)
        if len(located) != expected.num_parts:
            raise KVPayloadError(f"{key!r} has {len(located)} parts; expected {expected.num_parts}")
        refs = list(dict.fromkeys(wrapped[0] for wrapped, _ in located))
        chunks = dict(zip(refs, ray.get(refs, timeout=timeout_s), strict=True))
        parts = []
        for index, (wrapped, position) in enumerate(located):
            chunk = chunks[wrapped[0]]
            if not isinstance(chunk, list) or not 0 <= position < len(chunk):
                raise KVPayloadError(f"part {index} of {key!r} is not in its chunk (a {type(chunk).__name__})")
            parts.append(expected.check_part(index, chunk[position]))
        return parts

    def release(self, source: str, key: str) -> None:
        ray.get(self._store(source).release.remote(key), timeout=STORE_CALL_TIMEOUT_S)
