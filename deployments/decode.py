"""Decode: continue from prefill's KV and stream the tokens.

1. The router's hand-off sends the user's original request and the `KVHandle` prefill returned. A handle without
   this app's signature (it could point at another request's KV), or with less than half of its KV lease left (the
   blocks may be freed and reused before they are read), is never used: decode computes that prompt itself.
2. `to_decode_request` puts the handle's `kv_transfer_params` on the request; nothing else changes, so vLLM's
   serving layer renders, validates and samples exactly as a single engine would.
3. The engine's KV connector sees the params, reads the prompt's blocks from prefill (the request waits while
   other requests keep decoding) and schedules the request with those tokens already computed.
4. Tokens flow back as vLLM's own SSE strings (streaming) or one response object, passed through untouched.
   If the client goes away, the router cancels this generator and vLLM aborts the request and frees its blocks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from deployments.engine_server import HEALTH_CHECK, EngineServer
from deployments.error_responses import bad_request
from deployments.messages import Dispatch, OpenAIRequest
from deployments.pd_protocol import to_decode_request
from kv_transfer.handle import KVHandle, KVHandleError
from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(**HEALTH_CHECK)
class DecodeServer(EngineServer):
    role_name = "decode"

    async def __init__(self, config: AppConfig, kv_handle_key: str):
        rank = self._name_kv_engine(config, kv_handle_key)
        await self._start_engine(config, config.decode, rank, transfer=config.transfer, is_kv_producer=False)
        logger.info("decode engine %s ready (KV in through %s)", self.engine_id, config.transfer.backend)

    async def decode(self, request: OpenAIRequest, handle: KVHandle | None,
                     dispatch: Dispatch | None = None) -> AsyncGenerator[Any, None]:
        """Yields vLLM's SSE strings when `request.stream`, else one response; or one ErrorResponse. Without a
        handle (the scheduler chose decode-local, or prefill failed), or with one it must not use, this engine
        computes the prompt too, as a single engine would. `dispatch`: the router's (replica and load)."""
        handle = self._usable(handle, request.request_id)
        if handle is None:
            decode_request = request
        else:
            try:
                decode_request = to_decode_request(request, handle)
            except KVHandleError as exc:
                yield bad_request(str(exc))
                return
            logger.info("request %s: decoding from %d prompt tokens in %d blocks of %s", request.request_id,
                        handle.num_prompt_tokens, handle.num_blocks, handle.prefill_engine_id)
        async for answer in self._counted_answers(decode_request, dispatch):
            yield answer

    def _usable(self, handle: KVHandle | None, request_id: str) -> KVHandle | None:
        """`handle` if it is this app's and fresh, else None: this engine computes the prompt (the log says why)."""
        lease_s = self._config.transfer.kv_lease_s
        if handle is None:
            logger.info("request %s: no KV handle (decode-local, or prefill failed): computing the prompt here",
                        request_id)
        elif not self._signer.is_authentic(handle):
            logger.warning("request %s: a KV handle this app did not sign (forged, or from another deploy): not "
                           "used; computing the prompt here", request_id)
        elif not handle.is_fresh(lease_s):
            logger.warning("request %s: its KV handle is %.0f s old, past half its %d s lease: not used; computing "
                           "the prompt here", request_id, time.time() - handle.issued_at, lease_s)
        else:
            return handle
        return None
