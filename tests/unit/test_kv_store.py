"""The store's bookkeeping, step by step on a fake clock; every story ends with nothing held."""

from __future__ import annotations

import pytest

from kv_transfer.errors import KVExpiredError, KVNotFoundError, KVStoreFullError, KVTransferError
from kv_transfer.layout import KVLayout
from kv_transfer.object_store.store_state import KVStoreState

LAYOUT = KVLayout(num_parts=3, part_shape=(2, 4, 8), dtype="float32")  # 256 bytes a part, 768 in all


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _store(capacity_bytes: int = 10_000, lease_s: float = 30.0) -> tuple[KVStoreState, FakeClock]:
    clock = FakeClock()
    return KVStoreState(capacity_bytes, lease_s, clock), clock


def test_a_transfer_from_open_to_release():
    store, clock = _store()
    ticket = store.open("r1", LAYOUT)
    assert ticket.layout == LAYOUT and store.num_bytes_in_use == LAYOUT.nbytes

    assert store.add_parts("r1", 0, ["p0"]) is False
    assert store.add_parts("r1", 2, ["p2"]) is False  # parts may come out of order
    with pytest.raises(KVTransferError, match="1 of 3|2 of 3"):
        store.claim("r1")
    assert store.add_parts("r1", 1, ["p1"]) is True

    clock.now = 25.0
    assert store.claim("r1") == ["p0", "p1", "p2"]
    clock.now = 50.0  # the claim renewed the lease: still there 25 s later
    assert store.release("r1") is True
    assert store.release("r1") is False

    counters = store.counters()
    assert (counters.num_open, counters.num_bytes_in_use) == (0, 0)
    assert (counters.num_opened, counters.num_claimed, counters.num_released) == (1, 1, 1)
    assert counters.peak_bytes_in_use == LAYOUT.nbytes


def test_an_unclaimed_transfer_expires_and_frees_its_memory():
    store, clock = _store(lease_s=10)
    store.open("r1", LAYOUT)
    store.add_parts("r1", 0, ["a", "b", "c"])
    clock.now = 10.0
    assert store.expire() == ["r1"]
    with pytest.raises(KVExpiredError, match="r1"):
        store.claim("r1")
    counters = store.counters()
    assert (counters.num_expired, counters.num_open, counters.num_bytes_in_use) == (1, 0, 0)


def test_unknown_keys_are_not_found():
    store, _ = _store()
    with pytest.raises(KVNotFoundError, match="nope"):
        store.claim("nope")
    with pytest.raises(KVNotFoundError):
        store.add_parts("nope", 0, ["x"])


def test_the_memory_bound_refuses_new_transfers_and_frees_on_release():
    store, _ = _store(capacity_bytes=2 * LAYOUT.nbytes)
    store.open("r1", LAYOUT)
    store.open("r2", LAYOUT)
    with pytest.raises(KVStoreFullError, match="r3"):
        store.open("r3", LAYOUT)
    store.release("r1")
    store.open("r4", LAYOUT)  # memory came back (r3 stays refused: its late parts must not open it)
    store.release("r2")
    store.release("r4")
    counters = store.counters()
    assert counters.num_rejected_full == 1 and counters.num_bytes_in_use == 0


def test_misuse_is_a_clear_error():
    store, _ = _store()
    assert store.open("r1", LAYOUT) == store.open("r1", LAYOUT)  # an announcement may come twice: a no-op
    other = KVLayout(num_parts=3, part_shape=(2, 4, 16), dtype="float32")
    with pytest.raises(KVTransferError, match="another layout"):
        store.open("r1", other)
    with pytest.raises(KVTransferError, match="part 3"):
        store.add_parts("r1", 2, ["x", "y"])
    store.release("r1")
    assert store.counters().num_open == 0


def test_parts_may_arrive_before_the_open_and_open_the_transfer():
    # 1. Prefill's parts overtake its announcement (Ray does not order an async actor's calls): they open it.
    store, _ = _store()
    assert store.phase("r1") == "unknown"
    assert store.add_parts("r1", 0, ["a", "b", "c"], layout=LAYOUT) is True
    assert store.phase("r1") == "complete" and store.num_bytes_in_use == LAYOUT.nbytes
    # 2. The announcement arrives late: a no-op, the parts stay.
    store.open("r1", LAYOUT)
    assert store.claim("r1") == ["a", "b", "c"]
    assert store.release("r1") is True
    assert store.counters().num_opened == 1


def test_a_closed_transfer_is_never_opened_again_by_a_late_message():
    # 1. Refused for memory: its parts are dropped, and a claim gets the reason at once.
    store, clock = _store(capacity_bytes=LAYOUT.nbytes, lease_s=10)
    store.open("r1", LAYOUT)
    with pytest.raises(KVStoreFullError):
        store.open("r2", LAYOUT)
    assert store.add_parts("r2", 0, ["a", "b", "c"], layout=LAYOUT) is False
    assert store.phase("r2") == "closed"
    with pytest.raises(KVStoreFullError, match="r2"):
        store.claim("r2")
    # 2. Released before prefill's messages arrived (the router gave up early): they cannot open it.
    assert store.release("r3") is False
    with pytest.raises(KVTransferError, match="released"):
        store.open("r3", LAYOUT)
    assert store.add_parts("r3", 0, ["a", "b", "c"], layout=LAYOUT) is False
    # 3. Expired: late parts are dropped too.
    clock.now = 10.0
    assert store.expire() == ["r1"]
    assert store.add_parts("r1", 0, ["a", "b", "c"], layout=LAYOUT) is False
    counters = store.counters()
    assert (counters.num_open, counters.num_bytes_in_use, counters.num_rejected_full) == (0, 0, 1)
