"""The object-store `KVTransport` (kv_transfer/transport.py): KV through Ray's object store, tracked by the KV-store
actors (store.py). Works wherever Ray runs; CPU staging.

Sender (prefill's worker), with no store call it waits for:
1. `open` announces the transfer to this engine's own store and returns at once;
2. each `send` puts its batch of parts (layers) as one object (`ray.put`: the one copy into shared memory, straight
   from the KV cache's blocks) and keeps the reference;
3. the send that completes the transfer hands every reference to the store in one message. Once the store's
   answer to `open` is known to be a refusal (full), later sends of that transfer put nothing.
Receiver (decode's worker): `receive` asks the store named in the KV handle for the references once every part is
in (the one store call on the request's path); `ray.get` maps them without a copy (same node) or pulls them (other
node), and the caller copies them into its own blocks. `release` drops the store's references, so Ray frees the
objects.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from kv_transfer.errors import KVNotFoundError, KVPayloadError
from kv_transfer.layout import KVLayout
from kv_transfer.transport import KVTicket, Part

STORE_CALL_TIMEOUT_S = 30.0
# Every layer of a transfer is sent within one engine step; parts still unsent after this never will be (the
# sender gave up on the transfer): their references are dropped, and the store's lease ends the transfer.
PENDING_TIMEOUT_S = 60.0


@dataclass
class _Pending:
    """A transfer this sender opened and has not yet handed over whole."""

    opened: Any  # the ObjectRef of the store's answer to `open`: True, or False when it refused the transfer
    started: float
    located: dict[int, tuple[list[Any], int]] = field(default_factory=dict)  # part -> ([chunk ref], position)


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, home_store: str | None = None, namespace: str | None = None):
        """`home_store`: the store this side sends through (prefill); None for a receiver only (decode)."""
        self._home_store = home_store
        self._namespace = namespace
        self._stores: dict[str, Any] = {}
        self._pending: dict[str, _Pending] = {}

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
        now = time.monotonic()
        for stale in [k for k, pending in self._pending.items() if now - pending.started > PENDING_TIMEOUT_S]:
            del self._pending[stale]
        self._pending[key] = _Pending(self._store(self._home_store).open.remote(key, layout), now)
        return KVTicket(source=self._home_store, key=key, layout=layout)

    def send(self, ticket: KVTicket, first_index: int, parts: list[Part]) -> None:
        pending = self._pending.get(ticket.key)
        if pending is None:
            raise KVNotFoundError(f"{ticket.key!r} is not open on this sender")
        try:
            parts = [ticket.layout.check_part(first_index + offset, part) for offset, part in enumerate(parts)]
            if self._is_refused(pending):
                del self._pending[ticket.key]  # the store is full: decode recomputes, nothing to copy
                return
            chunk = [ray.put(parts)]
        except Exception:
            self._pending.pop(ticket.key, None)
            raise
        pending.located.update((first_index + position, (chunk, position)) for position in range(len(parts)))
        if len(pending.located) == ticket.layout.num_parts:
            del self._pending[ticket.key]
            located = [pending.located[index] for index in range(ticket.layout.num_parts)]
            # Fire and forget: the receiver's claim waits for the parts; a lost message surfaces there as a timeout.
            self._store(ticket.source).add_parts.remote(ticket.key, ticket.layout, 0, located)

    @staticmethod
    def _is_refused(pending: _Pending) -> bool:
        """Whether the store's answer to `open` has come back as a refusal; never waits for it."""
        ready, _ = ray.wait([pending.opened], timeout=0)
        return bool(ready) and ray.get(ready[0]) is False

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
