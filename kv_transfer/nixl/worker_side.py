"""The worker half of our NIXL connector (the model worker process): vLLM's pull worker, with the READs of in-step
requests awaited before the forward pass that uses them (kv_transfer/nixl/in_step.py).

One engine step on decode:
1. `start_load_kv` (before the forward pass when the step has in-step loads): vLLM's pull worker starts every READ
   of the step. We then poll the in-step READs' own NIXL handles until each is done or has failed, for at most
   `transfer.load_timeout_s`, and only then read vLLM's results (whatever else completed meanwhile, background
   loads, is held for step 4).
2. A failed in-step READ: vLLM's worker queues its blocks as load errors, which vLLM reads at the end of this
   step and recomputes; we record its tokens. A READ that outlives the timeout is abandoned the same way.
3. The forward pass computes the in-step requests' last prompt token over the loaded blocks.
4. `get_transfer_results`: vLLM's results plus those held in step 1, less the in-step requests: vLLM's scheduler
   only expects completions of requests that wait for their KV, and in-step requests never wait.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
from vllm.logger import init_logger

from kv_transfer.nixl.in_step import IN_STEP_ATTR, SplitserveNixlStats

logger = init_logger(__name__)

# How often the model thread polls NIXL while an in-step READ runs: a 1,000-token prompt's READ takes 15-30 ms here.
_POLL_INTERVAL_S = 0.0005


class InStepNixlWorker(NixlPullConnectorWorker):
    def __init__(self, vllm_config: Any, engine_id: str, kv_cache_config: Any, *, load_timeout_s: float):
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self.xfer_stats = SplitserveNixlStats()
        self._load_timeout_s = load_timeout_s
        self._held = KVConnectorTransferResults()  # completions seen while waiting, for the step's results
        self._abandoned: set[str] = set()  # in-step requests whose READ outlived the timeout

    def start_load_kv(self, metadata: Any) -> None:
        self._drop_abandoned_handshakes()
        super().start_load_kv(metadata)
        in_step: dict[str, int] = getattr(metadata, IN_STEP_ATTR, None) or {}
        if in_step:
            self._await_in_step(in_step)

    def get_transfer_results(self) -> KVConnectorTransferResults:
        # An abandoned READ left vLLM's books in `_abandon` (handles and metadata), so vLLM never reports it here.
        self._hold(super().get_transfer_results())
        results, self._held = self._held, KVConnectorTransferResults()
        return results

    def ready_engine_ids(self) -> frozenset[str]:
        """The prefill engines this worker holds a NIXL connection to."""
        with self._handshake_lock:
            return frozenset(engine_id for engine_id, agents in self._remote_agents.items() if agents)

    def _await_in_step(self, in_step: dict[str, int]) -> None:
        pending, failed = set(in_step), set()
        deadline = time.monotonic() + self._load_timeout_s
        while pending:
            # Handshakes that finished since (a connection dropped since the scheduler's last report): start
            # their READs as vLLM's start_load_kv does.
            self._drop_abandoned_handshakes()
            while not self._ready_requests.empty():
                self._read_blocks_for_req(*self._ready_requests.get_nowait())
            if self._may_have_news(pending):
                results = super().get_transfer_results()
                done = (results.finished_recving | results.failed_recving) & pending
                failed |= results.failed_recving & done
                pending -= done
                results.finished_recving -= done
                results.failed_recving -= done
                self._hold(results)
            if pending and time.monotonic() > deadline:
                self._abandon(pending)
                failed |= pending
                break
            if pending:
                time.sleep(_POLL_INTERVAL_S)
        for req_id in failed:
            self.xfer_stats.record_failed_in_step(in_step[req_id])

    def _may_have_news(self, pending: set[str]) -> bool:
        """Whether vLLM's results can report a pending request now: one of them has no READ in flight (done, failed,
        or not started yet) or a failure is queued. A poll asks NIXL about the step's own handles only: vLLM's whole
        get_transfer_results also reads notifications, reaps leases and cleans up engines, all of which can wait."""
        if not self._failed_recv_reqs.empty() or self._recv_failures & pending:
            return True
        for req_id in pending:
            if not any(self._is_in_flight(handle) for handle in self._recving_transfers.get(req_id, ())):
                return True
        return False

    def _is_in_flight(self, handle: int) -> bool:
        try:
            return self.nixl_wrapper.check_xfer_state(handle) == "PROC"
        except Exception:  # vLLM's results check it again, and log and count the failure
            return False

    def _abandon(self, req_ids: set[str]) -> None:
        """READs that outlived the timeout: release their handles and report their blocks as load errors now, so
        that vLLM recomputes them in this step. Their handles and metadata leave vLLM's books, so vLLM never reports
        them later."""
        for req_id in req_ids:
            logger.warning("in-step NIXL load of %s took over %.1f s: recomputing it", req_id, self._load_timeout_s)
            for handle in self._recving_transfers.pop(req_id, []):
                self._handle_failed_transfer(req_id, handle)
            meta = self._recving_metadata.pop(req_id, None)
            if meta is not None and not self._is_hma_required:
                self._invalid_block_ids.put(set(meta.local_block_ids[0]))
            self._abandoned.add(req_id)

    def _drop_abandoned_handshakes(self) -> None:
        """An abandoned request whose handshake finished since must not start its READ (vLLM's start_load_kv
        starts every request whose handshake finished): its blocks are being recomputed."""
        ready = []
        while not self._ready_requests.empty():
            ready.append(self._ready_requests.get_nowait())
        for req_id, meta in ready:
            if req_id in self._abandoned:
                self._abandoned.discard(req_id)
            else:
                self._ready_requests.put((req_id, meta))

    def _hold(self, results: KVConnectorTransferResults) -> None:
        self._held.finished_sending |= results.finished_sending
        self._held.finished_recving |= results.finished_recving
        self._held.failed_recving |= results.failed_recving
