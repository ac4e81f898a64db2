"""Our connector's two halves, step by step as vLLM drives them, with real tensors and a real KV-store actor.

Prefill: match → alloc → build meta (save) → save_kv_layer per layer → wait_for_save (the KV wholly in the store)
→ request_finished (params out, blocks held) → the step's worker meta (the transfer's receipt) attached to those
params → get_finished reports the send (blocks freed).
Decode: match → alloc → build meta (load) → start_load_kv (reads by the receipt; claims from the store without
one) → get_finished → blocks equal prefill's. With in-step loads (a receipt in hand), start_load_kv itself writes
the blocks before the step's forward pass, and vLLM never waits for a report.
Each story ends with the store, both scheduler halves and both workers holding nothing.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import ray
import torch

from kv_transfer.object_store.metadata import LoadRequest, SaveRequest
from kv_transfer.handle import remote_kv_from_params
from kv_transfer.object_store.scheduler_side import SchedulerSide
from kv_transfer.object_store.store import create_store
from kv_transfer.object_store.transport import ObjectStoreTransport
from kv_transfer.object_store.worker_side import WorkerSide

BLOCK_SIZE = 4
NUM_BLOCKS = 8
LAYER_SHAPE = (NUM_BLOCKS, 2, BLOCK_SIZE, 6)  # the CPU backend's [blocks, kv_heads, block_size, 2*head_dim]
STORE = "prefill-store"
LAYER_NAMES = [f"model.layers.{index}.self_attn.attn" for index in range(3)]


@dataclass
class FakeBlocks:
    ids: list[int]

    def get_block_ids(self) -> tuple[list[int], ...]:
        return (self.ids,)


@dataclass
class FakeSchedulerOutput:
    scheduled_new_reqs: list = field(default_factory=list)
    scheduled_cached_reqs: SimpleNamespace = field(
        default_factory=lambda: SimpleNamespace(req_ids=[], new_block_ids=[], num_computed_tokens=[]))
    num_scheduled_tokens: dict = field(default_factory=dict)


@pytest.fixture(scope="module")
def store():
    ray.init(num_cpus=1, include_dashboard=False, namespace=f"kv-lifecycle-{uuid.uuid4().hex[:6]}",
             logging_level="ERROR", log_to_driver=False)
    store = create_store(name=STORE, capacity_bytes=1 << 28, lease_s=30)
    yield store
    ray.shutdown()


def _worker(kv_caches, is_prefill: bool = False, is_layer_by_layer: bool = True) -> WorkerSide:
    worker = WorkerSide(lambda: ObjectStoreTransport(home_store=STORE if is_prefill else None), NUM_BLOCKS,
                        load_timeout_s=5, is_layer_by_layer=is_layer_by_layer)
    worker.register_kv_caches(kv_caches)
    return worker


def _wait_finished(worker: WorkerSide, timeout_s: float = 10) -> tuple[set[str], set[str]]:
    """(sent, loaded) request ids, once the worker reports any."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sent, loaded = worker.get_finished()
        if sent or loaded:
            return sent, loaded
        time.sleep(0.02)
    raise TimeoutError("the worker never reported a finished transfer")


