"""The transport interface: how one request's KV parts leave prefill and arrive at decode.

The object-store connector's worker half (kv_transfer/object_store/worker_side.py) moves bytes only through a
`KVTransport`, which it is given as a `TransportFactory`. Every transport passes the same contract tests
(tests/unit/test_transport_contract.py): the object store's (Ray, across processes and nodes) and an in-process
one kept for tests (tests/unit/in_process_transport.py).
1. `open(key, layout)` on the sender announces the transfer without waiting for the store; the ticket's `source`
   says where the receiver finds it, and travels in the KV handle. A store that is full refuses it, and the
   receiver gets `KVStoreFullError` (the sender may skip sending once it knows);
2. `send(ticket, first_index, parts)` hands over parts (layers) as they are computed, without waiting for them
   to arrive; a part is an array or a list of segments (runs of blocks). Once every part is sent,
   `take_receipt(key)` may give a text that lets a receiver find the parts without asking the store (None: it asks);
3. `receive(source, key, expected, timeout_s, receipt)` on the receiver reads the parts by the receipt, or else
   waits in the store for every part (and, briefly, for an `open` still on its way), and returns each as its
   segments, in the expected layout (`KVPayloadError` otherwise), valid until `release`;
4. `release(source, key)` frees everything the transfer held, on both sides.
Failures are the types in errors.py, so that the caller picks its policy (decode recomputes) by kind.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

from kv_transfer.layout import KVLayout

# A part as a sender hands it over: one array, or its segments (runs of consecutive blocks).
Part = np.ndarray | list[np.ndarray]


class KVTicket(BaseModel):
    """A transfer the sender opened: where it is held, under which key, of what layout."""

    model_config = ConfigDict(frozen=True)

    source: str  # the name of the store that holds the transfer
    key: str
    layout: KVLayout


class KVTransport(Protocol):
    name: str

    def open(self, key: str, layout: KVLayout) -> KVTicket: ...

    def send(self, ticket: KVTicket, first_index: int, parts: list[Part]) -> None: ...

    def take_receipt(self, key: str) -> str | None: ...

    def receive(self, source: str, key: str, expected: KVLayout, timeout_s: float,
                receipt: str | None = None) -> list[list[np.ndarray]]: ...

    def release(self, source: str, key: str) -> None: ...


# Made where it is first used (inside vLLM's worker process, after the engine started), not where it is configured.
TransportFactory = Callable[[], KVTransport]
