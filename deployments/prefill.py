"""Prefill: compute the prompt's KV once and hand decode a handle to it.

0. At start-up (object_store backend) the replica creates its KV store, so that the store belongs to it: Ray
   restarts a crashed store, and the store ends with the replica whose engine made the KV.
1. The router's hand-off (handoff.py) sends the user's typed request, already checked by `check_disaggregable`.
2. `to_prefill_request` turns it into a one-token, non-streamed request that asks the KV connector to keep the
   prompt's blocks for a remote decoder.
3. vLLM's serving layer validates it (model name, context length, sampling values) and the engine runs the
   prompt; the one sampled token is thrown away, decode samples its own.
4. The connector parks the blocks on a lease and returns `kv_transfer_params`, which become a `KVHandle`, signed
   with the app's key so that decode (and `release`) can tell it came from here.
   Any failure comes back as an `ErrorResponse` value, never as an exception that could take the replica down.
5. When the scheduler chose prefill-local (decode's engines are saturated, this one idle), `generate` runs the
   whole request here instead, as a single engine would: no KV is kept for anyone.
6. When Serve stops the replica (scaled down, redeployed), no new request reaches it, but decode may still have to
   read KV it handed out: `__del__` waits until none is held (read, released or expired: at most the lease), so
   that streams stay exact while replicas come and go, then stops the engine.
The router's `Dispatch` names this replica (Serve's request router sends it here) and counts its load.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.engine_server import HEALTH_CHECK, EngineServer
from deployments.error_responses import server_error
from deployments.messages import Dispatch, OpenAIRequest
from deployments.pd_protocol import to_prefill_request
from kv_transfer.backend import store_name
from kv_transfer.handle import KVHandle, KVHandleError
from kv_transfer.object_store.store import create_store
from kv_transfer.object_store.store_state import StoreCounters
from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")
# Beyond the KV lease, how long a stopping prefill replica waits for its KV to be read: the lease's own clock starts
# when the prompt finished, so a lease is over by then; the margin covers a release on its way.
KV_DRAIN_MARGIN_S = 5


@serve.deployment(**HEALTH_CHECK)
class PrefillServer(EngineServer):
    role_name = "prefill"

    async def __init__(self, config: AppConfig, kv_handle_key: str):
        rank = self._name_kv_engine(config, kv_handle_key)
        self._store = None
        if config.transfer.backend == "object_store":
            self.kv_store = store_name(self.engine_id)
            self._store = create_store(name=self.kv_store, lease_s=config.transfer.kv_lease_s,
                                       capacity_bytes=config.transfer.store_capacity_bytes)
            await self._store.counters.remote()  # the store is up (and publishing) before the engine starts
        await self._start_engine(config, config.prefill, rank, transfer=config.transfer, is_kv_producer=True)
        logger.info("prefill engine %s ready (KV out through %s)", self.engine_id, config.transfer.backend)

    async def prefill(self, request: OpenAIRequest, dispatch: Dispatch | None = None) -> KVHandle | ErrorResponse:
        with self._load.counted(dispatch):
            response = await self._engine.generate(self._in_order(to_prefill_request(request), dispatch))
        if isinstance(response, ErrorResponse):
            logger.info("request %s: prefill refused: %s", request.request_id, response.error.message)
            return response
        try:
            handle = KVHandle.from_kv_transfer_params(
                response.kv_transfer_params,
                backend=self._config.transfer.backend,
                request_id=request.request_id,
                num_prompt_tokens=response.usage.prompt_tokens,
                prefill_engine_id=self.engine_id,
            )
        except KVHandleError as exc:
            logger.error("request %s: %s", request.request_id, exc)
            return server_error(str(exc))
        logger.info("request %s: prefilled %d tokens into %d blocks", request.request_id,
                    handle.num_prompt_tokens, handle.num_blocks)
        return self._signer.sign(handle)

    async def generate(self, request: OpenAIRequest, dispatch: Dispatch | None = None) -> AsyncGenerator[Any, None]:
        """Prefill-local: the whole request on this engine (its SSE strings, one response, or an ErrorResponse)."""
        logger.info("request %s: prefill-local: prompt and decode on %s", request.request_id, self.engine_id)
        async for answer in self._counted_answers(request, dispatch):
            yield answer

    async def store_counters(self, dispatch: Dispatch | None = None) -> StoreCounters | None:
        """What this replica's KV store holds now and has seen (object_store backend), else None."""
        return None if self._store is None else await self._store.counters.remote()

    async def release(self, handle: KVHandle, dispatch: Dispatch | None = None) -> None:
        """The router will not decode this handle (client gone, decode failed): drop its KV now. The object store
        drops it at once; vLLM's NIXL connector frees its blocks when their lease (`kv_lease_s`) runs out.
        `dispatch` names the replica that owns the handle, so that the release reaches it with several replicas."""
        if not self._signer.is_authentic(handle):
            logger.warning("request %s: release of a KV handle this app did not sign: ignored", handle.request_id)
            return
        if self._store is not None and handle.prefill_engine_id == self.engine_id and handle.object_store_key:
            is_released = await self._store.release.remote(handle.object_store_key)
            logger.info("request %s: KV released unread (%s)", handle.request_id,
                        "dropped" if is_released else "already gone")

    # 6.
    async def holds_kv(self, dispatch: Dispatch | None = None) -> bool:
        """Requests in flight here, or KV handed out and not yet read, released or expired: in the KV store
        (object store), or in the engine's blocks (NIXL keeps a finished prompt's blocks until decode read them)."""
        if self._load is not None and self._load.num_requests:
            return True
        if self._store is not None:
            return (await self._store.counters.remote()).num_open > 0
        return self._engine is not None and self._engine.counters().kv_cache_usage > 0

    async def __del__(self) -> None:
        if self._engine is None or not self._engine.is_alive:  # never started, or died: its KV went with it
            super().__del__()
            return
        deadline = time.monotonic() + self._config.transfer.kv_lease_s + KV_DRAIN_MARGIN_S
        try:
            while time.monotonic() < deadline and await self.holds_kv():
                await asyncio.sleep(0.5)
        except Exception as exc:  # a store that died took its KV with it: nothing left to wait for
            logger.warning("prefill %s: stopping without waiting for its KV: %s", self.engine_id, exc)
        logger.info("prefill %s: stopping (KV %s)", self.engine_id,
                    "still held: lease not over" if time.monotonic() >= deadline else "all read or released")
        super().__del__()
