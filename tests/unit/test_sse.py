"""deployments/sse.py: the pieces of a stream the router passes on.

1. A guarded stream's clean-up runs exactly once however the stream ends, including when it is dropped before it
   ever started (what Starlette does with a response body when the client left before the response began).
2. The stream tally, behind `splitserve_requests_total`'s status code for streams: a stream counts as complete
   (200) once `data: [DONE]` went out, whether or not the client waited for the stream's own end (the `openai`
   client closes the connection on [DONE]); a client that left earlier is a 499.
3. A pass-through whose engine stream fails or stops short ends with an error event and [DONE]; a whole one is
   passed on untouched.
4. Typed chunks: what a handle caller gets instead of SSE strings.
"""

from __future__ import annotations

import asyncio
import gc
import json

import pytest
from vllm.entrypoints.openai.completion.protocol import CompletionStreamResponse
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.sse import StreamTally, guarded, passed_through, typed_chunks


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


CHUNKS = ['data: {"choices":[{"text":"a"}]}\n\n', 'data: {"choices":[{"text":"b"}]}\n\n', "data: [DONE]\n\n"]


async def _decode_stream():
    for chunk in CHUNKS:
        yield chunk
    await asyncio.sleep(3600)  # decode's generator has not ended yet when the client leaves


async def _read(num_chunks: int) -> StreamTally:
    tally = StreamTally()
    counted = tally.counted(_decode_stream())
    # 1. The client reads `num_chunks` chunks, as Starlette would: each one sent before the next is asked for.
    for _ in range(num_chunks):
        await counted.__anext__()
    # 2. Then it leaves: Starlette cancels the body while it waits for the next chunk.
    next_chunk = asyncio.ensure_future(counted.__anext__())
    await asyncio.sleep(0.01)
    next_chunk.cancel()
    await asyncio.gather(next_chunk, return_exceptions=True)
    await counted.aclose()
    return tally


def test_a_client_that_leaves_after_done_got_the_whole_stream():
    tally = asyncio.run(_read(len(CHUNKS)))
    assert tally.is_complete and tally.num_token_chunks == 2


def test_a_client_that_leaves_before_done_did_not():
    tally = asyncio.run(_read(2))
    assert not tally.is_complete and tally.num_token_chunks == 2


async def _collect(stream) -> list:
    return [item async for item in stream]


async def _engine_stream(chunks: list[str], failure: Exception | None = None):
    for chunk in chunks:
        yield chunk
    if failure is not None:
        raise failure


def test_a_whole_stream_is_passed_on_untouched():
    out = asyncio.run(_collect(passed_through(CHUNKS[0], _engine_stream(CHUNKS[1:]), "r1")))
    assert out == CHUNKS


@pytest.mark.parametrize("failure", [None, RuntimeError("replica died")], ids=["stops-short", "fails"])
def test_a_stream_that_fails_or_stops_short_ends_with_an_error_event_and_done(failure):
    out = asyncio.run(_collect(passed_through(CHUNKS[0], _engine_stream(CHUNKS[1:2], failure), "r1")))
    assert out[:2] == CHUNKS[:2]
    error = json.loads(out[2].removeprefix("data: "))["error"]
    assert (error["code"], error["message"]) == (503, "the decode replica failed mid-stream")
    assert out[3] == "data: [DONE]\n\n" and len(out) == 4


def test_typed_chunks_are_the_events_as_objects_with_errors_as_error_responses():
    chunk = CompletionStreamResponse(model="m", choices=[{"index": 0, "text": "a"}]).model_dump_json()
    error = json.dumps({"error": {"message": "gone", "type": "Service Unavailable", "param": None, "code": 503}})
    events = [f"data: {chunk}\n\n", f"data: {error}\n\n", "data: [DONE]\n\n"]
    typed = asyncio.run(_collect(typed_chunks(_engine_stream(events), CompletionStreamResponse)))
    assert [type(item) for item in typed] == [CompletionStreamResponse, ErrorResponse]
    assert typed[0].choices[0].text == "a" and typed[1].error.code == 503
