"""NIXL loads inside decode's step (kv_transfer/nixl/in_step.py): the decision, the worker → scheduler report, the
stats, and the worker half's wait walked step by step over a scripted vLLM pull worker (the real one needs an
engine; tests/e2e/test_serving.py checks the whole path on the running app)."""

from __future__ import annotations

import queue
import threading
from types import SimpleNamespace

import pytest
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats

from kv_transfer.config import NixlExtraConfig, TransferConfig
from kv_transfer.nixl.in_step import IN_STEP_ATTR, ReadyEngines, SplitserveNixlStats, num_in_step_tokens
from kv_transfer.nixl.worker_side import InStepNixlWorker
from kv_transfer.stats import TransferStats

SPLIT = {"do_remote_prefill": True, "remote_engine_id": "prefill-0"}
READY = frozenset({"prefill-0"})


def test_a_split_from_a_connected_engine_loads_all_but_its_last_token_in_step():
    assert num_in_step_tokens(100, True, SPLIT, READY) == 99


@pytest.mark.parametrize("num_matched, is_async, params, ready", [
    (100, True, SPLIT, frozenset()),  # not connected yet: the background load makes the connection
    (100, True, {**SPLIT, "remote_engine_id": "prefill-1"}, READY),
    (1, True, SPLIT, READY),  # only the last token to load: nothing left to load before it
    (0, False, SPLIT, READY),  # vLLM matched nothing (e.g. a local prefix hit on the whole prompt)
    (100, True, None, READY),  # not a split
    (100, True, {"do_remote_decode": True, "remote_engine_id": "prefill-0"}, READY),  # prefill's own request
])
def test_everything_else_keeps_vllms_background_load(num_matched, is_async, params, ready):
    assert num_in_step_tokens(num_matched, is_async, params, ready) is None


def test_ready_engines_of_several_workers_are_those_all_of_them_hold():
    merged = ReadyEngines(frozenset({"a", "b"})).aggregate(ReadyEngines(frozenset({"b", "c"})))
    assert merged.engine_ids == frozenset({"b"})


def test_failed_in_step_tokens_reach_the_transfer_stats_through_vllms_aggregation():
    stats = SplitserveNixlStats()
    stats.record_failed_transfer()
    stats.record_failed_in_step(41)
    # vLLM's logger starts from the connector class's empty stats and aggregates each step's into it; a plain
    # NixlKVConnectorStats (no key of ours) aggregates too.
    total = SplitserveNixlStats().aggregate(stats).aggregate(_plain_failure())
    parsed = TransferStats.from_connector_stats(total.data)
    assert (parsed.num_recomputed_tokens, parsed.num_failed) == (41, 2)


def _plain_failure() -> NixlKVConnectorStats:
    stats = NixlKVConnectorStats()
    stats.record_failed_transfer()
    return stats


def test_the_nixl_extra_config_carries_the_in_step_setting_and_its_timeout():
    extra = NixlExtraConfig.from_transfer(TransferConfig(is_load_in_step=True, load_timeout_s=7))
    assert (extra.is_load_in_step, extra.load_timeout_s) == (True, 7)


def test_by_default_both_backends_load_in_step_and_false_is_vllms_background_load():
    """As measured on a 2-core host (docs/benchmarks.md)."""
    assert TransferConfig().is_load_in_step is True
    assert NixlExtraConfig.from_transfer(TransferConfig()).is_load_in_step is True
    assert NixlExtraConfig.from_transfer(TransferConfig(is_load_in_step=False)).is_load_in_step is False


class _ScriptedPull:
    """What vLLM's pull worker would report on each call of get_transfer_results: one scripted result per call."""

    def __init__(self, *results: KVConnectorTransferResults):
        self.results = list(results)
        self.num_calls = 0
        self.num_reads_started: list[str] = []

    def next(self) -> KVConnectorTransferResults:
        self.num_calls += 1
        return self.results.pop(0) if self.results else KVConnectorTransferResults()


class _Handles:
    """NIXL's check_xfer_state for the handles of a test: each handle's states in turn, its last one kept (NIXL keeps
    a finished transfer's status)."""

    def __init__(self, **states: list[str]):
        self.states = {int(name.removeprefix("h")): list(seq) for name, seq in states.items()}
        self.num_checks = 0

    def check_xfer_state(self, handle: int) -> str:
        self.num_checks += 1
        seq = self.states.setdefault(handle, ["PROC"])
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def peek(self, handle: int) -> str:
        return self.states.setdefault(handle, ["PROC"])[0]


