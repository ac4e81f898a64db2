"""The connector's scheduler half: decides which blocks to save (prefill) and to load (decode). No Ray, no bytes.

Prefill request (kv_transfer_params `do_remote_decode`):
1. `build_connector_meta`: on the step that computes the prompt's last token, ask the worker to stage every
   prompt block (`SaveRequest`), keyed by the request id.
2. `request_finished`: the params returned say where decode finds the KV (`RemoteKV`). The blocks stay allocated
   until the worker has put them into the store (it reports them in `get_finished`), since it reads them in
   place instead of copying them first.
3. `update_connector_output`, later in the same scheduler pass: the worker's receipts for this step
   (`SplitserveWorkerMetadata`) are attached to the params just returned, before vLLM sends them on. A receipt that
   misses its step (the worker's save outlasted `wait_for_save`) is dropped: decode then claims the KV instead.
Decode request (params carry a `RemoteKV`):
1. `get_num_new_matched_tokens`: every prompt token not already in the local prefix cache will be loaded. With a
   receipt (`is_load_in_step`), inside the step that computes the prompt's last token: all but that token, which
   vLLM computes to sample from. Without one, asynchronously: the request waits, others keep decoding, and vLLM
   computes the last token again once every token is in.
2. `update_state_after_alloc`: the blocks vLLM allocated for them become a `LoadRequest` for the worker.
3. The worker loads before the step's forward pass, or reports the background load done in `get_finished`; a
   failed load's blocks go back through `get_block_ids_with_load_errors`, and vLLM's `recompute` policy computes
   them.
"""

from __future__ import annotations

import math
from typing import Any

from kv_transfer.handle import (
    RemoteKV,
    attach_receipt,
    is_remote_decode_request,
    remote_kv_from_params,
    remote_kv_to_params,
)
from kv_transfer.object_store.metadata import LoadRequest, SaveRequest, SplitserveConnectorMetadata


