"""The transport interface: how one request's KV parts leave prefill and arrive at decode.

Every transport passes the same contract tests (tests/unit/test_transport_contract.py):
1. `open(key, layout)` on the sender reserves the transfer (or refuses it: `KVStoreFullError`); the ticket's
   `source` says where the receiver finds it, and travels in the KV handle;
2. `send(ticket, first_index, parts)` hands over parts (layers) as they are computed, without waiting for them
   to arrive; a part is an array or a list of segments (runs of blocks);
3. `receive(source, key, expected, timeout_s)` on the receiver waits for every part and returns each as its
   segments, in the expected layout (`KVPayloadError` otherwise), valid until `release`;
4. `release(source, key)` frees everything the transfer held, on both sides.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

from kv_transfer.layout import KVLayout
from kv_transfer.store import KVTicket


class KVTransport(Protocol):
    name: str

    def open(self, key: str, layout: KVLayout) -> KVTicket: ...

    def send(self, ticket: KVTicket, first_index: int, parts: list[np.ndarray | list[np.ndarray]]) -> None: ...

    def receive(self, source: str, key: str, expected: KVLayout, timeout_s: float) -> list[list[np.ndarray]]: ...

    def release(self, source: str, key: str) -> None: ...