def _worker(monkeypatch, pull: _ScriptedPull, load_timeout_s: float = 5.0) -> InStepNixlWorker:
    worker = object.__new__(InStepNixlWorker)  # vLLM's __init__ needs an engine; these are the fields we use
    worker.xfer_stats = SplitserveNixlStats()
    worker._load_timeout_s = load_timeout_s
    worker._held = KVConnectorTransferResults()
    worker._abandoned = set()
    worker._ready_requests = queue.Queue()
    worker._recving_transfers = {}
    worker._recving_metadata = {}
    worker._invalid_block_ids = queue.Queue()
    worker._is_hma_required = False
    worker._handshake_lock = threading.Lock()
    worker._remote_agents = {}
    worker._failed_recv_reqs = queue.Queue()
    worker._recv_failures = set()
    worker.nixl_wrapper = _Handles()
    monkeypatch.setattr(NixlPullConnectorWorker, "start_load_kv", lambda self, metadata: None)
    monkeypatch.setattr(NixlPullConnectorWorker, "get_transfer_results", lambda self: pull.next())
    return worker


def _metadata(**in_step: int) -> SimpleNamespace:
    return SimpleNamespace(**{IN_STEP_ATTR: in_step})


def test_an_in_step_read_is_awaited_and_never_reported_as_received(monkeypatch):
    # 1. The step has one in-step request ("a") and a background one ("b"); "b" completes while we wait for "a".
    pull = _ScriptedPull(KVConnectorTransferResults(finished_recving={"b"}),
                         KVConnectorTransferResults(),
                         KVConnectorTransferResults(finished_recving={"a"}))
    worker = _worker(monkeypatch, pull)

    # 2. start_load_kv returns only once "a" is read: the forward pass after it sees the blocks.
    worker.start_load_kv(_metadata(a=99))
    assert pull.num_calls == 3

    # 3. The step's results give vLLM "b" (held meanwhile) and not "a": vLLM's scheduler only expects completions of
    #    requests that wait for their KV, and "a" never waited.
    results = worker.get_transfer_results()
    assert (results.finished_recving, results.failed_recving) == ({"b"}, set())
    assert worker.get_transfer_results().finished_recving == set()  # held results are given once
    assert worker.xfer_stats.data["failed_in_step_tokens"] == []


def test_the_wait_polls_the_steps_own_handles_and_reads_vllms_results_once_they_are_done(monkeypatch):
    # 1. "a"'s READ is two handles in flight. vLLM's results report it (and a background "b") once both are done.
    worker = _worker(monkeypatch, _ScriptedPull())
    worker._recving_transfers["a"] = [1, 2]
    worker.nixl_wrapper = _Handles(h1=["PROC", "DONE"], h2=["PROC", "PROC", "DONE"])
    num_results = []

    def vllms_results(self):
        num_results.append(1)
        if "a" in worker._recving_transfers and all(worker.nixl_wrapper.peek(handle) == "DONE"
                                                    for handle in worker._recving_transfers["a"]):
            del worker._recving_transfers["a"]
            return KVConnectorTransferResults(finished_recving={"a", "b"})
        return KVConnectorTransferResults()

    monkeypatch.setattr(NixlPullConnectorWorker, "get_transfer_results", vllms_results)

    # 2. Each poll asks NIXL about "a"'s handles only; vLLM's whole results are read once, when neither is in flight.
    worker.start_load_kv(_metadata(a=99))
    assert len(num_results) == 1
    assert worker.nixl_wrapper.num_checks >= 3
    assert worker.get_transfer_results().finished_recving == {"b"}

    # 3. A check that raises is news too: vLLM's results check the handle again, and log and count the failure.
    worker._recving_transfers["d"] = [4]
    worker.nixl_wrapper.states[4] = []  # an empty script: the check raises
    monkeypatch.setattr(NixlPullConnectorWorker, "get_transfer_results",
                        lambda self: KVConnectorTransferResults(finished_recving={"d"}, failed_recving={"d"}))
    worker.start_load_kv(_metadata(d=5))
    assert worker.xfer_stats.data["failed_in_step_tokens"] == [5]

    # 4. A queued failure (a handshake that failed) sends the wait to vLLM's results at once.
    pull = _ScriptedPull(KVConnectorTransferResults(finished_recving={"c"}, failed_recving={"c"}))
    monkeypatch.setattr(NixlPullConnectorWorker, "get_transfer_results", lambda self: pull.next())
    worker._recving_transfers["c"] = [3]
    worker._failed_recv_reqs.put("c")
    worker.start_load_kv(_metadata(c=10))
    assert pull.num_calls == 1
    assert worker.xfer_stats.data["failed_in_step_tokens"] == [5, 10]