class SchedulerSide:
    def __init__(self, block_size: int, source: str = "", is_load_in_step: bool = False):
        self.block_size = block_size
        self.source = source  # where this engine's KV goes (its store's name); prefill only
        self.is_load_in_step = is_load_in_step  # decode: a KV with a receipt loads inside the step that uses it
        # prefill: params returned this scheduler pass, waiting for their receipts (request id -> params)
        self._awaiting_receipts: dict[str, dict[str, Any]] = {}
        # prefill: request id -> block ids allocated so far, for requests whose KV goes to a remote decoder
        self._producing_block_ids: dict[str, list[int]] = {}
        self._num_prompt_tokens: dict[str, int] = {}
        self._saved: set[str] = set()
        # decode: at matching time, the local prefix-cache hit and whether the load is in-step; then loads (and
        # releases of transfers nothing is loaded from) waiting for the next step
        self._matched: dict[str, tuple[int, bool]] = {}
        self._pending_loads: list[LoadRequest] = []

    @property
    def num_tracked_requests(self) -> int:
        """Requests this half still keeps state for: 0 once every request has finished."""
        return len(self._producing_block_ids.keys() | self._num_prompt_tokens.keys() | self._saved
                   | self._matched.keys() | self._awaiting_receipts.keys()) + len(self._pending_loads)

    # --- decode ---------------------------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        params = request.kv_transfer_params
        if is_remote_decode_request(params):
            self._num_prompt_tokens[request.request_id] = len(request.prompt_token_ids or [])
            return 0, False
        remote = remote_kv_from_params(params)
        if remote is None:
            return 0, False
        num_prompt_tokens = len(request.prompt_token_ids or [])
        # Every part of a KV with a receipt is in the store already: the step that needs it can load it. vLLM then
        # computes the prompt's last token in that step (a step must compute one), so that one is not loaded; where
        # that leaves nothing to load (a one-token prompt, or a local hit on all but the last token), the load
        # goes in the background as without a receipt, so that the transfer is read and released as always.
        num_in_step = min(remote.num_tokens, num_prompt_tokens - 1) - num_computed_tokens
        if self.is_load_in_step and remote.receipt is not None and num_in_step > 0:
            self._matched[request.request_id] = (num_computed_tokens, True)
            return num_in_step, False
        count = min(remote.num_tokens, num_prompt_tokens) - num_computed_tokens
        if count <= 0:
            return 0, False
        self._matched[request.request_id] = (num_computed_tokens, False)
        return count, True

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        if is_remote_decode_request(request.kv_transfer_params):
            self._producing_block_ids[request.request_id] = list(blocks.get_block_ids()[0])
            return
        remote = remote_kv_from_params(request.kv_transfer_params)
        if num_external_tokens == 0:
            self._matched.pop(request.request_id, None)
            if remote is not None:
                # Nothing of it is loaded (vLLM kept a local hit instead, or the prompt needs nothing): release the
                # transfer now, as a load would after reading it, instead of holding it until its lease ends.
                self._pending_loads.append(LoadRequest(
                    request_id=request.request_id, source=remote.source, transfer_key=remote.transfer_key,
                    num_remote_blocks=remote.num_blocks, first_remote_block=0, block_ids=()))
                request.kv_transfer_params = {**request.kv_transfer_params, "do_remote_prefill": False}
            return
        assert remote is not None, "external tokens were promised only for requests with RemoteKV"
        num_local_tokens, is_in_step = self._matched.pop(request.request_id, (0, False))
        # Local prefix-cache hits cover whole blocks; the rest of the prompt's blocks come from prefill.
        first_remote_block = num_local_tokens // self.block_size
        num_needed_blocks = math.ceil((num_local_tokens + num_external_tokens) / self.block_size)
        block_ids = tuple(blocks.get_block_ids()[0][first_remote_block:num_needed_blocks])
        self._pending_loads.append(LoadRequest(
            request_id=request.request_id, source=remote.source, transfer_key=remote.transfer_key, num_remote_blocks=remote.num_blocks,
            first_remote_block=first_remote_block, block_ids=block_ids, receipt=remote.receipt,
            is_in_step=is_in_step, num_tokens=num_external_tokens,
        ))
        # The KV is in flight now: a second call (after the load) must not load it again.
        request.kv_transfer_params = {**request.kv_transfer_params, "do_remote_prefill": False}

    # --- prefill --------------------------------------------------------------------------------------------

    def build_connector_meta(self, scheduler_output: Any) -> SplitserveConnectorMetadata:
        metadata = SplitserveConnectorMetadata(loads=self._pending_loads)
        self._pending_loads = []
        progress: dict[str, int] = {}
        for new in scheduler_output.scheduled_new_reqs:
            if new.req_id in self._producing_block_ids:
                self._producing_block_ids[new.req_id] = list(new.block_ids[0])
                progress[new.req_id] = new.num_computed_tokens
        cached = scheduler_output.scheduled_cached_reqs
        for index, request_id in enumerate(cached.req_ids):
            if request_id in self._producing_block_ids:
                new_block_ids = cached.new_block_ids[index]
                if new_block_ids is not None:
                    self._producing_block_ids[request_id].extend(new_block_ids[0])
                progress[request_id] = cached.num_computed_tokens[index]
        for request_id, num_computed in progress.items():
            num_scheduled = scheduler_output.num_scheduled_tokens.get(request_id, 0)
            num_prompt_tokens = self._num_prompt_tokens[request_id]
            if request_id not in self._saved and num_computed + num_scheduled >= num_prompt_tokens:
                num_blocks = math.ceil(num_prompt_tokens / self.block_size)
                block_ids = tuple(self._producing_block_ids[request_id][:num_blocks])
                metadata.saves.append(SaveRequest(request_id, transfer_key=request_id, block_ids=block_ids))
                self._saved.add(request_id)
        return metadata

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        request_id = request.request_id
        self._producing_block_ids.pop(request_id, None)
        self._matched.pop(request_id, None)
        num_prompt_tokens = self._num_prompt_tokens.pop(request_id, 0)
        if request_id not in self._saved:
            return False, None
        self._saved.discard(request_id)
        remote = RemoteKV(source=self.source, transfer_key=request_id, num_tokens=num_prompt_tokens,
                          num_blocks=math.ceil(num_prompt_tokens / self.block_size))
        params = self._awaiting_receipts[request_id] = remote_kv_to_params(remote)
        # True: vLLM frees the blocks only when the worker reports this request's send done.
        return True, params

    def update_connector_output(self, receipts: dict[str, str]) -> None:
        """This step's receipts from the worker (transfer key = request id), attached to the params returned in this
        same scheduler pass; whatever waits longer has been sent on without one."""
        for request_id, params in self._awaiting_receipts.items():
            receipt = receipts.get(request_id)
            if receipt is not None:
                attach_receipt(params, receipt)
        self._awaiting_receipts.clear()
