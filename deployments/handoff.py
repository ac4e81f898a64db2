"""The hand-off: one request's way through the engines, behind one entry point, `serve(request, timing)`.

Disaggregated (`PDHandoff`):
1. `check_disaggregable` refuses (400) what a split request cannot honour.
2. Admission refuses (503) a request that a role at its overload bound could only queue (admission.py).
3. Prefill runs the prompt and returns a signed `KVHandle`, or a client error (unknown model 404, prompt too long
   400, ...) that goes back as it is: decode is never asked. A prefill replica that dies or fails (5xx) is not
   fatal: decode computes the prompt itself, and the fallback is counted.
4. Decode continues from that KV. Its first chunk is awaited here, so that a decode failure before any token is a
   clean 503, and KV that will never be read is released at once.
5. The rest of decode's stream is passed through untouched (sse.py); however it ends (done, failed, client gone),
   decode's request is cancelled if still running and the admission slot is let go, exactly once.
Collocated (`CollocatedHandoff`, the baseline): steps 2, 4 and 5 on one engine that runs both phases.

What `serve` returns: an `ErrorResponse`, one response object (not streamed), or an async generator of vLLM's
SSE strings. Deployment handles are passed in, so tests drive it with fakes. A scheduler that decides per request
which path and which engines serve it plugs in here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle, DeploymentResponseGenerator
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.admission import Admission
from deployments.error_responses import server_error, service_unavailable
from deployments.messages import OpenAIRequest
from deployments.pd_protocol import check_disaggregable
from deployments.phase_timing import PhaseTiming
from deployments.sse import guarded, passed_through
from kv_transfer.handle import KVHandle

logger = logging.getLogger("ray.serve")

Outcome = ErrorResponse | Any | AsyncGenerator[str, None]
# A replica that died, is restarting or refuses work: the request goes elsewhere or fails cleanly, never hangs.
REPLICA_FAILURES = (RayActorError, ActorUnavailableError, BackPressureError)


class Handoff:
    """What both paths share: admission around the request, the first chunk, the pass-through."""

    def __init__(self, admission: Admission):
        self.admission = admission

    async def serve(self, request: OpenAIRequest, timing: PhaseTiming) -> Outcome:
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        full_role = self.admission.try_admit()
        if full_role is not None:
            logger.info("request %s refused: %s is at its overload bound", request.request_id, full_role)
            return service_unavailable(f"the {full_role} role is at capacity; retry later")
        try:
            result = await self._admitted(request, timing)
        except BaseException:
            self.admission.finished()
            raise
        if not isinstance(result, AsyncGenerator):
            self.admission.finished()
        return result  # a stream leaves admission when it is over (guarded)

    def _refusal(self, request: OpenAIRequest) -> ErrorResponse | None:
        return None

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming) -> Outcome:
        raise NotImplementedError

    async def _first_chunk(self, stream: DeploymentResponseGenerator, request_id: str, timing: PhaseTiming,
                           on_unread: Callable[[], None] = lambda: None) -> Outcome:
        """Awaits the engine's first chunk; `on_unread` runs when the KV handed over will never be read."""
        started = time.perf_counter()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return server_error("the engine returned nothing")
        except Exception as exc:  # the replica died or failed (whatever error Serve wraps that in)
            logger.warning("request %s: decode failed before its first token: %r", request_id, exc)
            on_unread()
            return service_unavailable("the decode replica failed; retry later")
        except BaseException:  # the client went away while decode loaded the KV: its blocks must not wait
            stream.cancel()
            on_unread()
            raise
        timing.first_chunk_s = time.perf_counter() - started
        if not isinstance(first, str):  # one response object or an ErrorResponse
            stream.cancel()
            return first

        def on_end() -> None:
            # Client gone (or done): cancelling the handle's generator makes the engine's vLLM request abort.
            stream.cancel()
            self.admission.finished()

        return guarded(passed_through(first, stream, request_id), on_end)


class PDHandoff(Handoff):
    def __init__(self, admission: Admission, *, prefill: DeploymentHandle, decode: DeploymentHandle,
                 on_prefill_fallback: Callable[[], None] = lambda: None):
        super().__init__(admission)
        self._prefill = prefill
        self._decode = decode
        self._on_prefill_fallback = on_prefill_fallback

    def _refusal(self, request: OpenAIRequest) -> ErrorResponse | None:
        return check_disaggregable(request)

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming) -> Outcome:
        started = time.perf_counter()
        try:
            handle = await self._prefilled(request)
        finally:
            self.admission.prefill_done()
        if isinstance(handle, ErrorResponse):
            return handle
        if handle is not None:
            timing.prefill_s, timing.prefill_engine_id = time.perf_counter() - started, handle.prefill_engine_id
        stream = self._decode.options(stream=True).decode.remote(request, handle)
        return await self._first_chunk(stream, request.request_id, timing, on_unread=lambda: self._release(handle))

    async def _prefilled(self, request: OpenAIRequest) -> KVHandle | ErrorResponse | None:
        """Prefill's KV handle, its client error, or None: prefill failed, and decode computes the prompt itself."""
        try:
            result = await self._prefill.prefill.remote(request)
        except REPLICA_FAILURES as exc:
            reason = repr(exc)
        else:
            if isinstance(result, KVHandle) or result.error.code < 500:
                return result
            reason = result.error.message
        logger.warning("request %s: prefill failed (%s); decode computes the prompt", request.request_id, reason)
        self._on_prefill_fallback()
        return None

    def _release(self, handle: KVHandle | None) -> None:
        """KV kept for a request that will not be decoded: free it now rather than when its lease runs out."""
        if handle is not None:
            self._prefill.release.remote(handle)  # fire and forget: the lease frees it anyway if this fails


class CollocatedHandoff(Handoff):
    def __init__(self, admission: Admission, *, collocated: DeploymentHandle):
        super().__init__(admission)
        self._collocated = collocated

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming) -> Outcome:
        stream = self._collocated.options(stream=True).generate.remote(request)
        return await self._first_chunk(stream, request.request_id, timing)
