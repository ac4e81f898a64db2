"""The soak's stream check, without an engine: a stream's SSE read into text, token ids and usage; compared with
the standalone engine's reference (whole, or as a prefix when it ended early); each way a stream ends classified,
`wrong_tokens` never `ok`; the references themselves read with the same code and refused when not whole. The app
and the reference engine are fakes (httpx.MockTransport) answering as vLLM's /v1/completions streams do."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from bench import soak
from bench.soak import Soak, StreamReference, check_reply, classify_stream, parse_stream, stream_references

REFERENCE = StreamReference(prompt="Request 3. Here is a record", max_tokens=4, text=" of towns.\n",
                            token_ids=[101, 102, 103, 104], prompt_tokens=7)


def _events(pieces: list[tuple[str, list[int]]], *, prompt_tokens: int = 7, usage: bool = True,
            token_ids: bool = True, error: bool = False, done: bool = True) -> list[str]:
    """`data: ` lines as vLLM streams a completion: a chunk per piece, the usage chunk, `[DONE]`."""
    events = []
    for text, ids in pieces:
        choice = {"index": 0, "text": text, "finish_reason": None, **({"token_ids": ids} if token_ids else {})}
        events.append("data: " + json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": [choice]}))
    if error:
        events.append("data: " + json.dumps({"error": {"message": "the decode replica failed mid-stream",
                                                       "type": "ServiceUnavailable", "code": 503}}))
    if usage and not error:
        completion = sum(len(ids) for _, ids in pieces)
        events.append("data: " + json.dumps({"id": "cmpl-1", "choices": [], "usage": {
            "prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}}))
    if done:
        events.append("data: [DONE]")
    return events


WHOLE = [(" of", [101]), (" towns", [102]), (".", [103]), ("\n", [104])]


def test_parse_stream_concatenates_text_and_token_ids_and_reads_usage():
    reply = parse_stream(_events(WHOLE))
    assert (reply.text, reply.token_ids) == (" of towns.\n", [101, 102, 103, 104])
    assert (reply.prompt_tokens, reply.completion_tokens, reply.is_done, reply.error) == (7, 4, True, None)


def test_parse_stream_notes_what_is_missing():
    reply = parse_stream(_events(WHOLE, usage=False, token_ids=False, done=False))
    assert reply.text == " of towns.\n"
    assert (reply.token_ids, reply.prompt_tokens, reply.completion_tokens, reply.is_done) == (None, None, None, False)
    assert parse_stream([]).is_done is False


def test_parse_stream_keeps_the_error_event():
    reply = parse_stream(_events(WHOLE[:2], error=True))
    assert reply.is_done and reply.token_ids == [101, 102]
    assert reply.error is not None and "failed mid-stream" in reply.error


def test_a_stream_equal_to_its_reference_passes():
    assert check_reply(parse_stream(_events(WHOLE)), REFERENCE) is None


@pytest.mark.parametrize(("events", "expected"), [
    (_events([*WHOLE[:3], ("\n", [105])]), "token ids differ at 3 of 4"),
    (_events(WHOLE[:3]), "token ids differ at 3 of 4 (got 3)"),
    (_events([*WHOLE[:3], ("\n", [104]), (" x", [106])]), "token ids differ at 4 of 4 (got 5)"),
    (_events(WHOLE, token_ids=False), "no token ids"),
    (_events([*WHOLE[:3], ("!", [104])]), "text differ at 10"),
    (_events(WHOLE, prompt_tokens=8), "usage 8 prompt + 4 completion tokens, expected 7 + 4"),
    (_events(WHOLE, usage=False), "usage None prompt"),
])
def test_any_difference_from_the_reference_is_named(events, expected):
    assert expected in check_reply(parse_stream(events), REFERENCE)


@pytest.mark.parametrize(("events", "outcome", "detail"), [
    (_events(WHOLE), "ok", "pool 3"),
    (_events([*WHOLE[:3], ("\n", [105])]), "wrong_tokens", "pool 3: token ids differ at 3"),
    (_events(WHOLE, usage=False), "wrong_tokens", "pool 3: usage"),
    # Ended early with an error event: what it sent before is checked as a beginning of the reference.
    (_events(WHOLE[:2], error=True), "stream_error_event", "failed mid-stream"),
    (_events([WHOLE[0], ("X", [999])], error=True), "wrong_tokens", "(then an error event): token ids differ at 1"),
    (_events([], error=True), "stream_error_event", "failed mid-stream"),
    # Ended without [DONE].
    (_events(WHOLE[:2], usage=False, done=False), "unexpected_status", "without [DONE]"),
    (_events([("X", [999])], done=False), "wrong_tokens", "(ended without [DONE]): token ids differ at 0"),
])
def test_every_stream_that_got_a_200_is_checked_and_classified(events, outcome, detail):
    answer = classify_stream(parse_stream(events), REFERENCE, "pool 3")
    assert (answer.outcome, answer.status, answer.checked) == (outcome, 200, True)
    assert detail in answer.detail


def _sse(events: list[str]) -> bytes:
    return "".join(f"{event}\n\n" for event in events).encode()


def _fake_app(answers: dict[str, httpx.Response], seen: list[dict]) -> httpx.MockTransport:
    """Answers each /v1/completions stream by its prompt; everything else is an abandoned-stream's endless count."""
    def handle(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        seen.append(body)
        return answers.get(body["prompt"]) or httpx.Response(200, content=_sse(_events(WHOLE * 3, done=False)))
    return httpx.MockTransport(handle)


POOL = [REFERENCE, StreamReference(prompt="Request 9.", max_tokens=2, text="ab", token_ids=[1, 2], prompt_tokens=4)]


def _run_soak(monkeypatch, kind: str, answers: dict[str, httpx.Response], num_requests: int) -> tuple[Soak,
                                                                                                      list[dict]]:
    monkeypatch.setattr(soak, "MIX", {kind: 1.0})
    seen: list[dict] = []
    runner = Soak("m", {}, POOL, seed=0)

    async def go():
        async with httpx.AsyncClient(transport=_fake_app(answers, seen), base_url="http://app") as client:
            for index in range(num_requests):
                await runner.one(client, index)

    asyncio.run(go())
    return runner, seen


def test_the_soak_checks_each_pool_stream_against_its_own_reference(monkeypatch):
    answers = {REFERENCE.prompt: httpx.Response(200, content=_sse(_events(WHOLE))),
               "Request 9.": httpx.Response(200, content=_sse(_events([("a", [1]), ("c", [3])], prompt_tokens=4)))}
    runner, seen = _run_soak(monkeypatch, "stream", answers, num_requests=4)
    assert [(o.outcome, o.checked, o.detail.split(":")[0]) for o in runner.outcomes] == [
        ("ok", True, "pool 0"), ("wrong_tokens", True, "pool 1")] * 2
    # Sent greedy, with the sizes and flags the reference was computed with.
    assert all(body["temperature"] == 0 and body["ignore_eos"] and body["return_token_ids"]
               and body["stream_options"] == {"include_usage": True} for body in seen)
    assert [body["max_tokens"] for body in seen] == [4, 2, 4, 2]


def test_refused_streams_are_not_checked_and_abandoned_ones_are_left_out(monkeypatch):
    refused = httpx.Response(503, headers={"Retry-After": "2"}, json={"error": {"message": "busy"}})
    runner, _ = _run_soak(monkeypatch, "stream", {REFERENCE.prompt: refused}, num_requests=1)
    assert [(o.outcome, o.checked) for o in runner.outcomes] == [("overloaded", False)]
    runner, _ = _run_soak(monkeypatch, "abandon", {}, num_requests=2)
    assert [(o.kind, o.outcome, o.checked) for o in runner.outcomes] == [("abandon", "abandoned", False)] * 2


def test_references_are_read_as_the_soak_reads_streams_and_must_be_whole():
    def engine(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        pieces = [(f"t{i}", [i]) for i in range(body["max_tokens"])]
        return httpx.Response(200, content=_sse(_events(pieces, prompt_tokens=len(body["prompt"]))))

    async def references(pool, transport):
        async with httpx.AsyncClient(transport=transport, base_url="http://engine") as client:
            return await stream_references(client, "m", pool, concurrency=2)

    got = asyncio.run(references([("abc", 3), ("de", 1)], httpx.MockTransport(engine)))
    assert got == [StreamReference(prompt="abc", max_tokens=3, text="t0t1t2", token_ids=[0, 1, 2], prompt_tokens=3),
                   StreamReference(prompt="de", max_tokens=1, text="t0", token_ids=[0], prompt_tokens=2)]
    short = httpx.MockTransport(lambda request: httpx.Response(200, content=_sse(_events([("a", [1])]))))
    with pytest.raises(RuntimeError, match="not whole"):
        asyncio.run(references([("abc", 3)], short))  # fewer tokens than max_tokens (ignore_eos): no reference


def test_the_report_says_how_many_streams_were_checked():
    requests = [{"kind": "stream", "outcome": "ok"}, {"kind": "stream", "outcome": "wrong_tokens"},
                {"kind": "abandon", "outcome": "abandoned"}]
    report = {"minutes": 2, "backend": "nixl", "rate_per_s": 0.5, "started_at": "t", "host": "h", "command": "c",
              "num_requests": 3, "outcomes": {"ok": 1, "wrong_tokens": 1, "abandoned": 1}, "pool_size": 64,
              "num_streams_checked": 2, "is_idle_at_end": True, "requests": requests, "faults": [],
              "memory_start": {}, "memory_end": {}}
    text = soak.report_markdown(report)
    assert "streams checked against the standalone engine's answers (pool of 64 prompts): 2; wrong tokens: 1; " \
           "abandoned on purpose (not checked): 1" in text
    assert "| stream | wrong_tokens | 1 |" in text
