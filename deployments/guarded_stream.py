"""Guarded stream: a response stream whose clean-up runs exactly once, however the stream ends.

A `finally` in an async generator runs when the generator finishes, fails or is closed, but not when it is dropped
before it ever started: its body, `finally` included, never runs. Starlette drops a response body unstarted when the
client left before the response began (sending the headers failed or was cancelled). For the router that would
leak an admission slot (the app's capacity shrinks by one, for good), an in-flight count, and a decode request
that nobody reads. `guarded` runs the clean-up on the first of: the stream ends, fails, is closed, or is
garbage-collected (started or not).
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncGenerator, Callable
from typing import TypeVar

Item = TypeVar("Item")


class _Once:
    def __init__(self, callback: Callable[[], None]):
        self._callback: Callable[[], None] | None = callback

    def __call__(self) -> None:
        callback, self._callback = self._callback, None
        if callback is not None:
            callback()


def guarded(stream: AsyncGenerator[Item, None], on_end: Callable[[], None]) -> AsyncGenerator[Item, None]:
    """`stream`, passed through, with `on_end` called exactly once when it is over. `on_end` must not hold a
    reference to the returned generator (it would never be collected)."""
    once = _Once(on_end)

    async def passed_through() -> AsyncGenerator[Item, None]:
        try:
            async for item in stream:
                yield item
        finally:
            await stream.aclose()
            once()

    generator = passed_through()
    weakref.finalize(generator, once)
    return generator