def _prefill(prompt_len: int, block_ids: list[int], dtype: torch.dtype = torch.float32,
             is_layer_by_layer: bool = True, is_receipt_in_step: bool = True) -> tuple[dict, dict]:
    """Walk one prefill request; returns its kv caches and the params vLLM hands back to the router.
    `is_receipt_in_step`: the step's worker output carries the transfer's receipt (else it missed its step)."""
    kv = {name: torch.randn(LAYER_SHAPE).to(dtype) for name in LAYER_NAMES}
    scheduler = SchedulerSide(BLOCK_SIZE, source=STORE)
    worker = _worker(kv, is_prefill=True, is_layer_by_layer=is_layer_by_layer)
    # vLLM's request ids are unique (it appends a random suffix); the store remembers closed keys, so reuse none.
    request_id = f"p1-{uuid.uuid4().hex[:8]}"
    request = SimpleNamespace(request_id=request_id, prompt_token_ids=list(range(prompt_len)),
                              kv_transfer_params={"do_remote_decode": True})

    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, FakeBlocks(block_ids), 0)
    output = FakeSchedulerOutput(
        scheduled_new_reqs=[SimpleNamespace(req_id=request_id, block_ids=(block_ids,), num_computed_tokens=0)],
        num_scheduled_tokens={request_id: prompt_len})
    metadata = scheduler.build_connector_meta(output)
    assert metadata.saves == [SaveRequest(request_id, transfer_key=request_id, block_ids=tuple(block_ids))]
    for name in LAYER_NAMES:  # as the attention layers finish, in order
        worker.save_kv_layer(metadata, name, kv[name])
    worker.wait_for_save(metadata)  # end of the step: the KV is in the store before anyone hears of it
    delay_free, params = scheduler.request_finished(request, block_ids)
    receipts = worker.take_receipts()  # the step's worker meta, which vLLM hands the scheduler after request_finished
    assert set(receipts) == {request_id} and worker.take_receipts() == {}
    scheduler.update_connector_output(receipts if is_receipt_in_step else {})
    assert (remote_kv_from_params(params).receipt is not None) == is_receipt_in_step

    assert delay_free is True  # the worker reads the blocks in place: vLLM keeps them until the send is done
    assert _wait_finished(worker) == ({request_id}, set())  # now vLLM frees them
    assert scheduler.num_tracked_requests == 0
    return kv, params


def _decode_load(params: dict, block_ids: list[int], request_id: str = "d1", num_local_tokens: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[dict, SchedulerSide, WorkerSide, SimpleNamespace]:
    """A background load (the connector's mode without `is_load_in_step`, and for handles without a receipt)."""
    decode_kv = {name: torch.zeros(LAYER_SHAPE, dtype=dtype) for name in LAYER_NAMES}
    scheduler, worker = SchedulerSide(BLOCK_SIZE), _worker(decode_kv)
    remote = remote_kv_from_params(params)
    request = SimpleNamespace(request_id=request_id, prompt_token_ids=list(range(remote.num_tokens)),
                              kv_transfer_params=params)
    num_external = remote.num_tokens - num_local_tokens
    assert scheduler.get_num_new_matched_tokens(request, num_local_tokens) == (num_external, True)
    scheduler.update_state_after_alloc(request, FakeBlocks(block_ids), num_external)
    metadata = scheduler.build_connector_meta(FakeSchedulerOutput())
    worker.start_load_kv(metadata)
    assert _wait_finished(worker) == (set(), {request_id})
    return decode_kv, scheduler, worker, request


def _assert_store_empty(store, timeout_s: float = 5) -> None:
    """Decode releases a transfer just after reporting it loaded, so the store empties a moment later."""
    deadline = time.monotonic() + timeout_s
    while (counters := ray.get(store.counters.remote())).num_open and time.monotonic() < deadline:
        time.sleep(0.02)
    assert (counters.num_open, counters.num_bytes_in_use) == (0, 0), counters


def test_prefill_save_then_decode_load_moves_exactly_the_prompt_blocks(store):
    before = ray.get(store.counters.remote())
    prefill_kv, params = _prefill(prompt_len=10, block_ids=[5, 2, 7])
    remote = remote_kv_from_params(params)
    assert (remote.source, remote.transfer_key, remote.num_tokens, remote.num_blocks) == (STORE, remote.transfer_key, 10, 3)
    assert remote.transfer_key.startswith("p1-")

    decode_kv, scheduler, worker, request = _decode_load(params, [1, 6, 3])
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[1, 6, 3]], prefill_kv[name][[5, 2, 7]])
        untouched = [block for block in range(NUM_BLOCKS) if block not in (1, 6, 3)]
        assert not decode_kv[name][untouched].any()
    # After the load vLLM allocates again; nothing more is loaded.
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3, 4]), 0)
    assert scheduler.build_connector_meta(FakeSchedulerOutput()).loads == []
    assert scheduler.request_finished(request, [1, 6, 3, 4]) == (False, None)

    stats = worker.take_stats()
    assert len(stats["transfer_duration"]) == 1 and stats["num_failed_transfers"] == []
    assert stats["bytes_transferred"] == [3 * LAYER_SHAPE[1] * LAYER_SHAPE[2] * LAYER_SHAPE[3] * 4 * 3]
    assert worker.get_block_ids_with_load_errors() == set()
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)
    after = ray.get(store.counters.remote())  # read by its receipt: decode's release counts as its claim
    assert (after.num_claimed - before.num_claimed, after.num_released - before.num_released) == (1, 1)