def test_an_in_step_read_that_fails_is_counted_and_left_to_vllms_load_errors(monkeypatch):
    # vLLM's pull worker reports a failed read as finished and failed, and queues its blocks as load errors itself.
    pull = _ScriptedPull(KVConnectorTransferResults(finished_recving={"a"}, failed_recving={"a"}))
    worker = _worker(monkeypatch, pull)

    worker.start_load_kv(_metadata(a=41))

    results = worker.get_transfer_results()
    assert (results.finished_recving, results.failed_recving) == (set(), set())
    assert worker.xfer_stats.data["failed_in_step_tokens"] == [41]


def test_an_in_step_read_past_the_timeout_is_abandoned_and_its_blocks_recomputed(monkeypatch):
    # 1. "a" never completes; its READ holds one handle.
    pull = _ScriptedPull()
    worker = _worker(monkeypatch, pull, load_timeout_s=0.05)
    worker._recving_transfers["a"] = [7]
    worker._recving_metadata["a"] = SimpleNamespace(local_block_ids=([3, 4],), remote=None)
    released = []
    monkeypatch.setattr(InStepNixlWorker, "_handle_failed_transfer",
                        lambda self, req_id, handle: released.append((req_id, handle)) or True)

    # 2. The wait ends at the timeout: the handle is released, the blocks are load errors of this step.
    worker.start_load_kv(_metadata(a=200))
    assert released == [("a", 7)]
    assert worker._invalid_block_ids.get_nowait() == {3, 4}
    assert worker.xfer_stats.data["failed_in_step_tokens"] == [200]

    # 3. Nothing of it is left to the worker, and a handshake for it that finishes later starts no READ.
    assert "a" not in worker._recving_transfers and "a" not in worker._recving_metadata
    worker._ready_requests.put(("a", object()))
    worker.start_load_kv(_metadata())
    assert worker._ready_requests.empty() and worker._abandoned == set()


def test_the_worker_names_the_engines_it_holds_a_connection_to(monkeypatch):
    worker = _worker(monkeypatch, _ScriptedPull())
    worker._remote_agents.update({"prefill-0": {(0, 0): "agent"}, "prefill-1": {}})  # vLLM's defaultdict leaves {}
    assert worker.ready_engine_ids() == frozenset({"prefill-0"})


def test_an_in_step_request_reads_every_block_after_decodes_own_prefix_hit(monkeypatch):
    """vLLM caches a synchronously loaded request's blocks as it allocates them, so its pull scheduler would take them
    all for local prefix hits and read only the last, partial block; the scheduler half names the blocks itself."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler

    from kv_transfer.nixl.scheduler_side import InStepNixlScheduler

    scheduler = object.__new__(InStepNixlScheduler)  # vLLM's __init__ opens a side channel; these are our fields
    scheduler.block_size, scheduler._is_load_in_step = 128, True
    scheduler._ready_engines, scheduler._in_step, scheduler._reqs_need_recv = READY, {}, {}
    monkeypatch.setattr(InStepNixlScheduler, "get_exchange_clipped_blocks", lambda self, block_ids: block_ids)
    monkeypatch.setattr(NixlPullConnectorScheduler, "get_num_new_matched_tokens",
                        lambda self, request, num_computed: (500 - num_computed, True))

    def vllms_entry(self, request, blocks, num_external_tokens):  # what vLLM's pull scheduler queues: the last block
        self._reqs_need_recv[request.request_id] = (request, ([13],), (3,), True)

    monkeypatch.setattr(NixlPullConnectorScheduler, "update_state_after_alloc", vllms_entry)
    request = SimpleNamespace(request_id="r", kv_transfer_params=SPLIT)

    # 1. A 500-token split whose first block decode holds in its own prefix cache: 371 tokens loaded in step.
    assert scheduler.get_num_new_matched_tokens(request, 128) == (371, False)
    # 2. After allocation, every block past the local hit is read: 3 blocks cover tokens 128-499.
    blocks = SimpleNamespace(get_block_ids=lambda: ([10, 11, 12, 13],))
    scheduler.update_state_after_alloc(request, blocks, 371)
    assert scheduler._reqs_need_recv["r"] == (request, ([11, 12, 13],), (1,), True)
