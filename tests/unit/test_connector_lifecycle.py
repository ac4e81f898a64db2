"""Our connector's two halves, step by step as vLLM drives them, with real tensors and a real KV-store actor.

Prefill: match → alloc → build meta (save) → save_kv_layer per layer → request_finished (params out).
Decode: match → alloc → build meta (load) → start_load_kv → get_finished → blocks equal prefill's.
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

from kv_transfer.connector_metadata import LoadRequest, SaveRequest
from kv_transfer.handle import remote_kv_from_params
from kv_transfer.scheduler_side import SchedulerSide
from kv_transfer.store import get_or_create_store
from kv_transfer.transports.object_store import ObjectStoreTransport
from kv_transfer.worker_side import WorkerSide

BLOCK_SIZE = 4
NUM_BLOCKS = 8
LAYER_SHAPE = (NUM_BLOCKS, 2, BLOCK_SIZE, 6)  # the CPU backend's [blocks, kv_heads, block_size, 2*head_dim]
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
    store = get_or_create_store(name="store", capacity_bytes=1 << 28, lease_s=30)
    yield store
    ray.shutdown()


def _worker(store, kv_caches) -> WorkerSide:
    worker = WorkerSide(lambda: ObjectStoreTransport(store), NUM_BLOCKS, load_timeout_s=5)
    worker.register_kv_caches(kv_caches)
    return worker


def _wait_finished(worker: WorkerSide, timeout_s: float = 10) -> set[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if finished := worker.get_finished():
            return finished
        time.sleep(0.02)
    raise TimeoutError("load never finished")


def _prefill(store, prompt_len: int, block_ids: list[int]) -> tuple[dict, dict]:
    """Walk one prefill request; returns its kv caches and the params vLLM hands back to the router."""
    kv = {name: torch.randn(LAYER_SHAPE) for name in LAYER_NAMES}
    scheduler, worker = SchedulerSide(BLOCK_SIZE), _worker(store, kv)
    request = SimpleNamespace(request_id="p1", prompt_token_ids=list(range(prompt_len)),
                              kv_transfer_params={"do_remote_decode": True})

    assert scheduler.get_num_new_matched_tokens(request, 0) == (0, False)
    scheduler.update_state_after_alloc(request, FakeBlocks(block_ids), 0)
    output = FakeSchedulerOutput(
        scheduled_new_reqs=[SimpleNamespace(req_id="p1", block_ids=(block_ids,), num_computed_tokens=0)],
        num_scheduled_tokens={"p1": prompt_len})
    metadata = scheduler.build_connector_meta(output)
    assert metadata.saves == [SaveRequest("p1", transfer_key="p1", block_ids=tuple(block_ids))]
    for name in LAYER_NAMES:  # as the attention layers finish, in order
        worker.save_kv_layer(metadata, name, kv[name])
    worker.wait_for_save(metadata)  # end of the step: the transfer is registered before anyone hears of it
    delay_free, params = scheduler.request_finished(request, block_ids)

    assert delay_free is False  # the blocks were copied out during the forward pass
    assert scheduler.num_tracked_requests == 0
    return kv, params


def test_prefill_save_then_decode_load_moves_exactly_the_prompt_blocks(store):
    prefill_kv, params = _prefill(store, prompt_len=10, block_ids=[5, 2, 7])
    remote = remote_kv_from_params(params)
    assert (remote.transfer_key, remote.num_tokens, remote.num_blocks) == ("p1", 10, 3)

    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    scheduler, worker = SchedulerSide(BLOCK_SIZE), _worker(store, decode_kv)
    request = SimpleNamespace(request_id="d1", prompt_token_ids=list(range(10)), kv_transfer_params=params)

    assert scheduler.get_num_new_matched_tokens(request, 0) == (10, True)
    scheduler.update_state_after_alloc(request, FakeBlocks([1, 6, 3]), 10)
    metadata = scheduler.build_connector_meta(FakeSchedulerOutput())
    assert metadata.loads == [LoadRequest("d1", "p1", num_remote_blocks=3, first_remote_block=0,
                                          block_ids=(1, 6, 3))]
    worker.start_load_kv(metadata)
    assert _wait_finished(worker) == {"d1"}

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
    counters = ray.get(store.counters.remote())
    assert (counters.num_open, counters.num_bytes_in_use) == (0, 0)


def test_decode_loads_only_what_its_prefix_cache_lacks(store):
    prefill_kv, params = _prefill(store, prompt_len=10, block_ids=[0, 1, 2])
    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    scheduler, worker = SchedulerSide(BLOCK_SIZE), _worker(store, decode_kv)
    request = SimpleNamespace(request_id="d2", prompt_token_ids=list(range(10)), kv_transfer_params=params)

    assert scheduler.get_num_new_matched_tokens(request, 4) == (6, True)  # one block was a local hit
    scheduler.update_state_after_alloc(request, FakeBlocks([7, 4, 5]), 6)
    metadata = scheduler.build_connector_meta(FakeSchedulerOutput())
    assert metadata.loads[0].first_remote_block == 1 and metadata.loads[0].block_ids == (4, 5)
    worker.start_load_kv(metadata)
    assert _wait_finished(worker) == {"d2"}
    for name in LAYER_NAMES:
        assert torch.equal(decode_kv[name][[4, 5]], prefill_kv[name][[1, 2]])
        assert not decode_kv[name][7].any()  # the local hit is not overwritten
    scheduler.request_finished(request, [7, 4, 5])
    assert scheduler.num_tracked_requests == 0
    assert ray.get(store.counters.remote()).num_open == 0


def test_a_failed_load_reports_its_blocks_for_recompute(store):
    decode_kv = {name: torch.zeros(LAYER_SHAPE) for name in LAYER_NAMES}
    worker = _worker(store, decode_kv)
    load = LoadRequest("d3", "never-prefilled", num_remote_blocks=2, first_remote_block=0, block_ids=(3, 4))
    worker.start_load_kv(SimpleNamespace(loads=[load]))
    assert _wait_finished(worker) == {"d3"}  # finished, so vLLM stops waiting...
    assert worker.get_block_ids_with_load_errors() == {3, 4}  # ...and recomputes these blocks
    assert worker.take_stats()["num_failed_transfers"] == [1]
    assert ray.get(store.counters.remote()).num_open == 0
