"""The scheduler half of our NIXL connector (vLLM's EngineCore process): vLLM's pull scheduler, with a split from a
prefill engine decode is already connected to loaded inside the step that computes it (kv_transfer/nixl/in_step.py).

A split request on decode:
1. `get_num_new_matched_tokens`: vLLM's pull scheduler matches the remote prompt (n tokens, in the background). If
   the worker holds a connection to the request's prefill engine, we match n-1 tokens synchronously instead.
2. `update_state_after_alloc`: the request's blocks are queued for the worker to READ, as before. For an in-step
   request we name the blocks ourselves: vLLM caches a synchronously loaded request's blocks as it allocates them
   (it delays that only for background loads), and vLLM's pull scheduler takes every cached block for a local
   prefix hit, so it would READ only the last, partial block.
3. `build_connector_meta`: the in-step requests of this step are named in the metadata, with their token counts;
   their lease heartbeats stop, since they are read in this very step.
4. `update_connector_output`: the worker's `ReadyEngines`, when it sends them, replace what we knew.
"""

from __future__ import annotations

from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_scheduler import NixlPullConnectorScheduler

from kv_transfer.nixl.in_step import IN_STEP_ATTR, ReadyEngines, num_in_step_tokens


class InStepNixlScheduler(NixlPullConnectorScheduler):
    def __init__(self, vllm_config: Any, engine_id: str, kv_cache_config: Any, *, is_load_in_step: bool):
        super().__init__(vllm_config, engine_id, kv_cache_config)
        self._is_load_in_step = is_load_in_step
        self._ready_engines: frozenset[str] = frozenset()
        # request id -> (tokens matched in step, tokens decode had computed itself), until its step's metadata
        self._in_step: dict[str, tuple[int, int]] = {}

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        num_matched, is_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        # vLLM asks again each step until it can allocate the request's blocks: decide afresh each time.
        self._in_step.pop(request.request_id, None)
        if not self._is_load_in_step:
            return num_matched, is_async
        num_tokens = num_in_step_tokens(num_matched, is_async, request.kv_transfer_params, self._ready_engines)
        if num_tokens is None:
            return num_matched, is_async
        self._in_step[request.request_id] = (num_tokens, num_computed_tokens)
        return num_tokens, False

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        super().update_state_after_alloc(request, blocks, num_external_tokens)
        matched = self._in_step.get(request.request_id)
        if matched is None or num_external_tokens == 0 or request.request_id not in self._reqs_need_recv:
            return
        # Local prefix hits are whole blocks; every block after them is read from prefill, as for a background load.
        num_local_blocks = matched[1] // self.block_size
        block_ids = blocks.get_block_ids()
        local_block_ids = self.get_exchange_clipped_blocks(tuple(group[num_local_blocks:] for group in block_ids))
        self._reqs_need_recv[request.request_id] = (
            request, local_block_ids, tuple(num_local_blocks for _ in block_ids), True)

    def build_connector_meta(self, scheduler_output: Any) -> Any:
        metadata = super().build_connector_meta(scheduler_output)
        in_step = {req_id: self._in_step.pop(req_id)[0] for req_id in metadata.reqs_to_recv
                   if req_id in self._in_step}
        setattr(metadata, IN_STEP_ATTR, in_step)
        for req_id in in_step:
            self._stop_heartbeat(req_id)
        return metadata

    def update_connector_output(self, connector_output: Any) -> None:
        super().update_connector_output(connector_output)
        ready = connector_output.kv_connector_worker_meta
        if isinstance(ready, ReadyEngines):
            self._ready_engines = ready.engine_ids

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        self._in_step.pop(request.request_id, None)  # matched in step, then aborted before it was scheduled
        return super().request_finished(request, block_ids)
