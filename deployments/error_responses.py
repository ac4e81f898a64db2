"""OpenAI-style errors: values inside the app, JSON at the edge.

Inside, a failure travels as vLLM's `ErrorResponse` value (an engine's answer, a refused request), never as an
exception that could take a replica down; the router turns it into HTTP once. `error_body` is the same shape as
plain JSON, for what the edge writes itself (middleware refusals, an SSE error event).
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from vllm.entrypoints.serve.engine.protocol import ErrorResponse
from vllm.entrypoints.serve.exception_handling.error_response import create_error_response


def bad_request(message: str, param: str | None = None) -> ErrorResponse:
    return create_error_response(message, param=param)


def service_unavailable(message: str) -> ErrorResponse:
    """503: overloaded, or a replica being replaced; the router adds Retry-After."""
    return create_error_response(message, "ServiceUnavailableError", HTTPStatus.SERVICE_UNAVAILABLE)


def server_error(message: str) -> ErrorResponse:
    return create_error_response(message, "InternalServerError", HTTPStatus.INTERNAL_SERVER_ERROR)


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": HTTPStatus(status).phrase, "param": param, "code": status}}
