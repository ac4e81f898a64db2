"""Decode: continue from prefill's KV and stream the tokens.

1. The router sends the user's original request and the `KVHandle` prefill returned. A handle without this
   app's signature (it could point at another request's KV), or with less than half of its KV lease left (the
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
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from ray import serve

from deployments.engine import Engine
from deployments.engine_counters import EngineCounters
from deployments.pd_protocol import bad_request, to_decode_request
from kv_transfer.handle import KVHandle, KVHandleError
from kv_transfer.handle_signing import HandleSigner
from serve_app.config import AppConfig

logger = logging.getLogger("ray.serve")


@serve.deployment(health_check_period_s=10, health_check_timeout_s=30)
class DecodeServer:
    async def __init__(self, config: AppConfig, kv_handle_key: str):
        self._config = config
        self._signer = HandleSigner(kv_handle_key)
        rank = serve.get_replica_context().rank.local_rank
        self.engine_id = f"decode-{rank}-{uuid.uuid4().hex[:8]}"
        self._engine = await Engine.start(config.model, config.decode, replica_rank=rank, role_name="decode",
                                          transfer=config.transfer, engine_id=self.engine_id, is_kv_producer=False)
        logger.info("decode engine %s ready (KV in through %s)", self.engine_id, config.transfer.backend)

    async def decode(self, request: Any, handle: KVHandle | None) -> AsyncGenerator[Any, None]:
        """Yields vLLM's SSE strings when `request.stream`, else one response; or one ErrorResponse. Without a
        handle (prefill failed), or with one it must not use, this engine computes the prompt too, as a single
        engine would."""
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
        result = await self._engine.generate(decode_request)
        if isinstance(result, AsyncGenerator):
            async for chunk in result:
                yield chunk
        else:
            yield result

    def _usable(self, handle: KVHandle | None, request_id: str) -> KVHandle | None:
        """`handle` if it is this app's and fresh, else None: this engine computes the prompt (the log says why)."""
        lease_s = self._config.transfer.kv_lease_s
        if handle is None:
            logger.info("request %s: no KV handle (prefill failed): computing the prompt here", request_id)
        elif not self._signer.is_authentic(handle):
            logger.warning("request %s: a KV handle this app did not sign (forged, or from another deploy): not "
                           "used; computing the prompt here", request_id)
        elif not handle.is_fresh(lease_s):
            logger.warning("request %s: its KV handle is %.0f s old, past half its %d s lease: not used; computing "
                           "the prompt here", request_id, time.time() - handle.issued_at, lease_s)
        else:
            return handle
        return None

    def counters(self) -> EngineCounters:
        return self._engine.counters()

    def role(self) -> dict[str, Any]:
        return {"role": "decode", "engine_id": self.engine_id, "transfer_backend": self._config.transfer.backend,
                "is_engine_alive": self._engine.is_alive}

    async def check_health(self) -> None:
        await self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
