"""The router's HTTP edge: what is checked before a body is parsed or an engine is asked.

For every `/v1/...` request, in order:
1. API key: when the router's process has the key (`router.api_key_env`, default SPLITSERVE_API_KEY), the request
   must carry `Authorization: Bearer <key>`; otherwise 401. `/health` stays open for probes.
2. Content type: a POST must say `application/json`; otherwise 415.
3. Body size: a body over `router.max_request_body_bytes` is refused with 413 while it is read, before any of it
   is parsed (a missing or lying Content-Length does not get past the count).
Every refusal, and every framework error (unknown path 404, wrong method 405, unparsable body 400), is OpenAI-style
error JSON: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import hmac
import json
from dataclasses import dataclass

from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deployments.error_responses import error_body


@dataclass(frozen=True)
class EdgePolicy:
    max_body_bytes: int
    api_key: str | None = None


def _is_json(content_type: str) -> bool:
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type == "application/json" or media_type.endswith("+json")


class HttpEdge:
    """ASGI middleware; reads its `EdgePolicy` from `app.state.edge_policy`, which the router sets at start-up."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        policy: EdgePolicy | None = getattr(scope["app"].state, "edge_policy", None) if "app" in scope else None
        if scope["type"] != "http" or policy is None or not scope["path"].startswith("/v1/"):
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        refusal = self._refusal(policy, scope["method"], headers)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, refusal = await self._read_body(policy, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    def _refusal(policy: EdgePolicy, method: str, headers: dict[str, str]) -> JSONResponse | None:
        if policy.api_key is not None:
            offered = headers.get("authorization", "")
            if not hmac.compare_digest(offered.encode(), f"Bearer {policy.api_key}".encode()):
                return JSONResponse(error_body(401, "missing or invalid API key: send 'Authorization: Bearer <key>'"),
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
        if method == "POST" and not _is_json(headers.get("content-type", "")):
            return JSONResponse(error_body(415, f"the body must be application/json, not "
                                                f"{headers.get('content-type') or 'unspecified'!r}"), status_code=415)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > policy.max_body_bytes:
            return _too_large(policy)
        return None

    @staticmethod
    async def _read_body(policy: EdgePolicy, receive: Receive) -> tuple[bytes, JSONResponse | None]:
        chunks, num_bytes = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", JSONResponse(error_body(400, "the client went away"), status_code=400)
            chunk = message.get("body", b"")
            num_bytes += len(chunk)
            if num_bytes > policy.max_body_bytes:
                return b"", _too_large(policy)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), None


def _too_large(policy: EdgePolicy) -> JSONResponse:
    return JSONResponse(error_body(413, f"the body is larger than {policy.max_body_bytes} bytes"), status_code=413)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body, read once by the edge, handed to the app as if it came from the client; later messages (a
    disconnect while the response streams) come from the client again."""
    is_sent = False

    async def replayed() -> Message:
        nonlocal is_sent
        if not is_sent:
            is_sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


async def framework_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 for an unknown path, 405 for a wrong method, 400 for a body FastAPI cannot parse: as OpenAI errors."""
    detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
    return JSONResponse(error_body(exc.status_code, detail), status_code=exc.status_code, headers=exc.headers)
