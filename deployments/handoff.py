"""The hand-off: one request's way through the engines, behind one entry point, `serve(request, timing, path)`.

Disaggregated (`PDHandoff`):
1. `check_disaggregable` refuses (400) what a split request cannot honour.
2. Admission refuses (503) a request that a role at its overload bound could only queue (admission.py).
3. The scheduler (scheduler.py) decides the path and the engines; each call carries its `Dispatch`, so that
   Serve's request router sends it to the chosen replica and the book counts it until a load report has.
4. split: prefill runs the prompt and returns a signed `KVHandle`, or a client error (unknown model 404, prompt
   too long 400, ...) that goes back as it is: decode is never asked. A prefill replica that dies or fails (5xx)
   is not fatal: decode computes the prompt itself, and the fallback is counted. Decode continues from the KV.
   decode-local: a decode engine runs the prompt and decodes. prefill-local: a prefill engine runs it all.
5. The engine's first chunk is awaited here, so that a failure before any token is a clean 503, and KV that will
   never be read is released at once, on the prefill replica that holds it.
6. The rest of the stream is passed through untouched (sse.py); however it ends (done, failed, client gone), the
   engine's request is cancelled if still running, the admission slot is let go and the dispatch is closed,
   exactly once.
Collocated (`CollocatedHandoff`, the baseline): steps 2, 5 and 6 on one engine that runs both phases.

What `serve` returns: an `ErrorResponse`, one response object (not streamed), or an async generator of vLLM's
SSE strings. Deployment handles are passed in, so tests drive it with fakes.
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
from deployments.scheduler import Flight, Scheduler
from deployments.scheduling.policies import Decision, Path
from deployments.sse import StreamTally, guarded, passed_through
from kv_transfer.handle import KVHandle

logger = logging.getLogger("ray.serve")

Outcome = ErrorResponse | Any | AsyncGenerator[str, None]
# A replica that died, is restarting or refuses work: the request goes elsewhere or fails cleanly, never hangs.
REPLICA_FAILURES = (RayActorError, ActorUnavailableError, BackPressureError)


class Handoff:
    """What both paths share: admission around the request, the first chunk, the pass-through."""

    def __init__(self, admission: Admission):
        self.admission = admission

    async def serve(self, request: OpenAIRequest, timing: PhaseTiming, path: Path | None = None) -> Outcome:
        """`path`: one the operator forced (`scheduling.allow_path_override`); else the scheduler decides."""
        refusal = self._refusal(request)
        if refusal is not None:
            return refusal
        full_role = self.admission.try_admit()
        if full_role is not None:
            logger.info("request %s refused: %s is at its overload bound", request.request_id, full_role)
            return service_unavailable(f"the {full_role} role is at capacity; retry later")
        try:
            result = await self._admitted(request, timing, path)
        except BaseException:
            self.admission.finished()
            raise
        if not isinstance(result, AsyncGenerator):
            self.admission.finished()
        return result  # a stream leaves admission when it is over (guarded)

    def _refusal(self, request: OpenAIRequest) -> ErrorResponse | None:
        return None

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming, path: Path | None = None) -> Outcome:
        raise NotImplementedError

    async def _first_chunk(self, stream: DeploymentResponseGenerator, request_id: str, timing: PhaseTiming,
                           on_unread: Callable[[], None] = lambda: None, on_first: Callable[[], None] = lambda: None,
                           on_end: Callable[[], None] = lambda: None, role: str = "decode",
                           on_output: Callable[[int], None] = lambda num_tokens: None) -> Outcome:
        """Awaits the engine's first chunk; `on_unread` runs when the KV handed over will never be read, `on_first`
        when the first chunk came, `on_end` when the engine's part is over (whatever way; it may run twice: at
        a stream's [DONE], before the client reads it, and when the stream closes), `on_output` with
        the tokens a whole answer had (a stream's token chunks; a response's usage)."""
        started = time.perf_counter()
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            on_end()
            return server_error("the engine returned nothing")
        except Exception as exc:  # the replica died or failed (whatever error Serve wraps that in)
            logger.warning("request %s: %s failed before its first token: %r", request_id, role, exc)
            on_unread()
            on_end()
            return service_unavailable(f"the {role} replica failed; retry later")
        except BaseException:  # the client went away while decode loaded the KV: its blocks must not wait
            stream.cancel()
            on_unread()
            on_end()
            raise
        timing.first_chunk_s = time.perf_counter() - started
        on_first()
        if not isinstance(first, str):  # one response object or an ErrorResponse
            stream.cancel()
            on_end()
            usage = getattr(first, "usage", None)
            if usage is not None and usage.completion_tokens:
                on_output(usage.completion_tokens)
            return first
        tally = StreamTally()

        def on_stream_end() -> None:
            # Client gone (or done): cancelling the handle's generator makes the engine's vLLM request abort.
            stream.cancel()
            on_end()
            self.admission.finished()
            if tally.is_complete:
                on_output(tally.num_token_chunks)

        return guarded(tally.counted(passed_through(first, stream, request_id), on_done=on_end), on_stream_end)


class PDHandoff(Handoff):
    def __init__(self, admission: Admission, *, prefill: DeploymentHandle, decode: DeploymentHandle,
                 scheduler: Scheduler, on_prefill_fallback: Callable[[], None] = lambda: None,
                 on_decision: Callable[[Decision, float | None], None] = lambda decision, ttft_s: None):
        super().__init__(admission)
        self._prefill = prefill
        self._decode = decode
        self._scheduler = scheduler
        self._on_prefill_fallback = on_prefill_fallback
        self._on_decision = on_decision  # the metrics: the decision and its measured TTFT (seconds)

    def _refusal(self, request: OpenAIRequest) -> ErrorResponse | None:
        return check_disaggregable(request)

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming, path: Path | None = None) -> Outcome:
        try:
            decision, num_prompt_tokens = self._scheduler.decide(request, path)
        except BaseException:
            self.admission.prefill_done()
            raise
        timing.path, timing.predicted_ttft_s = decision.path.value, decision.predicted_ttft_s
        if decision.path is Path.SPLIT:
            return await self._split(request, timing, decision, num_prompt_tokens)
        self.admission.prefill_done()  # no prefill stage: the whole request is one engine's
        is_decode_local = decision.path is Path.DECODE_LOCAL
        engine_id = decision.decode_engine if is_decode_local else decision.prefill_engine
        is_idle = self._scheduler.is_idle(engine_id)
        flight = self._scheduler.dispatch(engine_id, num_prompt_tokens)
        if is_decode_local:
            stream = self._decode.options(stream=True).decode.remote(request, None, dispatch=flight.dispatch)
        else:
            stream = self._prefill.options(stream=True).generate.remote(request, dispatch=flight.dispatch)

        def on_first() -> None:
            seconds = flight.prompt_done()
            if is_idle and request.stream:  # nothing ahead of it: the engine's prefill rate (plus one step)
                self._scheduler.observed_prefill(engine_id, num_prompt_tokens, seconds)
            self._decided(decision, seconds if request.stream else None, request.request_id)

        return await self._first_chunk(stream, request.request_id, timing, on_first=on_first,
                                       on_end=flight.request_done, on_output=self._scheduler.observed_output,
                                       role="decode" if is_decode_local else "prefill")

    async def _split(self, request: OpenAIRequest, timing: PhaseTiming, decision: Decision,
                     num_prompt_tokens: int) -> Outcome:
        started = time.perf_counter()
        is_prefill_idle = self._scheduler.is_idle(decision.prefill_engine)
        prefill_flight = self._scheduler.dispatch(decision.prefill_engine, num_prompt_tokens)
        try:
            handle = await self._prefilled(request, prefill_flight)
        finally:
            self.admission.prefill_done()
            prefill_flight.request_done()
        if isinstance(handle, ErrorResponse):
            return handle
        if handle is not None:
            timing.prefill_s, timing.prefill_engine_id = time.perf_counter() - started, handle.prefill_engine_id
            if is_prefill_idle:
                self._scheduler.observed_prefill(decision.prefill_engine, handle.num_prompt_tokens, timing.prefill_s)
        # Without a handle (prefill failed) decode computes the prompt: its load says so.
        decode_engine = self._scheduler.book.engine(decision.decode_engine) if decision.decode_engine else None
        num_ahead = decode_engine.num_requests if decode_engine is not None else 0
        decode_flight = self._scheduler.dispatch(decision.decode_engine, 0 if handle is not None else num_prompt_tokens)
        stream = self._decode.options(stream=True).decode.remote(request, handle, dispatch=decode_flight.dispatch)

        def on_first() -> None:
            seconds = decode_flight.prompt_done()
            if handle is not None and request.stream:
                self._scheduler.observed_handover(decision.decode_engine, handle.num_prompt_tokens, seconds,
                                                  num_ahead)
            self._decided(decision, time.perf_counter() - started if request.stream else None, request.request_id)

        return await self._first_chunk(stream, request.request_id, timing, on_unread=lambda: self._release(handle),
                                       on_first=on_first, on_end=decode_flight.request_done,
                                       on_output=self._scheduler.observed_output)

    def _decided(self, decision: Decision, ttft_s: float | None, request_id: str) -> None:
        """`ttft_s`: the decision to the first token, for a stream; None for a response sent whole (its first chunk
        is the whole answer, so it times no first token and teaches the rates nothing)."""
        if ttft_s is not None:
            self._scheduler.observed_ttft(decision, ttft_s, request_id)
        self._on_decision(decision, ttft_s)

    async def _prefilled(self, request: OpenAIRequest, flight: Flight) -> KVHandle | ErrorResponse | None:
        """Prefill's KV handle, its client error, or None: prefill failed, and decode computes the prompt itself."""
        try:
            result = await self._prefill.prefill.remote(request, dispatch=flight.dispatch)
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
        """KV kept for a request that will not be decoded: free it now rather than when its lease runs out, on the
        prefill replica that holds it (Serve's request router sends the release there)."""
        if handle is not None:
            # Fire and forget: the lease frees it anyway if this fails.
            self._prefill.release.remote(handle, dispatch=self._scheduler.addressed_to(handle.prefill_engine_id))


class CollocatedHandoff(Handoff):
    def __init__(self, admission: Admission, *, collocated: DeploymentHandle):
        super().__init__(admission)
        self._collocated = collocated

    async def _admitted(self, request: OpenAIRequest, timing: PhaseTiming, path: Path | None = None) -> Outcome:
        stream = self._collocated.options(stream=True).generate.remote(request)
        return await self._first_chunk(stream, request.request_id, timing)
