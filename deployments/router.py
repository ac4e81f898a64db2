"""Router: the OpenAI-compatible ingress, and the only HTTP entry of the app.

1. FastAPI parses the body into vLLM's own request types; a malformed body becomes a 400 through vLLM's
   exception handlers. `check_disaggregable` refuses what a split request cannot honour.
2. Prefill runs the prompt and returns a `KVHandle`, or an `ErrorResponse` (unknown model 404, prompt too long
   400, ...), which goes back to the client as it is: decode is never asked.
3. Decode continues from that KV. Its stream of vLLM SSE strings is passed through without re-wrapping, so tokens
   take no extra hop beyond the router; a non-streamed request gets decode's one response.
4. If the client disconnects, the decode stream is cancelled, and vLLM aborts the request and frees its blocks.
5. Every response carries its request id (the client's `X-Request-Id`, else Serve's own: Serve stamps it on every
   log line of the router, prefill and decode) and a `Server-Timing` header: how long the router took to answer
   (to its first chunk, streaming), how long prefill took and on which engine, and how long decode took to its
   first token (the KV hand-over plus one decode step).
6. Requests, status codes, TTFT, time per output token, E2E and requests in flight go to Ray's metrics.

Before step 1, the HTTP edge (http_edge.py) checks the API key, content type and body size, and admission
(admission.py) refuses a request with 503 and Retry-After when a role is at its overload bound.
Failures, each bounded and never a hang: a prefill replica that dies or fails (5xx) is replaced by decode computing
the prompt itself (the request completes, and the fallback is counted); a decode replica that dies before its first
chunk gives 503 with Retry-After, and one that dies mid-stream ends the stream with an error event and [DONE]. KV
that prefill kept for a request that will never be decoded (client gone, decode failed) is released at once.

In `collocated` mode (the baseline) steps 2-3 are one call to a plain engine that runs both phases.

The same life cycle is offered to Python callers through the deployment handle: `chat`, `completion` (one
response object) and `chat_stream`, `completion_stream` (typed chunk objects), each taking vLLM's request types.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import types
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.exceptions import ActorUnavailableError, RayActorError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.openai.chat_completion.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatCompletionStreamResponse,
)
from vllm.entrypoints.openai.completion.protocol import (
    CompletionRequest,
    CompletionResponse,
    CompletionStreamResponse,
)
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelList
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

from deployments.admission import Admission
from deployments.guarded_stream import guarded
from deployments.http_edge import EdgePolicy, HttpEdge, error_body, framework_error
from deployments.metrics import RouterMetrics
from deployments.pd_protocol import check_disaggregable
from kv_transfer.handle import KVHandle
from serve_app.config import AppConfig
from serve_app.grafana import install_dashboard

logger = logging.getLogger("ray.serve")

app = FastAPI(title="splitserve", description="OpenAI-compatible, prefill/decode-disaggregated LLM serving")
# vLLM's own handlers: validation errors are 400 with OpenAI-style error JSON, like `vllm serve`.
init_exception_handler(app)
app.exception_handler(StarletteHTTPException)(framework_error)  # 404/405 from routing, as OpenAI errors
app.add_middleware(HttpEdge)
# Those handlers read what `vllm serve` keeps on its app state; the router runs no engine of its own.
app.state.args = argparse.Namespace(log_error_stack=False)
app.state.server = types.SimpleNamespace()
app.state.engine_client = None

_STREAM_CHUNK_TYPES = {ChatCompletionRequest: ChatCompletionStreamResponse, CompletionRequest: CompletionStreamResponse}
# A replica that died, is restarting or refuses work: the request goes elsewhere or fails cleanly, never hangs.
_REPLICA_FAILURES = (RayActorError, ActorUnavailableError, BackPressureError)


def _service_unavailable(message: str) -> ErrorResponse:
    return create_error_response(message, "ServiceUnavailableError", HTTPStatus.SERVICE_UNAVAILABLE)


@dataclass
class PhaseTiming:
    """Where a request's time to first token went, as the router saw it; sent as a `Server-Timing` header."""

    prefill_s: float | None = None
    prefill_engine_id: str = ""
    # Disaggregated: prefill's answer -> decode's first chunk (KV hand-over + one decode step).
    # Collocated: the whole time to the first chunk (queue, prompt and one decode step).
    first_chunk_s: float | None = None
    # From the request reaching the router to its answer (or, streaming, its first chunk) leaving it: what the
    # client waited beyond that was spent in the network, Serve's proxy or the client itself.
    router_s: float | None = None

    def header(self) -> str:
        metrics = []
        if self.router_s is not None:
            metrics.append(f"router;dur={self.router_s * 1e3:.1f}")
        if self.prefill_s is not None:
            metrics.append(f'prefill;dur={self.prefill_s * 1e3:.1f};desc="{self.prefill_engine_id}"')
        if self.first_chunk_s is not None:
            metrics.append(f"first_chunk;dur={self.first_chunk_s * 1e3:.1f}")
        return ", ".join(metrics)


