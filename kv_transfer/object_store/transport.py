"""The object-store `KVTransport` (kv_transfer/transport.py): KV through Ray's object store, tracked by the KV-store
actors (store.py). Works wherever Ray runs; CPU staging.

Sender (prefill's worker), with no store call it waits for:
1. `open` announces the transfer to this engine's own store and returns at once;
2. each `send` puts its batch of parts (layers) as one object (`ray.put`: the one copy into shared memory, straight
   from the KV cache's blocks) and keeps the reference;
3. the send that completes the transfer hands every reference to the store in one message, and leaves the
   transfer's receipt (receipt.py) for `take_receipt`, which the KV handle carries. Once the store's answer to
   `open` is known to be a refusal (full), later sends of that transfer put nothing and leave no receipt.
Receiver (decode's worker): `receive` with the handle's receipt rebuilds the references and maps them, with no store
call; without one (a receipt that missed its engine step), it asks the store named in the handle for the references
once every part is in. `ray.get` maps them without a copy (same node) or pulls them (other node), and the caller
copies them into its own blocks. `release` drops the store's references, so Ray frees the objects, and tells the
store whether the parts were fetched by receipt (its count of claims).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import ray

from kv_transfer.errors import KVNotFoundError, KVPayloadError, KVTimeoutError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.receipt import Receipt, read_refs, write_receipt
from kv_transfer.transport import KVTicket, Part

STORE_CALL_TIMEOUT_S = 30.0
# Every layer of a transfer is sent within one engine step; parts still unsent after this never will be (the
# sender gave up on the transfer): their references are dropped, and the store's lease ends the transfer.
PENDING_TIMEOUT_S = 60.0
# Ray's put copies each buffer of 1 MiB or more with 6 threads (kMemcopyDefaultThreshold and MEMCOPY_THREADS in
# Ray's python/ray/includes/serialization.pxi, fixed at build time), starting them afresh for every buffer. A process
# allowed fewer cores than that (an engine pinned to its own core) time-slices them: on a 2-core host a 64 MB put of
# 30 buffers of 2.1 MB took 11.1 ms, of 120 buffers of 0.53 MB 7.2 ms, a plain copy 5.2 ms (bench.put_probe). There,
# segments are cut below the threshold along the block dimension (views, no copy), so that each is one plain copy.
RAY_PARALLEL_COPY_BYTES = 1 << 20
RAY_PARALLEL_COPY_THREADS = 6
# Receipts the sender's caller never took (a transfer it gave up on) are dropped past this many.
NUM_KEPT_RECEIPTS = 1_000


@dataclass
class _Pending:
    """A transfer this sender opened and has not yet handed over whole."""

    opened: Any  # the ObjectRef of the store's answer to `open`: True, or False when it refused the transfer
    started: float
    located: dict[int, tuple[list[Any], int]] = field(default_factory=dict)  # part -> ([chunk ref], position)


class ObjectStoreTransport:
    name = "object_store"

    def __init__(self, home_store: str | None = None, namespace: str | None = None,
                 is_cutting_segments: bool | None = None):
        """`home_store`: the store this side sends through (prefill); None for a receiver only (decode).
        `is_cutting_segments`: cut segments below Ray's parallel-copy threshold; by default where this process
        may use fewer cores than Ray's copy threads."""
        if is_cutting_segments is None:
            is_cutting_segments = len(os.sched_getaffinity(0)) < RAY_PARALLEL_COPY_THREADS
        self._is_cutting_segments = is_cutting_segments
        self._home_store = home_store
        self._namespace = namespace
        self._stores: dict[str, Any] = {}
        self._pending: dict[str, _Pending] = {}
        self._receipts: dict[str, str] = {}  # sent whole, receipt not yet taken (insertion order: oldest first)
        self._fetched_by_receipt: set[str] = set()  # received without a claim, not yet released

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
            if self._is_cutting_segments:
                parts = [cut_below_parallel_copy(segments, ticket.layout.block_dim) for segments in parts]
            chunk = [ray.put(parts)]
        except Exception:
            self._pending.pop(ticket.key, None)
            raise
        pending.located.update((first_index + position, (chunk, position)) for position in range(len(parts)))
        if len(pending.located) == ticket.layout.num_parts:
            del self._pending[ticket.key]
            located = [pending.located[index] for index in range(ticket.layout.num_parts)]
            # Fire and forget: the receiver's claim waits for the parts; a lost message surfaces there as a timeout.
            # Until the store has them, the message's arguments keep the objects alive.
            self._store(ticket.source).add_parts.remote(ticket.key, ticket.layout, 0, located)
            while len(self._receipts) >= NUM_KEPT_RECEIPTS:
                del self._receipts[next(iter(self._receipts))]
            self._receipts[ticket.key] = write_receipt([(chunk[0], position) for chunk, position in located]).to_text()

    def take_receipt(self, key: str) -> str | None:
        """The receipt of a transfer sent whole, once; None if it is not (yet) sent or was refused."""
        return self._receipts.pop(key, None)

    @staticmethod
    def _is_refused(pending: _Pending) -> bool:
        """Whether the store's answer to `open` has come back as a refusal; never waits for it."""
        ready, _ = ray.wait([pending.opened], timeout=0)
        return bool(ready) and ray.get(ready[0]) is False

    def receive(self, source: str, key: str, expected: KVLayout, timeout_s: float,
                receipt: str | None = None) -> list[list[np.ndarray]]:
        """Every part as its list of segments, read-only and valid until `release`."""
        if receipt is not None:
            located = self._located_by_receipt(key, receipt)
        else:
            claimed = ray.get(self._store(source).claim.remote(key, timeout_s), timeout=timeout_s + STORE_CALL_TIMEOUT_S)
            located = [(wrapped[0], position) for wrapped, position in claimed]
        if len(located) != expected.num_parts:
            raise KVPayloadError(f"{key!r} has {len(located)} parts; expected {expected.num_parts}")
        refs = list(dict.fromkeys(ref for ref, _ in located))
        try:
            chunks = dict(zip(refs, ray.get(refs, timeout=timeout_s), strict=True))
        except ray.exceptions.GetTimeoutError:
            raise KVTimeoutError(f"the KV of {key!r} was not readable within {timeout_s} s") from None
        except ray.exceptions.RayError as exc:  # e.g. evicted after its lease ended, or its sender died
            raise KVNotFoundError(f"the KV of {key!r} is gone from the object store: {type(exc).__name__}") from None
        if receipt is not None:
            self._fetched_by_receipt.add(key)
        parts = []
        for index, (ref, position) in enumerate(located):
            chunk = chunks[ref]
            if not isinstance(chunk, list) or not 0 <= position < len(chunk):
                raise KVPayloadError(f"part {index} of {key!r} is not in its chunk (a {type(chunk).__name__})")
            parts.append(expected.check_part(index, chunk[position]))
        return parts

    def _located_by_receipt(self, key: str, receipt: str) -> list[tuple[Any, int]]:
        try:
            read = Receipt.from_text(receipt)
            refs = read_refs(read)
            located = [(refs[chunk], position) for chunk, position in read.parts]
        except (ValueError, IndexError) as exc:
            raise KVPayloadError(f"the receipt of {key!r} is unreadable: {exc}") from None
        return located

    def release(self, source: str, key: str) -> None:
        is_fetched = key in self._fetched_by_receipt
        self._fetched_by_receipt.discard(key)
        ray.get(self._store(source).release.remote(key, is_fetched), timeout=STORE_CALL_TIMEOUT_S)


def cut_below_parallel_copy(segments: list[np.ndarray], block_dim: int) -> list[np.ndarray]:
    """The same blocks, in order, as segments of fewer than RAY_PARALLEL_COPY_BYTES each, where a segment can be cut
    into contiguous views (its block dimension is its first non-trivial one); others stay whole."""
    cut = []
    for segment in segments:
        num_blocks = segment.shape[block_dim]
        if segment.nbytes < RAY_PARALLEL_COPY_BYTES or num_blocks < 2 or math.prod(segment.shape[:block_dim]) != 1:
            cut.append(segment)
            continue
        block_nbytes = segment.nbytes // num_blocks
        step = max(1, (RAY_PARALLEL_COPY_BYTES - 1) // block_nbytes)
        index = [slice(None)] * segment.ndim
        for first in range(0, num_blocks, step):
            index[block_dim] = slice(first, first + step)
            cut.append(segment[tuple(index)])
    return cut
