"""Server-sent events as the router passes them on: vLLM's SSE strings, untouched, with every way a stream ends
handled exactly once.

1. `passed_through`: decode's (or a collocated engine's) stream after its first chunk. A stream that fails or
   ends without `data: [DONE]` (a replica killed mid-stream) ends with an error event and `[DONE]`, as vLLM ends a
   failed stream, never silently.
2. `guarded`: a stream whose clean-up runs exactly once, however it ends (done, failed, closed, or dropped
   unstarted).
3. `StreamTally`: counts the chunks that carry tokens and notes whether `[DONE]` went out, for the metrics.
4. `typed_chunks`: the same stream as typed objects, for Python callers of the router's handle API.

Why `guarded`: a `finally` in an async generator runs when the generator finishes, fails or is closed, but not
when it is dropped before it ever started: its body, `finally` included, never runs. Starlette drops a response
body unstarted when the client left before the response began. For the router that would leak an admission slot
(the app's capacity shrinks by one, for good), an in-flight count, and a decode request that nobody reads.
"""

from __future__ import annotations

import json
import logging
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.error_responses import error_body

logger = logging.getLogger("ray.serve")

Item = TypeVar("Item")
DONE = "data: [DONE]"


def ends_stream(chunk: str) -> bool:
    """The SSE chunk that closes a stream: `data: [DONE]`."""
    return chunk.rstrip().endswith(DONE)


def error_event(status: int, message: str) -> str:
    return f"data: {json.dumps(error_body(status, message))}\n\n"


async def passed_through(first: str, stream: AsyncIterator[str], request_id: str) -> AsyncGenerator[str, None]:
    last = first
    yield first
    try:
        async for chunk in stream:
            last = chunk
            yield chunk
        failure = None if ends_stream(last) else "ended without [DONE]"
    except Exception as exc:  # a replica died or failed: Serve's errors for that vary with when it happened
        failure = repr(exc)
    if failure is not None:
        # Tokens already went out; the stream ends with an error event, as vLLM ends a failed stream.
        logger.warning("request %s: the engine's stream failed mid-way: %s", request_id, failure)
        yield error_event(503, "the decode replica failed mid-stream")
        yield f"{DONE}\n\n"


class _Once:
    def __init__(self, callback: Callable[[], None]):
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def guarded(stream: AsyncGenerator[Item, None], on_end: Callable[[], None]) -> AsyncGenerator[Item, None]:
    """`stream`, passed through, with `on_end` called exactly once when it is over: it ends, fails, is closed, or
    is garbage-collected (started or not). `on_end` must not hold a reference to the returned generator (it would
    never be collected)."""
    once = _Once(on_end)

    async def passed() -> AsyncGenerator[Item, None]:
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
            once()

    generator = passed()
    weakref.finalize(generator, once)
    return generator


@dataclass
class StreamTally:
    num_token_chunks: int = 0
    is_complete: bool = False  # `data: [DONE]` went out: the client got the whole stream

    async def counted(self, stream: AsyncGenerator[str, None],
                      on_done: Callable[[], None] = lambda: None) -> AsyncGenerator[str, None]:
        """`stream`, counted; `on_done` runs as its [DONE] event passes, before the client can read it: a client that
        sends its next request on [DONE] must find this one's engine work already counted as over."""
        async for chunk in stream:
            if '"choices":[{' in chunk:
                self.num_token_chunks += 1
            is_done = ends_stream(chunk)
            if is_done:
                on_done()
            yield chunk
            # Complete once [DONE] was sent (Starlette asks for the next chunk only after sending this one), not
            # once the stream ends: a client such as `openai` closes the connection on [DONE], which may cancel
            # the stream before its end, and was counted as a 499 (seen on the dashboard under steady traffic).
            if is_done:
                self.is_complete = True


async def typed_chunks(stream: AsyncIterator[str], chunk_type: type) -> AsyncGenerator[Any, None]:
    """Each event's JSON as `chunk_type` (an error event as an `ErrorResponse`); `[DONE]` is not yielded."""
    async for event in stream:
        for line in event.splitlines():
            if not line.startswith("data: ") or line == DONE:
                continue
            payload = json.loads(line[len("data: "):])
            yield ErrorResponse(**payload) if "error" in payload else chunk_type(**payload)