def _ends_stream(chunk: str) -> bool:
    """The SSE chunk that closes a stream: `data: [DONE]`."""
    return chunk.rstrip().endswith("data: [DONE]")


@dataclass
class _StreamTally:
    num_token_chunks: int = 0
    is_complete: bool = False  # `data: [DONE]` went out: the client got the whole stream

    async def counted(self, stream: AsyncGenerator[str, None]) -> AsyncGenerator[str, None]:
        async for chunk in stream:
            if '"choices":[{' in chunk:
                self.num_token_chunks += 1
            yield chunk
            # Complete once [DONE] was sent (Starlette asks for the next chunk only after sending this one), not
            # once the stream ends: a client such as `openai` closes the connection on [DONE], which may cancel
            # the stream before its end, and was counted as a 499 (seen on the dashboard under steady traffic).
            if _ends_stream(chunk):
                self.is_complete = True


def _error_json(error: ErrorResponse, headers: dict[str, str], retry_after_s: int) -> JSONResponse:
    if error.error.code == 503:  # overloaded or a replica restarting: tell the client when to come back
        headers = {**headers, "Retry-After": str(retry_after_s)}
    return JSONResponse(error.model_dump(), status_code=error.error.code, headers=headers)


@serve.deployment(max_ongoing_requests=64)
@serve.ingress(app)
class Router:
    async def __init__(self, config: AppConfig, *, prefill: DeploymentHandle | None = None,
                 decode: DeploymentHandle | None = None, collocated: DeploymentHandle | None = None):
        self._config = config
        self._prefill = prefill
        self._decode = decode
        self._collocated = collocated
        self._metrics = RouterMetrics(config.model.served_name)
        self._admission = Admission.from_config(config)
        api_key = os.environ.get(config.router.api_key_env) or None
        app.state.edge_policy = EdgePolicy(max_body_bytes=config.router.max_request_body_bytes, api_key=api_key)
        logger.info("HTTP edge: API key %s, bodies up to %d bytes, admission %s",
                    f"required (from ${config.router.api_key_env})" if api_key else "not required",
                    config.router.max_request_body_bytes, self._admission)
        self._gauge_refresher = asyncio.get_running_loop().create_task(self._metrics.refresh_gauges())
        install_dashboard()
        self._engines = {name: handle for name, handle in
                         (("prefill", prefill), ("decode", decode), ("collocated", collocated)) if handle is not None}

    # --- the life cycle, shared by HTTP and handle callers ---------------------------------------------------

    async def _run(self, request: ChatCompletionRequest | CompletionRequest,
                   timing: PhaseTiming | None = None) -> ErrorResponse | Any:
        """Returns an ErrorResponse, one response object, or an async generator of vLLM SSE strings."""
        if self._collocated is None and (refusal := check_disaggregable(request)) is not None:
            return refusal
        full_role = self._admission.try_admit()
        if full_role is not None:
            logger.info("request %s refused: %s is at its overload bound", request.request_id, full_role)
            return _service_unavailable(f"the {full_role} role is at capacity; retry later")
        try:
            result = await self._admitted(request, timing or PhaseTiming())
        except BaseException:
            self._admission.finished()
            raise
        if not isinstance(result, AsyncGenerator):
            self._admission.finished()
        return result  # a stream leaves admission when it is over (_passed_through)

    async def _admitted(self, request: Any, timing: PhaseTiming) -> ErrorResponse | Any:
        started = time.perf_counter()
        handle: KVHandle | None = None
        if self._collocated is not None:
            stream = self._collocated.options(stream=True).generate.remote(request)
        else:
            try:
                handle = await self._prefilled(request)
            finally:
                self._admission.prefill_done()
            if isinstance(handle, ErrorResponse):
                return handle
            if handle is not None:
                timing.prefill_s, timing.prefill_engine_id = time.perf_counter() - started, handle.prefill_engine_id
            started = time.perf_counter()
            stream = self._decode.options(stream=True).decode.remote(request, handle)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return create_error_response("the engine returned nothing", "InternalServerError",
                                         HTTPStatus.INTERNAL_SERVER_ERROR)
        except Exception as exc:  # the replica died or failed (whatever error Serve wraps that in)
            logger.warning("request %s: decode failed before its first token: %r", request.request_id, exc)
            self._release(handle)
            return _service_unavailable("the decode replica failed; retry later")
        except BaseException:  # the client went away while decode loaded the KV: its blocks must not wait
            stream.cancel()
            self._release(handle)
            raise
        timing.first_chunk_s = time.perf_counter() - started
        if not isinstance(first, str):  # one response object or an ErrorResponse
            stream.cancel()
            return first
        return self._passed_through(first, stream, request.request_id)

    async def _prefilled(self, request: Any) -> KVHandle | ErrorResponse | None:
        """Prefill's KV handle, its client error, or None: prefill failed, and decode computes the prompt itself."""
        try:
            result = await self._prefill.prefill.remote(request)
        except _REPLICA_FAILURES as exc:
            reason = repr(exc)
        else:
            if isinstance(result, KVHandle) or result.error.code < 500:
                return result
            reason = result.error.message
        logger.warning("request %s: prefill failed (%s); decode computes the prompt", request.request_id, reason)
        self._metrics.prefill_fallback()
        return None

    def _release(self, handle: KVHandle | None) -> None:
        """KV kept for a request that will not be decoded: free it now rather than when its lease runs out."""
        if handle is not None:
            self._prefill.release.remote(handle)  # fire and forget: the lease frees it anyway if this fails

    def _passed_through(self, first: str, stream: Any, request_id: str) -> AsyncGenerator[str, None]:
        def on_end() -> None:
            # Client gone (or done): cancelling the handle's generator makes decode's vLLM request abort.
            stream.cancel()
            self._admission.finished()

        return guarded(self._pass_through(first, stream, request_id), on_end)

    @staticmethod
    async def _pass_through(first: str, stream: Any, request_id: str) -> AsyncGenerator[str, None]:
        last = first
        yield first
        try:
            async for chunk in stream:
                last = chunk
                yield chunk
            failure = None if _ends_stream(last) else "ended without [DONE]"
        except Exception as exc:  # a replica died or failed: Serve's errors for that vary with when it happened
            failure = repr(exc)
        if failure is not None:
            # Tokens already went out; the stream ends with an error event, as vLLM ends a failed stream.
            logger.warning("request %s: decode failed mid-stream: %s", request_id, failure)
            yield f"data: {json.dumps(error_body(503, 'the decode replica failed mid-stream'))}\n\n"
            yield "data: [DONE]\n\n"

    @staticmethod
    def _with_request_id(request: Any) -> Any:
        # Serve's request id is the client's X-Request-Id when it sent one; Serve puts it on every log line of the
        # router, prefill and decode for this request and returns it in the response. vLLM's id becomes the same.
        request_id = serve.context._get_serve_request_context().request_id or request.request_id
        return request.model_copy(update={"request_id": request_id})

    # --- HTTP ---------------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def http_chat_completions(self, request: ChatCompletionRequest, raw_request: Request) -> Any:
        return await self._http(request, raw_request)

    @app.post("/v1/completions")
    async def http_completions(self, request: CompletionRequest, raw_request: Request) -> Any:
        return await self._http(request, raw_request)

    async def _http(self, request: Any, raw_request: Request) -> Any:
        request = self._with_request_id(request)
        route = raw_request.url.path
        logger.info("request %s: %s %s", request.request_id, raw_request.method, route)
        started = time.perf_counter()
        self._metrics.started()
        timing = PhaseTiming()
        try:
            result = await self._run(request, timing)
        except BaseException:
            self._metrics.finished(route=route, status_code=500, e2e_s=time.perf_counter() - started)
            raise
        # Serve's proxy returns the request id in X-Request-Id itself (the same id: see _with_request_id).
        # The router's answer time: an error's or a plain response's E2E, a stream's TTFT.
        timing.router_s = time.perf_counter() - started
        headers = {"Server-Timing": timing.header()}
        if isinstance(result, ErrorResponse):
            self._metrics.finished(route=route, status_code=result.error.code, e2e_s=timing.router_s)
            return _error_json(result, headers, self._config.router.retry_after_s)
        if isinstance(result, AsyncGenerator):
            measured = self._measured(result, route, started, ttft_s=timing.router_s)
            return StreamingResponse(measured, media_type="text/event-stream", headers=headers)
        self._metrics.finished(route=route, status_code=200, e2e_s=timing.router_s)
        return JSONResponse(result.model_dump(exclude_none=True), headers=headers)

    def _measured(self, stream: AsyncGenerator[str, None], route: str, started: float,
                  ttft_s: float) -> AsyncGenerator[str, None]:
        """Passes the SSE stream through, counting the chunks that carry tokens; 499 if the client went away."""
        tally = _StreamTally()

        def on_end() -> None:
            self._metrics.finished(route=route, status_code=200 if tally.is_complete else 499,
                                   e2e_s=time.perf_counter() - started, ttft_s=ttft_s,
                                   num_output_chunks=tally.num_token_chunks)

        return guarded(tally.counted(stream), on_end)

    @app.get("/v1/models")
    async def http_models(self) -> JSONResponse:
        return JSONResponse(self.models().model_dump())

    @app.get("/health")
    async def http_health(self) -> JSONResponse:
        report = await self.health()
        return JSONResponse(report, status_code=200 if report["status"] == "ok" else 503)

    # --- Python handle API --------------------------------------------------------------------------------------

    def models(self) -> ModelList:
        model = self._config.model
        card = ModelCard(id=model.served_name, root=model.path, max_model_len=model.max_model_len,
                         owned_by="splitserve")
        return ModelList(data=[card])

    async def health(self) -> dict[str, Any]:
        roles: dict[str, Any] = {}
        for name, deployment in self._engines.items():
            try:
                role = await asyncio.wait_for(deployment.role.remote(), timeout=10)
                roles[name] = {"ready": role.get("is_engine_alive", True), **role}
            except Exception as exc:  # a role that cannot answer is reported, not raised
                roles[name] = {"ready": False, "error": repr(exc)}
        is_ready = all(role["ready"] for role in roles.values())
        report = {"status": "ok" if is_ready else "unavailable", "mode": self._config.mode, "roles": roles,
                  "admission": self._admission.counts()}
        if self._config.is_disaggregated:
            report["transfer_backend"] = self._config.transfer.backend
        return report

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | ErrorResponse:
        return await self._run(self._with_request_id(request.model_copy(update={"stream": False})))

    async def completion(self, request: CompletionRequest) -> CompletionResponse | ErrorResponse:
        return await self._run(self._with_request_id(request.model_copy(update={"stream": False})))

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncGenerator[Any, None]:
        async for item in self._typed_stream(request):
            yield item

    async def completion_stream(self, request: CompletionRequest) -> AsyncGenerator[Any, None]:
        async for item in self._typed_stream(request):
            yield item

    async def _typed_stream(self, request: Any) -> AsyncGenerator[Any, None]:
        """The SSE stream an HTTP client would get, as typed chunk objects (or one ErrorResponse)."""
        chunk_type = _STREAM_CHUNK_TYPES[type(request)]
        result = await self._run(self._with_request_id(request.model_copy(update={"stream": True})))
        if not isinstance(result, AsyncGenerator):
            yield result
            return
        async for event in result:
            for line in event.splitlines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                payload = json.loads(line[len("data: "):])
                yield ErrorResponse(**payload) if "error" in payload else chunk_type(**payload)
