"""A guarded stream's clean-up runs exactly once however the stream ends, including when it is dropped before it
ever started (what Starlette does with a response body when the client left before the response began)."""

from __future__ import annotations

import asyncio
import gc

import pytest

from deployments.guarded_stream import guarded


class Source:
    """Three chunks; records whether its own `finally` ran (the decode stream it stands for was let go)."""

    def __init__(self) -> None:
        self.is_closed = False
        self.num_ends = 0

    async def chunks(self):
        try:
            for index in range(3):
                yield f"chunk {index}"
        finally:
            self.is_closed = True

    def on_end(self) -> None:
        self.num_ends += 1


def test_read_to_the_end():
    source = Source()

    async def read() -> list[str]:
        return [chunk async for chunk in guarded(source.chunks(), source.on_end)]

    assert asyncio.run(read()) == ["chunk 0", "chunk 1", "chunk 2"]
    assert (source.num_ends, source.is_closed) == (1, True)


def test_closed_by_its_reader_midway():
    source = Source()

    async def read_one() -> None:
        stream = guarded(source.chunks(), source.on_end)
        assert await anext(stream) == "chunk 0"
        await stream.aclose()
        await stream.aclose()  # a second close changes nothing

    asyncio.run(read_one())
    assert (source.num_ends, source.is_closed) == (1, True)


def test_its_reader_fails_midway():
    source = Source()

    async def read_and_fail() -> None:
        async for _ in guarded(source.chunks(), source.on_end):
            raise RuntimeError("the reader failed")

    with pytest.raises(RuntimeError):
        asyncio.run(read_and_fail())
    assert (source.num_ends, source.is_closed) == (1, True)


def test_dropped_before_it_started():
    source = Source()
    stream = guarded(source.chunks(), source.on_end)
    del stream
    gc.collect()
    assert source.num_ends == 1
    assert not source.is_closed  # never started: there is nothing of it to close


def test_dropped_while_suspended_midway():
    source = Source()

    async def read_one_then_drop() -> None:
        stream = guarded(source.chunks(), source.on_end)
        assert await anext(stream) == "chunk 0"
        del stream  # as Starlette does when sending to a gone client is cancelled
        gc.collect()
        await asyncio.sleep(0)  # asyncio closes a dropped, started generator in a task of its own
        await asyncio.sleep(0)

    asyncio.run(read_one_then_drop())
    assert (source.num_ends, source.is_closed) == (1, True)