def test_without_a_receipt_decode_claims_the_kv_from_the_store(store):
    # A receipt that misses its step (the save outlasted wait_for_save): the handle carries none, and decode asks
    # prefill's store for the parts.
    before = ray.get(store.counters.remote())
    prefill_kv, params = _prefill(prompt_len=10, block_ids=[5, 2, 7], is_receipt_in_step=False)
    decode_kv, scheduler, worker, request = _decode_load(params, [1, 6, 3], request_id="d8")
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[1, 6, 3]], prefill_kv[name][[5, 2, 7]])
    scheduler.request_finished(request, [1, 6, 3])
    _assert_store_empty(store)
    after = ray.get(store.counters.remote())
    assert (after.num_claimed - before.num_claimed, after.num_released - before.num_released) == (1, 1)


def test_decode_loads_only_what_its_prefix_cache_lacks(store):
    prefill_kv, params = _prefill(prompt_len=10, block_ids=[0, 1, 2])  # one run of blocks: one segment
    decode_kv, scheduler, _, request = _decode_load(params, [7, 4, 5], request_id="d2", num_local_tokens=4)
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[4, 5]], prefill_kv[name][[1, 2]])
        assert not decode_kv[name][7].any()  # the local hit is not overwritten
    scheduler.request_finished(request, [7, 4, 5])
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)


def test_bfloat16_kv_arrives_bit_for_bit(store):
    prefill_kv, params = _prefill(prompt_len=7, block_ids=[3, 4], dtype=torch.bfloat16)
    decode_kv, scheduler, _, request = _decode_load(params, [0, 1], dtype=torch.bfloat16)
    for name in LAYER_NAMES:
        assert decode_kv[name].dtype == torch.bfloat16
        assert torch.equal(decode_kv[name][[0, 1]], prefill_kv[name][[3, 4]])
    scheduler.request_finished(request, [0, 1])
    _assert_store_empty(store)


def test_without_overlap_the_kv_is_sent_at_the_end_of_the_step(store):
    prefill_kv, params = _prefill(prompt_len=9, block_ids=[6, 1, 2], is_layer_by_layer=False)
    decode_kv, scheduler, _, request = _decode_load(params, [3, 4, 5])
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[3, 4, 5]], prefill_kv[name][[6, 1, 2]])
    scheduler.request_finished(request, [3, 4, 5])
    _assert_store_empty(store)


def test_a_failed_load_reports_its_blocks_for_recompute(store):
    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    worker = _worker(decode_kv)
    load = LoadRequest("d3", STORE, "never-prefilled", num_remote_blocks=2, first_remote_block=0, block_ids=(3, 4))
    worker.start_load_kv(SimpleNamespace(loads=[load]))
    assert _wait_finished(worker) == (set(), {"d3"})  # finished, so vLLM stops waiting...
    assert worker.get_block_ids_with_load_errors() == {3, 4}  # ...and recomputes these blocks
    assert worker.take_stats()["num_failed_transfers"] == [1]
    _assert_store_empty(store)


def test_a_prefill_whose_store_refuses_still_frees_its_blocks(store):
    kv = {name: torch.randn(LAYER_SHAPE) for name in LAYER_NAMES}
    worker = WorkerSide(lambda: ObjectStoreTransport(home_store="no-such-store"), NUM_BLOCKS, load_timeout_s=5)
    worker.register_kv_caches(kv)
    metadata = SimpleNamespace(saves=[SaveRequest("p9", transfer_key="p9", block_ids=(1, 2))], loads=[])
    for name in LAYER_NAMES:
        worker.save_kv_layer(metadata, name, kv[name])
    worker.wait_for_save(metadata)
    assert _wait_finished(worker) == ({"p9"}, set())  # nothing was sent, and vLLM may free the blocks
    assert worker.take_receipts() == {}  # and no receipt: decode, finding no transfer, recomputes
    _assert_store_empty(store)


