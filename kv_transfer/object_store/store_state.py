"""The KV store's bookkeeping: which transfers are open, their parts, leases and memory. Plain Python, no Ray.

The actor in store.py wraps one `KVStoreState` for the object-store backend (and the in-process test transport wraps
another); tests drive it with a fake clock. Its life cycle for one transfer is store.py's, steps 1-4.

Prefill's messages are not waited for, and Ray does not order an async actor's calls, so a transfer's `open` and
its parts may arrive in either order: both carry the layout, whichever comes first opens the transfer, and a
second `open` of the same layout is a no-op. A closed key (released, expired or refused for memory) is remembered
for a while, so a late message cannot open it again and a late claim gets the reason.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from kv_transfer.errors import KVExpiredError, KVNotFoundError, KVStoreFullError, KVTransferError
from kv_transfer.layout import KVLayout
from kv_transfer.transport import KVTicket

NUM_REMEMBERED_CLOSED_KEYS = 10_000

ClosedReason = Literal["released", "expired", "refused"]
Phase = Literal["unknown", "waiting", "complete", "closed"]


class StoreCounters(BaseModel):
    model_config = ConfigDict(frozen=True)

    num_open: int
    num_opened: int
    num_claimed: int
    num_released: int
    num_expired: int
    num_rejected_full: int
    num_bytes_in_use: int
    peak_bytes_in_use: int
    capacity_bytes: int


@dataclass
class _Entry:
    ticket: KVTicket
    expires_at: float
    parts: dict[int, Any] = field(default_factory=dict)
    is_claimed: bool = False

    @property
    def is_complete(self) -> bool:
        return len(self.parts) == self.ticket.layout.num_parts


class KVStoreState:
    def __init__(self, capacity_bytes: int, lease_s: float, clock: Callable[[], float] = time.monotonic,
                 name: str = "store"):
        self.name = name
        self.capacity_bytes = capacity_bytes
        self.lease_s = lease_s
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._closed_keys: OrderedDict[str, ClosedReason] = OrderedDict()
        self._counts = {"num_opened": 0, "num_claimed": 0, "num_released": 0, "num_expired": 0,
                        "num_rejected_full": 0, "peak_bytes_in_use": 0}

    @property
    def num_bytes_in_use(self) -> int:
        return sum(entry.ticket.layout.nbytes for entry in self._entries.values())

    def open(self, key: str, layout: KVLayout) -> KVTicket:
        """Reserves `layout.nbytes` for the transfer; again with the same layout, the ticket it already has."""
        self.expire()
        entry = self._entries.get(key)
        if entry is not None:
            if entry.ticket.layout != layout:
                raise KVTransferError(f"a transfer for {key!r} is already open with another layout")
            return entry.ticket
        if self._closed_keys.get(key) == "refused":
            raise KVStoreFullError(f"transfer {key!r} was refused: the store was full")
        if key in self._closed_keys:
            raise KVTransferError(f"transfer {key!r} was already {self._closed_keys[key]}")
        if self.num_bytes_in_use + layout.nbytes > self.capacity_bytes:
            self._counts["num_rejected_full"] += 1
            self._close(key, "refused")
            raise KVStoreFullError(
                f"transfer {key!r} needs {layout.nbytes} bytes; {self.num_bytes_in_use} of "
                f"{self.capacity_bytes} are in use (policy: refuse new transfers, decode recomputes)"
            )
        ticket = KVTicket(source=self.name, key=key, layout=layout)
        self._entries[key] = _Entry(ticket=ticket, expires_at=self._clock() + self.lease_s)
        self._counts["num_opened"] += 1
        self._counts["peak_bytes_in_use"] = max(self._counts["peak_bytes_in_use"], self.num_bytes_in_use)
        return ticket

    def add_parts(self, key: str, first_index: int, parts: list[Any], layout: KVLayout | None = None) -> bool:
        """Adds parts first_index, first_index+1, ...; returns whether the transfer is now complete. With its
        `layout`, a transfer not yet open is opened first; parts of a closed transfer are dropped (False)."""
        if key not in self._entries and key in self._closed_keys:
            return False
        if layout is not None and key not in self._entries:
            try:
                self.open(key, layout)
            except KVStoreFullError:
                return False
        entry = self._entry(key)
        for offset, part in enumerate(parts):
            index = first_index + offset
            if not 0 <= index < entry.ticket.layout.num_parts:
                raise KVTransferError(f"{key!r} has {entry.ticket.layout.num_parts} parts; got part {index}")
            entry.parts[index] = part
        return entry.is_complete

    def phase(self, key: str) -> Phase:
        """Where a transfer stands, without raising: what a claim waits on."""
        self.expire()
        entry = self._entries.get(key)
        if entry is not None:
            return "complete" if entry.is_complete else "waiting"
        return "closed" if key in self._closed_keys else "unknown"

    def is_complete(self, key: str) -> bool:
        return self._entry(key).is_complete

    def claim(self, key: str) -> list[Any]:
        entry = self._entry(key)
        if not entry.is_complete:
            raise KVTransferError(f"{key!r} is not complete: {len(entry.parts)} of "
                                  f"{entry.ticket.layout.num_parts} parts")
        if not entry.is_claimed:
            self._counts["num_claimed"] += 1
        entry.is_claimed = True
        entry.expires_at = self._clock() + self.lease_s  # the claimer gets a full lease to copy the KV out
        return [entry.parts[index] for index in range(entry.ticket.layout.num_parts)]

    def release(self, key: str, is_fetched: bool = False) -> bool:
        """Drops the transfer; False if it was not there (released twice, expired, or not yet opened: a release
        can overtake prefill's messages, which then find the key closed). `is_fetched`: the receiver read the parts
        by the handle's receipt instead of claiming them, which counts as its claim."""
        entry = self._entries.pop(key, None)
        if entry is None:
            if key not in self._closed_keys:
                self._close(key, "released")
            return False
        if is_fetched and not entry.is_claimed:
            self._counts["num_claimed"] += 1
        self._close(key, "released")
        self._counts["num_released"] += 1
        return True

    def expire(self) -> list[str]:
        now = self._clock()
        expired = [key for key, entry in self._entries.items() if entry.expires_at <= now]
        for key in expired:
            del self._entries[key]
            self._close(key, "expired")
        self._counts["num_expired"] += len(expired)
        return expired

    def _close(self, key: str, reason: ClosedReason) -> None:
        self._closed_keys[key] = reason
        self._closed_keys.move_to_end(key)
        while len(self._closed_keys) > NUM_REMEMBERED_CLOSED_KEYS:
            self._closed_keys.popitem(last=False)

    def counters(self) -> StoreCounters:
        return StoreCounters(num_open=len(self._entries), num_bytes_in_use=self.num_bytes_in_use,
                             capacity_bytes=self.capacity_bytes, **self._counts)

    def _entry(self, key: str) -> _Entry:
        self.expire()
        entry = self._entries.get(key)
        if entry is not None:
            return entry
        reason = self._closed_keys.get(key)
        if reason == "expired":
            raise KVExpiredError(f"the KV of {key!r} expired after its {self.lease_s:.0f} s lease")
        if reason == "refused":
            raise KVStoreFullError(f"the KV of {key!r} was refused: the store was full (decode recomputes)")
        raise KVNotFoundError(f"no KV transfer {key!r} in the store" + (" (released)" if reason else ""))
