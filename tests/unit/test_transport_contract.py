"""The contract every KV transport passes: put, get, release, lease expiry, missing keys, bad payloads, bounds.

Runs on each transport of kv_transfer/transport.py's interface: the object store (a real local Ray cluster, one
CPU, no dashboard, a store actor per test) and the in-process test transport (in_process_transport.py, no Ray).
Every test ends by checking that the store holds nothing.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest
import ray

from kv_transfer.errors import (
    KVExpiredError,
    KVNotFoundError,
    KVPayloadError,
    KVStoreFullError,
    KVTimeoutError,
)
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.store import create_store
from kv_transfer.object_store.transport import ObjectStoreTransport
from kv_transfer.transport import KVTransport
from tests.unit.in_process_transport import InProcessStores, InProcessTransport

LAYOUT = KVLayout(num_parts=4, part_shape=(2, 3, 16, 8), dtype="float32", block_dim=1)  # (K/V, blocks, ...)
TRANSPORTS = ["object_store", "in_process"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=1, include_dashboard=False, namespace=f"kv-contract-{uuid.uuid4().hex[:6]}",
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@dataclass(frozen=True)
class Sides:
    """The sending side (prefill's transport, with a store of its own) and the receiving side (decode's)."""

    sender: KVTransport
    receiver: KVTransport
    source: str
    counters: Callable[[], Any]  # the store's StoreCounters
    # Registers parts in the store as a broken or malicious sender could, past the transport's own checks.
    inject_raw_parts: Callable[[str, list[Any]], None]

    def open(self, key, layout):
        return self.sender.open(key, layout)

    def send(self, ticket, first_index, parts):
        self.sender.send(ticket, first_index, parts)

    def receive(self, key, layout, timeout_s):
        received = self.receiver.receive(self.source, key, layout, timeout_s)
        return [np.concatenate(segments, axis=layout.block_dim) for segments in received]

    def release(self, key):
        self.receiver.release(self.source, key)


def _object_store_sides(name: str, capacity_bytes: int, lease_s: float, cleanups: list) -> Sides:
    store = create_store(name=name, capacity_bytes=capacity_bytes, lease_s=lease_s)
    cleanups.append(lambda: ray.kill(store))

    def inject(key: str, raw_parts: list[Any]) -> None:
        chunk = [ray.put(raw_parts)]
        ray.get(store.add_parts.remote(key, LAYOUT, 0, [(chunk, index) for index in range(len(raw_parts))]))

    return Sides(ObjectStoreTransport(home_store=name), ObjectStoreTransport(), name,
                 counters=lambda: ray.get(store.counters.remote()), inject_raw_parts=inject)


def _in_process_sides(name: str, capacity_bytes: int, lease_s: float, cleanups: list) -> Sides:
    stores = InProcessStores()
    store = stores.create(name, capacity_bytes=capacity_bytes, lease_s=lease_s)

    def inject(key: str, raw_parts: list[Any]) -> None:
        with store.changed:
            store.state.add_parts(key, 0, raw_parts)
            store.changed.notify_all()

    return Sides(InProcessTransport(stores, home_store=name), InProcessTransport(stores), name,
                 counters=store.counters, inject_raw_parts=inject)


@pytest.fixture(params=TRANSPORTS)
def make_transport(request):
    if request.param == "object_store":
        request.getfixturevalue("ray_cluster")
    made: list[Sides] = []
    cleanups: list[Callable[[], None]] = []

    def make(capacity_bytes: int = 1 << 30, lease_s: float = 30.0) -> Sides:
        build = _object_store_sides if request.param == "object_store" else _in_process_sides
        sides = build(f"store-{uuid.uuid4().hex[:8]}", capacity_bytes, lease_s, cleanups)
        made.append(sides)
        return sides

    yield make
    for sides in made:  # every story ends with an empty store
        counters = sides.counters()
        assert (counters.num_open, counters.num_bytes_in_use) == (0, 0), counters
    for cleanup in cleanups:
        cleanup()


def _parts(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LAYOUT.part_shape, dtype=np.float32) for _ in range(LAYOUT.num_parts)]


def test_put_get_release_round_trip(make_transport):
    transport = make_transport()
    parts = _parts()
    ticket = transport.open("r1", LAYOUT)
    transport.send(ticket, 0, parts)

    received = transport.receive("r1", LAYOUT, timeout_s=10)
    assert all(np.array_equal(got, sent) for got, sent in zip(received, parts, strict=True))
    transport.release("r1")

    with pytest.raises(KVNotFoundError):
        transport.receive("r1", LAYOUT, timeout_s=1)
    counters = transport.counters()
    assert (counters.num_opened, counters.num_claimed, counters.num_released) == (1, 1, 1)


def test_parts_sent_layer_by_layer_and_late_are_waited_for(make_transport):
    transport = make_transport()
    parts = _parts(1)
    ticket = transport.open("r1", LAYOUT)
    transport.send(ticket, 2, parts[2:])  # out of order
    transport.send(ticket, 0, parts[:1])

    def send_the_rest_later():
        time.sleep(0.5)
        transport.send(ticket, 1, parts[1:2])

    sender = threading.Thread(target=send_the_rest_later)
    sender.start()
    received = transport.receive("r1", LAYOUT, timeout_s=10)  # waits for part 1
    sender.join()
    assert all(np.array_equal(got, sent) for got, sent in zip(received, parts, strict=True))
    transport.release("r1")


def test_a_missing_key_is_not_found(make_transport):
    transport = make_transport()
    with pytest.raises(KVNotFoundError, match="never-sent"):
        transport.receive("never-sent", LAYOUT, timeout_s=1)


def test_an_unclaimed_transfer_expires(make_transport):
    transport = make_transport(lease_s=0.5)
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    # The lease starts when the store takes the open, which prefill sends without waiting: on a slow host a new
    # store actor took it later than the sleep below began, and the claim then came inside the lease.
    deadline = time.monotonic() + 30
    while transport.counters().num_opened == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.2)
    with pytest.raises(KVExpiredError, match="r1"):
        transport.receive("r1", LAYOUT, timeout_s=1)
    assert transport.counters().num_expired == 1


def test_parts_that_never_arrive_time_out(make_transport):
    transport = make_transport()
    transport.send(transport.open("r1", LAYOUT), 0, _parts()[:2])
    with pytest.raises(KVTimeoutError, match="r1"):
        transport.receive("r1", LAYOUT, timeout_s=0.5)
    transport.release("r1")


def test_a_payload_of_another_layout_is_rejected(make_transport):
    transport = make_transport()
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    other = KVLayout(num_parts=LAYOUT.num_parts, part_shape=(2, 3, 32, 8), dtype="float32", block_dim=1)
    with pytest.raises(KVPayloadError, match=r"\(2, 3, 32, 8\)"):
        transport.receive("r1", other, timeout_s=5)
    transport.release("r1")


def test_the_sender_cannot_send_a_wrong_shape(make_transport):
    transport = make_transport()
    ticket = transport.open("r1", LAYOUT)
    with pytest.raises(KVPayloadError, match="shape"):
        transport.send(ticket, 0, [np.zeros((2, 3), dtype=np.float32)])
    transport.release("r1")


def test_a_corrupted_payload_is_rejected(make_transport):
    transport = make_transport()
    transport.open("r1", LAYOUT)
    # What a broken or malicious sender could register: bytes instead of arrays.
    transport.inject_raw_parts("r1", [b"\x00" * LAYOUT.part_nbytes for _ in range(LAYOUT.num_parts)])
    with pytest.raises(KVPayloadError, match="not an array"):
        transport.receive("r1", LAYOUT, timeout_s=5)
    transport.release("r1")


def test_a_full_store_refuses_new_transfers(make_transport):
    transport = make_transport(capacity_bytes=LAYOUT.nbytes)
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    transport.receive("r1", LAYOUT, timeout_s=10)  # r1 holds the whole bound
    # 1. The sender does not wait for the store's answer; the receiver learns of the refusal at once, no timeout.
    transport.send(transport.open("r2", LAYOUT), 0, _parts())
    started = time.monotonic()
    with pytest.raises(KVStoreFullError, match="r2"):
        transport.receive("r2", LAYOUT, timeout_s=30)
    assert time.monotonic() - started < 10
    # 2. Memory comes back with the release; a new transfer fits again.
    transport.release("r1")
    transport.send(transport.open("r3", LAYOUT), 0, _parts(3))
    assert all(np.array_equal(got, sent) for got, sent in zip(transport.receive("r3", LAYOUT, timeout_s=10), _parts(3)))
    transport.release("r3")
    assert transport.counters().num_rejected_full == 1


def test_a_claim_waits_for_an_open_still_on_its_way(make_transport):
    transport = make_transport()
    parts = _parts(4)

    def open_and_send_late():
        time.sleep(0.5)  # decode asks before prefill's announcement reached the store
        transport.send(transport.open("r1", LAYOUT), 0, parts)

    sender = threading.Thread(target=open_and_send_late)
    sender.start()
    received = transport.receive("r1", LAYOUT, timeout_s=10)
    sender.join()
    assert all(np.array_equal(got, sent) for got, sent in zip(received, parts, strict=True))
    transport.release("r1")


def test_a_part_may_travel_as_runs_of_blocks(make_transport):
    transport = make_transport()
    parts = _parts(2)
    ticket = transport.open("r1", LAYOUT)
    # Blocks 0-1 and 2 sit apart in the sender's cache: each part goes as two segments along the block dimension.
    transport.send(ticket, 0, [[part[:, :2], part[:, 2:]] for part in parts])
    received = transport.receiver.receive(transport.source, "r1", LAYOUT, timeout_s=10)
    assert [[segment.shape[LAYOUT.block_dim] for segment in segments] for segments in received] == [[2, 1]] * 4
    assert all(np.array_equal(np.concatenate(got, axis=LAYOUT.block_dim), sent)
               for got, sent in zip(received, parts, strict=True))
    transport.release("r1")


def test_segments_that_miss_blocks_are_rejected(make_transport):
    transport = make_transport()
    ticket = transport.open("r1", LAYOUT)
    with pytest.raises(KVPayloadError, match="2 blocks; expected 3"):
        transport.send(ticket, 0, [[part[:, :2]] for part in _parts()])
    transport.release("r1")


def test_a_store_that_does_not_exist_is_not_found(make_transport):
    transport = make_transport()
    with pytest.raises(KVNotFoundError, match="no KV store named 'gone'"):
        transport.receiver.receive("gone", "r1", LAYOUT, timeout_s=1)


# --- the object store's receipts (receipt.py): decode reads the parts without a store call -------------------------


@pytest.fixture
def object_store_sides(ray_cluster):
    cleanups: list[Callable[[], None]] = []
    sides = _object_store_sides(f"store-{uuid.uuid4().hex[:8]}", 1 << 30, 30.0, cleanups)
    yield sides
    counters = sides.counters()
    assert (counters.num_open, counters.num_bytes_in_use) == (0, 0), counters
    for cleanup in cleanups:
        cleanup()


def test_a_receipt_reads_the_parts_without_claiming_them(object_store_sides):
    sides = object_store_sides
    parts = _parts(2)
    ticket = sides.open("r1", LAYOUT)
    sides.send(ticket, 0, parts[:2])
    assert sides.sender.take_receipt("r1") is None  # not sent whole yet
    sides.send(ticket, 2, parts[2:])
    receipt = sides.sender.take_receipt("r1")
    assert receipt is not None and sides.sender.take_receipt("r1") is None  # taken once

    received = sides.receiver.receive(sides.source, "r1", LAYOUT, timeout_s=10, receipt=receipt)
    assert all(np.array_equal(np.concatenate(got, axis=LAYOUT.block_dim), sent)
               for got, sent in zip(received, parts, strict=True))
    assert sides.counters().num_claimed == 0  # no claim reached the store...
    sides.release("r1")
    counters = sides.counters()  # ...and the release counted the read as decode's claim
    assert (counters.num_opened, counters.num_claimed, counters.num_released) == (1, 1, 1)


def test_a_refused_transfer_leaves_no_receipt(ray_cluster):
    cleanups: list[Callable[[], None]] = []
    sides = _object_store_sides(f"store-{uuid.uuid4().hex[:8]}", 16, 30.0, cleanups)  # smaller than any part
    ticket = sides.open("r1", LAYOUT)
    deadline = time.monotonic() + 30
    while sides.counters().num_rejected_full == 0:  # the sender learns of the refusal without waiting for it
        assert time.monotonic() < deadline
        time.sleep(0.05)
    sides.send(ticket, 0, _parts())
    assert sides.sender.take_receipt("r1") is None
    with pytest.raises(KVStoreFullError):
        sides.receive("r1", LAYOUT, timeout_s=5)
    for cleanup in cleanups:
        cleanup()


def test_a_receipt_of_objects_ray_no_longer_has_fails_the_load(object_store_sides):
    import base64
    import os

    from kv_transfer.object_store.receipt import Receipt

    sides = object_store_sides
    sides.send(sides.open("r1", LAYOUT), 0, _parts())
    receipt = Receipt.from_text(sides.sender.take_receipt("r1"))
    # An object id its owner never made (or freed, and Ray evicted it): what a receipt read after the lease is.
    gone = receipt.model_copy(update={"objects": tuple(
        stored.model_copy(update={"object_id": base64.b64encode(os.urandom(28)).decode()})
        for stored in receipt.objects)})
    with pytest.raises((KVNotFoundError, KVTimeoutError), match="r1"):
        sides.receiver.receive(sides.source, "r1", LAYOUT, timeout_s=2, receipt=gone.to_text())
    sides.release("r1")


def test_an_unreadable_receipt_is_a_payload_error(object_store_sides):
    sides = object_store_sides
    sides.send(sides.open("r1", LAYOUT), 0, _parts())
    receipt = sides.sender.take_receipt("r1")
    with pytest.raises(KVPayloadError, match="receipt"):
        sides.receiver.receive(sides.source, "r1", LAYOUT, timeout_s=2, receipt=receipt[:-5])
    sides.release("r1")


def test_segments_are_cut_below_rays_parallel_copy_and_arrive_whole(ray_cluster):
    # Ray copies a buffer of 1 MiB or more with 6 threads; a process with fewer cores cuts them (transport.py).
    from kv_transfer.object_store.transport import RAY_PARALLEL_COPY_BYTES

    cleanups: list[Callable[[], None]] = []
    name = f"store-{uuid.uuid4().hex[:8]}"
    store = create_store(name=name, capacity_bytes=1 << 30, lease_s=30)
    cleanups.append(lambda: ray.kill(store))
    sender = ObjectStoreTransport(home_store=name, is_cutting_segments=True)
    layout = KVLayout(num_parts=2, part_shape=(40, 2, 16, 512), dtype="float32")  # 64 KiB blocks, 2.5 MiB parts
    rng = np.random.default_rng(3)
    parts = [rng.standard_normal(layout.part_shape, dtype=np.float32) for _ in range(layout.num_parts)]
    sender.send(sender.open("r1", layout), 0, [[parts[0][:25], parts[0][25:]], parts[1]])
    received = ObjectStoreTransport().receive(name, "r1", layout, timeout_s=10, receipt=sender.take_receipt("r1"))
    for segments, sent in zip(received, parts, strict=True):
        assert len(segments) > 2 and all(segment.nbytes < RAY_PARALLEL_COPY_BYTES for segment in segments)
        assert np.array_equal(np.concatenate(segments), sent)
    ObjectStoreTransport().release(name, "r1")
    assert ray.get(store.counters.remote()).num_open == 0
    for cleanup in cleanups:
        cleanup()


def test_only_segments_whose_blocks_lead_are_cut():
    from kv_transfer.object_store.transport import RAY_PARALLEL_COPY_BYTES, cut_below_parallel_copy

    blocks_first = np.zeros((40, 16384), dtype=np.float32)  # 64 KiB blocks: 15 to a cut segment
    cut = cut_below_parallel_copy([blocks_first, blocks_first[:3]], block_dim=0)
    assert [segment.shape[0] for segment in cut] == [15, 15, 10, 3]
    assert all(segment.flags.c_contiguous and segment.nbytes < RAY_PARALLEL_COPY_BYTES for segment in cut)
    kv_first = np.zeros((2, 40, 8192), dtype=np.float32)  # (K/V, blocks, ...): a cut would not be contiguous
    assert cut_below_parallel_copy([kv_first], block_dim=1)[0] is kv_first