def test_blocks_land_in_runs_that_cross_the_senders_segments(store):
    # Prefill's blocks are two runs ([3, 4] and [7]: two segments); decode's are one run ([1, 5, 6] after a
    # local prefix hit on block 1): the load copies remote blocks 1 and 2 into local 5 and 6, across the boundary.
    prefill_kv, params = _prefill(prompt_len=10, block_ids=[3, 4, 7])
    decode_kv, scheduler, worker, request = _decode_load(params, [1, 5, 6], request_id="d7", num_local_tokens=4)
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[5, 6]], prefill_kv[name][[4, 7]])
        assert not decode_kv[name][[block for block in range(NUM_BLOCKS) if block not in (5, 6)]].any()
    assert worker.get_block_ids_with_load_errors() == set()
    scheduler.request_finished(request, [1, 5, 6])
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)


def test_receipts_cross_from_worker_to_scheduler_as_vllm_carries_worker_metadata(store):
    # The connector as vLLM calls it: the worker's metadata of a step (pickled across vLLM's worker process
    # boundary, aggregated over workers) reaches the scheduler after request_finished, in the same pass.
    import pickle

    from kv_transfer.object_store.metadata import SplitserveWorkerMetadata

    first, second = SplitserveWorkerMetadata({"a": "receipt-a"}), SplitserveWorkerMetadata({"b": "receipt-b"})
    merged = pickle.loads(pickle.dumps(first)).aggregate(second)
    assert merged.receipts == {"a": "receipt-a", "b": "receipt-b"}
    scheduler = SchedulerSide(BLOCK_SIZE, source=STORE)
    request = SimpleNamespace(request_id="a", prompt_token_ids=list(range(6)), kv_transfer_params={"do_remote_decode": True})
    scheduler.get_num_new_matched_tokens(request, 0)
    scheduler.update_state_after_alloc(request, FakeBlocks([0, 1]), 0)
    scheduler.build_connector_meta(FakeSchedulerOutput(
        scheduled_new_reqs=[SimpleNamespace(req_id="a", block_ids=([0, 1],), num_computed_tokens=0)],
        num_scheduled_tokens={"a": 6}))
    _, params = scheduler.request_finished(request, [0, 1])
    scheduler.update_connector_output(merged.receipts)
    assert remote_kv_from_params(params).receipt == "receipt-a"
    assert scheduler.num_tracked_requests == 0


def test_a_kv_with_its_receipt_loads_inside_the_step_that_computes_the_last_prompt_token(store):
    # 1. Prefill: 9 prompt tokens in blocks [5, 2, 7] (4 tokens a block: the 9th alone in block 7).
    prefill_kv, params = _prefill(prompt_len=9, block_ids=[5, 2, 7])
    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    scheduler, worker = SchedulerSide(BLOCK_SIZE, is_load_in_step=True), _worker(decode_kv)
    request = SimpleNamespace(request_id="d10", prompt_token_ids=list(range(9)), kv_transfer_params=params)
    # 2. Match: all but the last token, synchronously; vLLM computes that one in the same step to sample from it.
    assert scheduler.get_num_new_matched_tokens(request, 0) == (8, False)
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3]), 8)
    (load,) = scheduler.build_connector_meta(FakeSchedulerOutput()).loads
    assert (load.is_in_step, load.num_tokens, load.block_ids) == (True, 8, (1, 6))
    # 3. The step: start_load_kv returns with the blocks written, before the forward pass reads them.
    worker.start_load_kv(SimpleNamespace(loads=[load]))
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[1, 6]], prefill_kv[name][[5, 2]])
        assert not decode_kv[name][3].any()  # the last token's block: computed by decode, not loaded
    # 4. vLLM hears of no background load, no error; the transfer is counted, the store emptied.
    assert worker.get_finished() == (set(), set())
    assert worker.get_block_ids_with_load_errors() == set()
    stats = worker.take_stats()
    assert len(stats["transfer_duration"]) == 1
    assert (stats["num_failed_transfers"], stats["failed_in_step_tokens"]) == ([], [])
    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)  # a rescheduled request recomputes
    scheduler.request_finished(request, [1, 6, 3])
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)


