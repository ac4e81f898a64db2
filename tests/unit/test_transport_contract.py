"""The contract every KV transport passes: put, get, release, lease expiry, missing keys, bad payloads, bounds.

Runs on a real local Ray cluster (one CPU, no dashboard). Each test has its own store actor, and ends by
checking that the store holds nothing.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
import time
import uuid

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
from kv_transfer.store import create_store
from kv_transfer.transports.object_store import ObjectStoreTransport

LAYOUT = KVLayout(num_parts=4, part_shape=(2, 3, 16, 8), dtype="float32", block_dim=1)  # (K/V, blocks, ...)
TRANSPORTS = ["object_store"]


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=1, include_dashboard=False, namespace=f"kv-contract-{uuid.uuid4().hex[:6]}",
             logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(params=TRANSPORTS)
def make_transport(request, ray_cluster):
    stores = []

    def make(capacity_bytes: int = 1 << 30, lease_s: float = 30.0):
        name = f"store-{uuid.uuid4().hex[:8]}"
        store = create_store(name=name, capacity_bytes=capacity_bytes, lease_s=lease_s)
        stores.append(store)
        if request.param == "object_store":
            return Sides(ObjectStoreTransport(home_store=name), ObjectStoreTransport(), name), store
        raise AssertionError(request.param)

    yield make
    for store in stores:  # every story ends with an empty store
        counters = ray.get(store.counters.remote())
        assert (counters.num_open, counters.num_bytes_in_use) == (0, 0), counters
        ray.kill(store)


@dataclass(frozen=True)
class Sides:
    """The sending side (prefill's transport, with a store of its own) and the receiving side (decode's)."""

    sender: ObjectStoreTransport
    receiver: ObjectStoreTransport
    source: str

    def open(self, key, layout):
        return self.sender.open(key, layout)

    def send(self, ticket, first_index, parts):
        self.sender.send(ticket, first_index, parts)

    def receive(self, key, layout, timeout_s):
        received = self.receiver.receive(self.source, key, layout, timeout_s)
        return [np.concatenate(segments, axis=layout.block_dim) for segments in received]

    def release(self, key):
        self.receiver.release(self.source, key)


def _parts(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(LAYOUT.part_shape, dtype=np.float32) for _ in range(LAYOUT.num_parts)]


def test_put_get_release_round_trip(make_transport):
    transport, store = make_transport()
    parts = _parts()
    ticket = transport.open("r1", LAYOUT)
    transport.send(ticket, 0, parts)

    received = transport.receive("r1", LAYOUT, timeout_s=10)
    assert all(np.array_equal(got, sent) for got, sent in zip(received, parts, strict=True))
    transport.release("r1")

    with pytest.raises(KVNotFoundError):
        transport.receive("r1", LAYOUT, timeout_s=1)
    counters = ray.get(store.counters.remote())
    assert (counters.num_opened, counters.num_claimed, counters.num_released) == (1, 1, 1)


def test_parts_sent_layer_by_layer_and_late_are_waited_for(make_transport):
    transport, _ = make_transport()
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
    transport, _ = make_transport()
    with pytest.raises(KVNotFoundError, match="never-sent"):
        transport.receive("never-sent", LAYOUT, timeout_s=1)


def test_an_unclaimed_transfer_expires(make_transport):
    transport, store = make_transport(lease_s=0.5)
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    time.sleep(1.2)
    with pytest.raises(KVExpiredError, match="r1"):
        transport.receive("r1", LAYOUT, timeout_s=1)
    assert ray.get(store.counters.remote()).num_expired == 1


def test_parts_that_never_arrive_time_out(make_transport):
    transport, _ = make_transport()
    transport.send(transport.open("r1", LAYOUT), 0, _parts()[:2])
    with pytest.raises(KVTimeoutError, match="r1"):
        transport.receive("r1", LAYOUT, timeout_s=0.5)
    transport.release("r1")


def test_a_payload_of_another_layout_is_rejected(make_transport):
    transport, _ = make_transport()
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    other = KVLayout(num_parts=LAYOUT.num_parts, part_shape=(2, 3, 32, 8), dtype="float32", block_dim=1)
    with pytest.raises(KVPayloadError, match=r"\(2, 3, 32, 8\)"):
        transport.receive("r1", other, timeout_s=5)
    transport.release("r1")


def test_the_sender_cannot_send_a_wrong_shape(make_transport):
    transport, _ = make_transport()
    ticket = transport.open("r1", LAYOUT)
    with pytest.raises(KVPayloadError, match="shape"):
        transport.send(ticket, 0, [np.zeros((2, 3), dtype=np.float32)])
    transport.release("r1")


def test_a_corrupted_payload_is_rejected(make_transport):
    transport, store = make_transport()
    transport.open("r1", LAYOUT)
    # What a broken or malicious sender could register: bytes instead of arrays.
    garbage = ray.put([b"\x00" * LAYOUT.part_nbytes for _ in range(LAYOUT.num_parts)])
    ray.get(store.add_chunk.remote("r1", 0, LAYOUT.num_parts, [garbage]))
    with pytest.raises(KVPayloadError, match="not an array"):
        transport.receive("r1", LAYOUT, timeout_s=5)
    transport.release("r1")


def test_a_full_store_refuses_new_transfers(make_transport):
    transport, store = make_transport(capacity_bytes=LAYOUT.nbytes)
    transport.send(transport.open("r1", LAYOUT), 0, _parts())
    with pytest.raises(KVStoreFullError, match="r2"):
        transport.open("r2", LAYOUT)
    transport.release("r1")
    transport.release(transport.open("r2", LAYOUT).key)
    assert ray.get(store.counters.remote()).num_rejected_full == 1


def test_a_part_may_travel_as_runs_of_blocks(make_transport):
    transport, _ = make_transport()
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
    transport, _ = make_transport()
    ticket = transport.open("r1", LAYOUT)
    with pytest.raises(KVPayloadError, match="2 blocks; expected 3"):
        transport.send(ticket, 0, [[part[:, :2]] for part in _parts()])
    transport.release("r1")


def test_a_store_that_does_not_exist_is_not_found(make_transport):
    transport, _ = make_transport()
    with pytest.raises(KVNotFoundError, match="no KV store named 'gone'"):
        transport.receiver.receive("gone", "r1", LAYOUT, timeout_s=1)
