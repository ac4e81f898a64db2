"""The router's stream tally, behind `splitserve_requests_total`'s status code for streams: a stream counts as
complete (200) once `data: [DONE]` went out, whether or not the client waited for the stream's own end (the
`openai` client closes the connection on [DONE]); a client that left earlier is a 499."""

from __future__ import annotations

import asyncio

from deployments.router import _StreamTally

CHUNKS = ['data: {"choices":[{"text":"a"}]}\n\n', 'data: {"choices":[{"text":"b"}]}\n\n', "data: [DONE]\n\n"]


async def _decode_stream():
    for chunk in CHUNKS:
        yield chunk
    await asyncio.sleep(3600)  # decode's generator has not ended yet when the client leaves


async def _read(num_chunks: int) -> _StreamTally:
    tally = _StreamTally()
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