def test_without_a_receipt_even_an_in_step_decoder_loads_in_the_background(store):
    # The parts may still be on their way: the step must not wait for them.
    _, params = _prefill(prompt_len=10, block_ids=[5, 2, 7], is_receipt_in_step=False)
    scheduler = SchedulerSide(BLOCK_SIZE, is_load_in_step=True)
    request = SimpleNamespace(request_id="d11", prompt_token_ids=list(range(10)), kv_transfer_params=params)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (10, True)
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3]), 10)
    (load,) = scheduler.build_connector_meta(FakeSchedulerOutput()).loads
    assert not load.is_in_step
    worker = _worker({name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES})
    worker.start_load_kv(SimpleNamespace(loads=[load]))
    assert _wait_finished(worker) == (set(), {"d11"})
    scheduler.request_finished(request, [1, 6, 3])
    _assert_store_empty(store)


def test_an_in_step_load_that_fails_reports_its_blocks_at_the_end_of_its_step(store):
    worker = _worker({name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES})
    load = LoadRequest("d12", STORE, "never-prefilled", num_remote_blocks=2, first_remote_block=0, block_ids=(3, 4),
                       receipt="not a receipt", is_in_step=True, num_tokens=7)
    worker.start_load_kv(SimpleNamespace(loads=[load]))  # returns: the step goes on, its output is dropped
    assert worker.get_block_ids_with_load_errors() == {3, 4}  # vLLM recomputes these blocks
    assert worker.get_finished() == (set(), set())
    stats = worker.take_stats()
    assert (stats["num_failed_transfers"], stats["failed_in_step_tokens"]) == ([1], [7])  # counted as computed
    _assert_store_empty(store)


def test_an_in_step_decoder_with_nothing_to_load_before_the_last_token_loads_in_the_background(store):
    # A one-token prompt: in the step, vLLM would compute that token and load nothing, and the transfer would
    # stay in the store until its lease ran out. So it loads in the background, read and released as always.
    prefill_kv, params = _prefill(prompt_len=1, block_ids=[5])
    scheduler = SchedulerSide(BLOCK_SIZE, is_load_in_step=True)
    request = SimpleNamespace(request_id="d13", prompt_token_ids=[0], kv_transfer_params=params)
    assert scheduler.get_num_new_matched_tokens(request, 0) == (1, True)
    scheduler.update_state_after_alloc(request, FakeBlocks([2]), 1)
    (load,) = scheduler.build_connector_meta(FakeSchedulerOutput()).loads
    assert not load.is_in_step and load.block_ids == (2,)
    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    worker = _worker(decode_kv)
    worker.start_load_kv(SimpleNamespace(loads=[load]))
    assert _wait_finished(worker) == (set(), {"d13"})
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][2], prefill_kv[name][5])
    scheduler.request_finished(request, [2])
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)


def test_a_transfer_nothing_is_loaded_from_is_released_at_once(store):
    # vLLM scheduled the request with no external tokens (it kept a local hit instead): nobody will read the
    # transfer, so decode releases it unread in the next step instead of leaving it to its lease.
    before = ray.get(store.counters.remote())
    _, params = _prefill(prompt_len=10, block_ids=[5, 2, 7])
    scheduler, worker = SchedulerSide(BLOCK_SIZE, is_load_in_step=True), _worker(
        {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES})
    request = SimpleNamespace(request_id="d14", prompt_token_ids=list(range(10)), kv_transfer_params=params)
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3]), 0)
    (release,) = scheduler.build_connector_meta(FakeSchedulerOutput()).loads
    assert release.block_ids == ()
    worker.start_load_kv(SimpleNamespace(loads=[release]))
    assert worker.get_finished() == (set(), set()) and worker.take_stats()["transfer_duration"] == []
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3, 4]), 0)  # later allocations release nothing
    assert scheduler.build_connector_meta(FakeSchedulerOutput()).loads == []
    scheduler.request_finished(request, [1, 6, 3, 4])
    assert scheduler.num_tracked_requests == 0
    _assert_store_empty(store)
    after = ray.get(store.counters.remote())
    assert (after.num_claimed - before.num_claimed, after.num_released - before.num_released) == (0, 1)
