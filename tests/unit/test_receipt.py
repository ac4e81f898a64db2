"""A transfer's receipt (kv_transfer/object_store/receipt.py) against the installed Ray: it round-trips as text, and
writing or reading one pins no object (Ray pins a reference pickled outside a task for the life of the process,
which would leak every transfer's KV).

1. Put objects through an object store smaller than their sum, writing each one's receipt (and reading it back in
   the second story), and dropping the reference: Ray must then count none of them as needed (a pickled reference,
   pinned, made it report 160% of the store needed in the same probe).
2. A receipt read back maps the same bytes, and survives the text round trip unchanged.
"""

from __future__ import annotations

import re
import uuid

import numpy as np
import pytest
import ray

from kv_transfer.object_store.receipt import Receipt, read_refs, write_receipt

STORE_BYTES = 200 << 20
OBJECT_BYTES = 16 << 20
NUM_OBJECTS = 20  # 320 MB through 200 MB


@pytest.fixture(scope="module")
def small_store():
    ray.init(num_cpus=1, include_dashboard=False, namespace=f"receipt-{uuid.uuid4().hex[:6]}", logging_level="ERROR",
             log_to_driver=False, object_store_memory=STORE_BYTES,
             _system_config={"automatic_object_spilling_enabled": False})
    yield
    ray.shutdown()


@pytest.mark.parametrize("is_read_back", [False, True])
def test_receipts_pin_no_object(small_store, is_read_back):
    payload = np.arange(OBJECT_BYTES, dtype=np.uint8)
    for _ in range(NUM_OBJECTS):
        ref = ray.put([payload])
        text = write_receipt([(ref, 0)]).to_text()
        if is_read_back:
            (read,) = read_refs(Receipt.from_text(text))
            assert np.array_equal(ray.get(read, timeout=10)[0], payload)
            del read
        del ref  # with the receipt alone left, Ray may free the object
    from ray._private.internal_api import memory_summary

    summary = memory_summary(stats_only=True)  # "Plasma memory usage 112 MiB, 7 objects, 56.0% full, 0.0% needed"
    needed = re.search(r"([\d.]+)% needed", summary)
    assert needed is not None, summary
    assert float(needed.group(1)) < 100 * OBJECT_BYTES / STORE_BYTES, summary  # not even one object held


def test_a_receipt_round_trips_as_text(small_store):
    parts = [np.full(1000, index, dtype=np.int16) for index in range(3)]
    first, second = ray.put(parts[:2]), ray.put(parts[2:])
    receipt = write_receipt([(first, 0), (first, 1), (second, 0)])
    assert (len(receipt.objects), receipt.parts) == (2, ((0, 0), (0, 1), (1, 0)))
    assert Receipt.from_text(receipt.to_text()) == receipt
    refs = read_refs(Receipt.from_text(receipt.to_text()))
    assert [int(ray.get(refs[chunk])[position][0]) for chunk, position in receipt.parts] == [0, 1, 2]
    with pytest.raises(ValueError, match="version 2"):
        Receipt.from_text(receipt.model_copy(update={"version": 2}).to_text())
