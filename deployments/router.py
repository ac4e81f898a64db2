"""Router: the OpenAI-compatible ingress, and the only HTTP entry of the app. It is the edge; the request's way
through the engines is the hand-off's (handoff.py).

1. The HTTP edge (http_edge.py) checks the API key, content type and body size; FastAPI parses the body into vLLM's
   own request types, and a malformed body becomes a 400 through vLLM's exception handlers.
2. The request gets its id: the client's `X-Request-Id`, else Serve's own. Serve stamps it on every log line of the
   router, prefill and decode, and returns it in the response.
3. The hand-off serves it (check, admission, the scheduler's path: prefill → KV → decode, decode-local or
   prefill-local; or one collocated engine) and returns an `ErrorResponse`, one response, or the engine's stream
   of vLLM SSE strings, which goes out without re-wrapping. Where the operator allows it
   (`scheduling.allow_path_override`), an `X-Splitserve-Path` header forces the path (tests, debugging).
4. Errors become OpenAI-style JSON with their status (503s with `Retry-After`); every response carries a
   `Server-Timing` header (phase_timing.py).
5. Requests, status codes, TTFT, time per output token, E2E and requests in flight go to Ray's metrics
   (router_metrics.py), with the scheduler's decisions and each engine's estimated load; a stream counts as
   complete once `[DONE]` went out (sse.py). `/health` reports the scheduler's state too.

The same life cycle is offered to Python callers through the deployment handle: `chat`, `completion` (one
response object) and `chat_stream`, `completion_stream` (typed chunk objects), each taking vLLM's request types.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import types
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse, ModelCard, ModelList
from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

from deployments.admission import Admission
from deployments.error_responses import bad_request
from deployments.handoff import CollocatedHandoff, Handoff, Outcome, PDHandoff
from deployments.http_edge import EdgePolicy, HttpEdge, framework_error
from deployments.messages import STREAM_CHUNK_TYPES, OpenAIRequest
from deployments.phase_timing import PhaseTiming
from deployments.prompt_size import PromptSizer
from deployments.replica_choice import latest_routing_stats
from deployments.router_metrics import RouterMetrics
from deployments.scheduler import Scheduler
from deployments.scheduling.policies import Decision, Path
from deployments.sse import StreamTally, guarded, typed_chunks
from serve_app.config import AppConfig
from serve_app.grafana import install_dashboard

logger = logging.getLogger("ray.serve")

PATH_OVERRIDE_HEADER = "x-splitserve-path"

app = FastAPI(title="splitserve", description="OpenAI-compatible, prefill/decode-disaggregated LLM serving")
# vLLM's own handlers: validation errors are 400 with OpenAI-style error JSON, like `vllm serve`.
init_exception_handler(app)
app.exception_handler(StarletteHTTPException)(framework_error)  # 404/405 from routing, as OpenAI errors
app.add_middleware(HttpEdge)
# Those handlers read what `vllm serve` keeps on its app state; the router runs no engine of its own.
app.state.args = argparse.Namespace(log_error_stack=False)
app.state.server = types.SimpleNamespace()
app.state.engine_client = None


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
        self._metrics = RouterMetrics(config.model.served_name)
        admission = Admission.from_config(config)
        self._scheduler: Scheduler | None = None
        if collocated is not None:
            self._handoff: Handoff = CollocatedHandoff(admission, collocated=collocated)
        else:
            self._scheduler = Scheduler(
                config.scheduling, router_id=serve.get_replica_context().replica_id.unique_id,
                prefill_deployment=prefill.deployment_name, decode_deployment=decode.deployment_name,
                prompt_size=PromptSizer(config.model.path).num_tokens, routing_stats=latest_routing_stats,
                decode_chunk_tokens=config.decode.num_prefill_chunk_tokens,
                prefill_chunk_tokens=config.prefill.num_prefill_chunk_tokens)
            self._handoff = PDHandoff(admission, prefill=prefill, decode=decode, scheduler=self._scheduler,
                                      on_prefill_fallback=self._metrics.prefill_fallback,
                                      on_decision=self._decided)
        api_key = os.environ.get(config.router.api_key_env) or None
        app.state.edge_policy = EdgePolicy(max_body_bytes=config.router.max_request_body_bytes, api_key=api_key)
        logger.info("HTTP edge: API key %s, bodies up to %d bytes, admission %s",
                    f"required (from ${config.router.api_key_env})" if api_key else "not required",
                    config.router.max_request_body_bytes, admission)
        engine_loads = (lambda: self._scheduler.summary()["engines"]) if self._scheduler is not None else dict
        self._gauge_refresher = asyncio.get_running_loop().create_task(self._metrics.refresh_gauges(engine_loads))
        install_dashboard()
        self._engines = {name: handle for name, handle in
                         (("prefill", prefill), ("decode", decode), ("collocated", collocated)) if handle is not None}
        if self._scheduler is not None:
            # A handle's request router (and with it the engines' load reports) starts with its first call: make
            # one now, so that the first request is already scheduled on reported loads.
            self._warm_up = asyncio.get_running_loop().create_task(self._first_calls())

    async def _first_calls(self) -> None:
        for name, deployment in self._engines.items():
            try:
                await deployment.role.remote()
            except Exception as exc:  # the engines may still be starting; a request will start the router then
                logger.info("first call to %s failed: %r", name, exc)

    def _decided(self, decision: Decision, ttft_s: float | None) -> None:
        self._metrics.decided(self._scheduler.policy.name, decision.path.value, ttft_s, decision.predicted_ttft_s)

    def _forced_path(self, raw_request: Request) -> Path | ErrorResponse | None:
        value = raw_request.headers.get(PATH_OVERRIDE_HEADER)
        if value is None:
            return None
        if not (self._config.is_disaggregated and self._config.scheduling.allow_path_override):
            return bad_request(f"the {PATH_OVERRIDE_HEADER} header is not allowed here "
                               "(scheduling.allow_path_override is off)", PATH_OVERRIDE_HEADER)
        try:
            return Path(value)
        except ValueError:
            return bad_request(f"{PATH_OVERRIDE_HEADER} must be one of {', '.join(p.value for p in Path)}, "
                               f"got {value!r}", PATH_OVERRIDE_HEADER)

    @staticmethod
    def _with_request_id(request: OpenAIRequest, **update: Any) -> OpenAIRequest:
        # Serve's request id is the client's X-Request-Id when it sent one; Serve puts it on every log line of the
        # router, prefill and decode for this request and returns it in the response. vLLM's id becomes the same.
        request_id = serve.context._get_serve_request_context().request_id or request.request_id
        return request.model_copy(update={"request_id": request_id, **update})

    # --- HTTP ---------------------------------------------------------------------------------------------------

    @app.post("/v1/chat/completions")
    async def http_chat_completions(self, request: ChatCompletionRequest, raw_request: Request) -> Response:
        return await self._http(request, raw_request)

    @app.post("/v1/completions")
    async def http_completions(self, request: CompletionRequest, raw_request: Request) -> Response:
        return await self._http(request, raw_request)

    async def _http(self, request: OpenAIRequest, raw_request: Request) -> Response:
        request = self._with_request_id(request)
        route = raw_request.url.path
        logger.info("request %s: %s %s", request.request_id, raw_request.method, route)
        started = time.perf_counter()
        self._metrics.started()
        timing = PhaseTiming()
        path = self._forced_path(raw_request)
        try:
            result = path if isinstance(path, ErrorResponse) else await self._handoff.serve(request, timing, path)
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
        tally = StreamTally()

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
                status = await asyncio.wait_for(deployment.role.remote(), timeout=10)
                roles[name] = {"ready": status.is_engine_alive, **status.model_dump(exclude_none=True)}
            except Exception as exc:  # a role that cannot answer is reported, not raised
                roles[name] = {"ready": False, "error": repr(exc)}
        is_ready = all(role["ready"] for role in roles.values())
        report = {"status": "ok" if is_ready else "unavailable", "mode": self._config.mode, "roles": roles,
                  "admission": self._handoff.admission.counts()}
        if self._config.is_disaggregated:
            report["transfer_backend"] = self._config.transfer.backend
        if self._scheduler is not None:
            self._scheduler.refresh()
            report["scheduling"] = self._scheduler.summary()
        return report

    async def chat(self, request: ChatCompletionRequest) -> ChatCompletionResponse | ErrorResponse:
        return await self._served(self._with_request_id(request, stream=False))

    async def completion(self, request: CompletionRequest) -> CompletionResponse | ErrorResponse:
        return await self._served(self._with_request_id(request, stream=False))

    async def chat_stream(self, request: ChatCompletionRequest) -> AsyncGenerator[Any, None]:
        async for item in self._typed_stream(request):
            yield item

    async def completion_stream(self, request: CompletionRequest) -> AsyncGenerator[Any, None]:
        async for item in self._typed_stream(request):
            yield item

    async def _served(self, request: OpenAIRequest) -> Outcome:
        return await self._handoff.serve(request, PhaseTiming())

    async def _typed_stream(self, request: OpenAIRequest) -> AsyncGenerator[Any, None]:
        """The SSE stream an HTTP client would get, as typed chunk objects (or one ErrorResponse)."""
        result = await self._served(self._with_request_id(request, stream=True))
        if not isinstance(result, AsyncGenerator):
            yield result
            return
        async for chunk in typed_chunks(result, STREAM_CHUNK_TYPES[type(request)]):
            yield chunk
