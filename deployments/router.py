"""Router: the OpenAI-compatible ingress, and the only HTTP entry of the app.

1. FastAPI parses the body into vLLM's own request types; a malformed body becomes a 400 through vLLM's
   exception handlers. `check_disaggregable` refuses what a split request cannot honour.
2. Prefill runs the prompt and returns a `KVHandle`, or an `ErrorResponse` (unknown model 404, prompt too long
   400, ...), which goes back to the client as it is: decode is never asked.
3. Decode continues from that KV. Its stream of vLLM SSE strings is passed through without re-wrapping, so tokens
   take no extra hop beyond the router; a non-streamed request gets decode's one response.
4. If the client disconnects, the decode stream is cancelled, and vLLM aborts the request and frees its blocks.
5. Every response carries its request id (the client's `X-Request-Id`, else Serve's own: Serve stamps it on every
   log line of the router, prefill and decode) and a `Server-Timing` header: how long prefill took and on which
   engine, and how long decode took to its first token (the KV hand-over plus one decode step).
6. Requests, status codes, TTFT, time per output token, E2E and requests in flight go to Ray's metrics.

In `collocated` mode (the baseline) steps 2-3 are one call to a plain engine that runs both phases.

The same life cycle is offered to Python callers through the deployment handle: `chat`, `completion` (one
response object) and `chat_stream`, `completion_stream` (typed chunk objects), each taking vLLM's request types.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time
import types
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
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

from deployments.metrics import RouterMetrics
from deployments.pd_protocol import check_disaggregable
from kv_transfer.handle import KVHandle
from serve_app.config import AppConfig
from serve_app.grafana import install_dashboard

logger = logging.getLogger("ray.serve")

app = FastAPI(title="splitserve", description="OpenAI-compatible, prefill/decode-disaggregated LLM serving")
# vLLM's own handlers: validation errors are 400 with OpenAI-style error JSON, like `vllm serve`.
init_exception_handler(app)
# Those handlers read what `vllm serve` keeps on its app state; the router runs no engine of its own.
app.state.args = argparse.Namespace(log_error_stack=False)
app.state.server = types.SimpleNamespace()
app.state.engine_client = None

_STREAM_CHUNK_TYPES = {ChatCompletionRequest: ChatCompletionStreamResponse, CompletionRequest: CompletionStreamResponse}


@dataclass
class PhaseTiming:
    """Where a request's time to first token went, as the router saw it; sent as a `Server-Timing` header."""

    prefill_s: float | None = None
    prefill_engine_id: str = ""
    # Disaggregated: prefill's answer -> decode's first chunk (KV hand-over + one decode step).
    # Collocated: the whole time to the first chunk (queue, prompt and one decode step).
    first_chunk_s: float | None = None

    def header(self) -> str:
        metrics = []
        if self.prefill_s is not None:
            metrics.append(f'prefill;dur={self.prefill_s * 1e3:.1f};desc="{self.prefill_engine_id}"')
        if self.first_chunk_s is not None:
            metrics.append(f"first_chunk;dur={self.first_chunk_s * 1e3:.1f}")
        return ", ".join(metrics)


def _error_json(error: ErrorResponse, headers: dict[str, str]) -> JSONResponse:
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
        self._gauge_refresher = asyncio.get_running_loop().create_task(self._metrics.refresh_gauges())
        install_dashboard()
        self._engines = {name: handle for name, handle in
                         (("prefill", prefill), ("decode", decode), ("collocated", collocated)) if handle is not None}

    # --- the life cycle, shared by HTTP and handle callers ---------------------------------------------------

    async def _run(self, request: ChatCompletionRequest | CompletionRequest,
                   timing: PhaseTiming | None = None) -> ErrorResponse | Any:
        """Returns an ErrorResponse, one response object, or an async generator of vLLM SSE strings."""
        timing = timing or PhaseTiming()
        started = time.perf_counter()
        if self._collocated is not None:
            stream = self._collocated.options(stream=True).generate.remote(request)
        else:
            if (refusal := check_disaggregable(request)) is not None:
                return refusal
            handle: KVHandle | ErrorResponse = await self._prefill.prefill.remote(request)
            if isinstance(handle, ErrorResponse):
                return handle
            timing.prefill_s, timing.prefill_engine_id = time.perf_counter() - started, handle.prefill_engine_id
            started = time.perf_counter()
            stream = self._decode.options(stream=True).decode.remote(request, handle)
        try:
            first = await stream.__anext__()
        except StopAsyncIteration:
            return create_error_response("the engine returned nothing", "InternalServerError", 500)
        timing.first_chunk_s = time.perf_counter() - started
        if not isinstance(first, str):  # one response object or an ErrorResponse
            stream.cancel()
            return first
        return self._pass_through(first, stream)

    @staticmethod
    async def _pass_through(first: str, stream: Any) -> AsyncGenerator[str, None]:
        try:
            yield first
            async for chunk in stream:
                yield chunk
        finally:
            # Client gone (or done): cancelling the handle's generator makes decode's vLLM request abort.
            stream.cancel()

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
        headers = {"Server-Timing": timing.header()}
        if isinstance(result, ErrorResponse):
            self._metrics.finished(route=route, status_code=result.error.code, e2e_s=time.perf_counter() - started)
            return _error_json(result, headers)
        if isinstance(result, AsyncGenerator):
            measured = self._measured(result, route, started, ttft_s=time.perf_counter() - started)
            return StreamingResponse(measured, media_type="text/event-stream", headers=headers)
        self._metrics.finished(route=route, status_code=200, e2e_s=time.perf_counter() - started)
        return JSONResponse(result.model_dump(exclude_none=True), headers=headers)

    async def _measured(self, stream: AsyncGenerator[str, None], route: str, started: float,
                        ttft_s: float) -> AsyncGenerator[str, None]:
        """Passes the SSE stream through, counting the chunks that carry tokens; 499 if the client went away."""
        num_token_chunks, status_code = 0, 499
        try:
            async for chunk in stream:
                if '"choices":[{' in chunk:
                    num_token_chunks += 1
                yield chunk
            status_code = 200
        finally:
            self._metrics.finished(route=route, status_code=status_code, e2e_s=time.perf_counter() - started,
                                   ttft_s=ttft_s, num_output_chunks=num_token_chunks)

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
                roles[name] = {"ready": True, **await asyncio.wait_for(deployment.role.remote(), timeout=10)}
            except Exception as exc:  # a role that cannot answer is reported, not raised
                roles[name] = {"ready": False, "error": repr(exc)}
        is_ready = all(role["ready"] for role in roles.values())
        report = {"status": "ok" if is_ready else "unavailable", "mode": self._config.mode, "roles": roles}
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
