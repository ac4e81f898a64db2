"""The load generator against a tiny OpenAI-style streaming server (a fake for this one piece): open-loop
arrivals that leave on schedule while the server stalls, latencies counted from the scheduled arrival, token
timing, errors recorded, runs bounded, its own process, loopback only."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from bench.load_generator import (
    GENERATOR_NICE,
    MAX_SEND_LAG_P99_S,
    MAX_SLEEP_S,
    CellRunner,
    LoopWatch,
    RequestRecord,
    _client,
    _one,
    check_loopback,
    read_server_timing,
    run_closed_loop,
    run_trace,
    send_lag_summary,
    run_queue_wait_s,
    sleep_until,
)
from bench.processes import free_port
from bench.traces import TraceRequest

TOKEN_GAP_S = 0.05
STALL_S = 1.0


def _fake_server(port: int):
    import uvicorn

    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if body["prompt"].startswith("stall"):  # a server that holds the request before it answers at all
            await asyncio.sleep(STALL_S)
        if body["model"] != "fake":
            return JSONResponse({"error": {"message": "no such model", "type": "NotFoundError", "param": None,
                                           "code": 404}}, status_code=404)

        async def events():
            # "p<k> ..." prompts ask for chunks of k tokens (as Ray Serve LLM's batched streams send them).
            tokens_per_chunk = int(body["prompt"][1:].split()[0]) if body["prompt"].startswith("p") else 1
            for index in range(0, body["max_tokens"], tokens_per_chunk):
                await asyncio.sleep(TOKEN_GAP_S * tokens_per_chunk)
                token_ids = list(range(index, min(index + tokens_per_chunk, body["max_tokens"])))
                chunk = {"id": "c", "object": "text_completion", "created": 0, "model": "fake",
                         "choices": [{"index": 0, "text": f"t{index}", "finish_reason": None, "logprobs": None,
                                      **({"token_ids": token_ids} if body.get("return_token_ids") else {})}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"id": "c", "object": "text_completion", "created": 0, "model": "fake", "choices": [],
                     "usage": {"prompt_tokens": len(body["prompt"].split()), "completion_tokens": body["max_tokens"],
                               "total_tokens": 0}}
            yield f"data: {json.dumps(usage)}\n\ndata: [DONE]\n\n"

        timing = 'prefill;dur=12.5;desc="prefill-0-ab", first_chunk;dur=3.0'
        return StreamingResponse(events(), media_type="text/event-stream", headers={"Server-Timing": timing})

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    return server, thread


@pytest.fixture(scope="module")
def base_url():
    port = free_port()
    server, thread = _fake_server(port)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _requests(arrivals: list[float], output_tokens: int = 4) -> list[TraceRequest]:
    return [TraceRequest(request_id=i, arrival_s=a, prompt_tokens=3, output_tokens=output_tokens)
            for i, a in enumerate(arrivals)]


def test_open_loop_requests_are_timed_token_by_token(base_url):
    requests = _requests([0.0, 0.1, 0.2], output_tokens=6)
    records = asyncio.run(run_trace(base_url=base_url, model="fake", requests=requests,
                                    prompts=["one two three"] * 3))
    # Each request takes 6 × 50 ms; open loop, each starts at its arrival time while the earlier ones still run.
    for earlier, later in zip(records, records[1:]):
        assert later.start_s == pytest.approx(later.arrival_s, abs=0.05)
        assert later.start_s < earlier.start_s + earlier.e2e_s
    for record in records:
        assert record.is_ok, record.error
        assert (record.prompt_tokens, record.output_tokens) == (3, 6)
        assert record.ttft_s >= TOKEN_GAP_S * 0.8 and len(record.tbt_s) == 5
        assert all(gap >= TOKEN_GAP_S * 0.5 for gap in record.tbt_s)
        assert record.e2e_s >= record.ttft_s + sum(record.tbt_s) * 0.99


def test_errors_are_recorded_and_runs_are_bounded(base_url):
    records = asyncio.run(run_trace(base_url=base_url, model="missing", requests=_requests([0.0]),
                                    prompts=["x"]))
    assert not records[0].is_ok and "404" in records[0].error

    records = asyncio.run(run_trace(base_url=base_url, model="fake", requests=_requests([0.0, 5.0]),
                                    prompts=["x", "y"], max_duration_s=1.0))
    assert [record.request_id for record in records] == [0]  # the request due after the time bound is not sent

    records = asyncio.run(run_trace(base_url=base_url, model="fake", requests=_requests([0.0], output_tokens=40),
                                    prompts=["x"], request_timeout_s=0.3))
    assert records[0].error.startswith("timeout")


def test_only_loopback_targets_are_loaded():
    check_loopback("http://127.0.0.1:8000")
    check_loopback("http://localhost:8000")
    with pytest.raises(ValueError, match="loopback"):
        check_loopback("https://api.example.com")


def test_closed_loop_keeps_exactly_concurrency_requests_in_flight(base_url):
    requests = _requests([0.0] * 6, output_tokens=4)
    records = asyncio.run(run_closed_loop(base_url=base_url, model="fake", requests=requests,
                                          prompts=["one two three"] * 6, concurrency=2, is_progress_shown=False))
    assert [record.request_id for record in records] == list(range(6))
    assert all(record.is_ok for record in records)
    # Each user sends its next request when its last one ends: at any instant at most two are running.
    events = sorted([(r.start_s, 1) for r in records] + [(r.arrival_s + r.e2e_s, -1) for r in records])
    running, most = 0, 0
    for _, change in events:
        running += change
        most = max(most, running)
    assert most == 2
    span = max(r.arrival_s + r.e2e_s for r in records)
    assert span == pytest.approx(3 * records[0].e2e_s, rel=0.5)  # 6 requests, 2 at a time: 3 rounds


def test_server_timing_is_recorded_where_the_server_sends_it(base_url):
    (record,) = asyncio.run(run_trace(base_url=base_url, model="fake", requests=_requests([0.0]),
                                      prompts=["one"], is_progress_shown=False))
    assert (record.prefill_s, record.prefill_engine_id, record.first_chunk_s) == (0.0125, "prefill-0-ab", 0.003)


def test_server_timing_parser_ignores_what_it_does_not_know():
    record = RequestRecord(request_id=0, arrival_s=0, prompt_tokens=0, output_tokens=0)
    read_server_timing('cache;desc="hit", first_chunk;dur=40', record)
    assert (record.prefill_s, record.first_chunk_s) == (None, 0.04)
    read_server_timing(None, record)
    assert record.first_chunk_s == 0.04


def test_server_timing_carries_the_schedulers_path_and_prediction():
    record = RequestRecord(request_id=0, arrival_s=0, prompt_tokens=0, output_tokens=0)
    read_server_timing('router;dur=910.2, first_chunk;dur=95.1, path;desc="decode_local", predicted_ttft;dur=880.0',
                       record)
    assert (record.path, record.predicted_ttft_s) == ("decode_local", 0.88)
    assert record.first_chunk_s == pytest.approx(0.0951)


def test_a_chunk_of_several_tokens_counts_as_that_many_gaps(base_url):
    # 8 tokens in chunks of 2, each chunk 2 × 50 ms after the last: 3 chunks after the first, 6 gaps of ~50 ms.
    (record,) = asyncio.run(run_trace(base_url=base_url, model="fake", requests=_requests([0.0], output_tokens=8),
                                      prompts=["p2 tokens"], is_progress_shown=False))
    assert record.is_ok and record.output_tokens == 8
    assert len(record.tbt_s) == 6
    assert record.tbt_s == pytest.approx([TOKEN_GAP_S] * 6, abs=0.02)


def test_requests_leave_on_schedule_while_the_server_stalls_and_latency_counts_from_arrival(base_url):
    # Twelve requests 50 ms apart; the first six find a server that holds them for a second.
    arrivals = [0.05 * i for i in range(12)]
    prompts = ["stall"] * 6 + ["go"] * 6
    records = asyncio.run(run_trace(base_url=base_url, model="fake", requests=_requests(arrivals), prompts=prompts))
    assert all(record.is_ok for record in records), [record.error for record in records]
    assert send_lag_summary(records)["send_lag_p99_ms"] <= MAX_SEND_LAG_P99_S * 1e3
    for record in records[:6]:
        assert record.ttft_s >= STALL_S
    for record in records[6:]:
        assert record.ttft_s < STALL_S / 2  # not queued behind the stalled ones on the client side


def test_a_long_wait_for_the_next_arrival_is_slept_in_short_steps():
    # The kernel may end a sleep late by 0.1% of it (100 ms after a 100 s gap in a trace): no step is that long.
    now = [0.0]
    steps: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        steps.append(seconds)
        now[0] += seconds

    asyncio.run(sleep_until(100.2, clock=lambda: now[0], sleep=fake_sleep))
    assert now[0] == pytest.approx(100.2) and max(steps) <= MAX_SLEEP_S
    assert len(steps) == 201  # 200 steps of 0.5 s, then the 0.2 s left
    steps.clear()
    asyncio.run(sleep_until(50.0, clock=lambda: now[0], sleep=fake_sleep))  # already due: no sleep at all
    assert steps == []


def test_a_request_that_leaves_late_is_timed_from_when_it_was_due(base_url):
    async def late() -> RequestRecord:
        client = _client(base_url, 30)
        now = time.perf_counter()
        # Due half a second ago (as if the generator had been starved): the user has waited that long already.
        record = await _one(client, "fake", _requests([0.0])[0], "go", now - 0.5, now - 0.5, 30)
        await client.close()
        return record

    record = asyncio.run(late())
    assert record.send_lag_s == pytest.approx(0.5, abs=0.05)
    assert record.ttft_s == pytest.approx(record.ttft_send_s + record.send_lag_s)
    assert record.ttft_s >= 0.5 + TOKEN_GAP_S * 0.8
    assert record.e2e_s - record.e2e_send_s == pytest.approx(0.5, abs=0.05)


def test_cells_run_in_the_generators_own_process(base_url):
    with CellRunner() as runner:
        records, stats = runner.run("open", base_url=base_url, model="fake", requests=_requests([0.0, 0.1]),
                                    prompts=["go", "go"], is_progress_shown=False)
        again, _ = runner.run("closed", base_url=base_url, model="fake", requests=_requests([0.0, 0.0]),
                              prompts=["go", "go"], concurrency=1, is_progress_shown=False)
    assert [record.is_ok for record in records + again] == [True] * 4
    assert stats.cpu_s > 0 and stats.wall_s >= 0.1
    assert stats.nice in (GENERATOR_NICE, 0)  # raised where the OS allowed it
    assert stats.steal_s is None or stats.steal_s >= 0
    # Its own session, so that where Linux's autogroup is on its group's nice can be raised too.
    assert stats.autogroup_nice in (None, GENERATOR_NICE, 0)
    # Why a send could be late: the loop's stalls and the thread's wait for a core, both measured (Linux).
    assert stats.loop_stall_s is not None and stats.loop_stall_s >= 0
    assert stats.run_queue_wait_s is None or stats.run_queue_wait_s >= 0


def test_the_loop_watch_sees_a_stall_of_the_event_loop():
    async def stalled() -> LoopWatch:
        with LoopWatch() as watch:
            await asyncio.sleep(0.05)
            time.sleep(0.12)  # a callback that holds the loop: every send due meanwhile waits for it
            await asyncio.sleep(0.05)
        return watch

    watch = asyncio.run(stalled())
    assert 0.1 <= watch.max_stall_s <= 0.2 and watch.stall_s >= watch.max_stall_s

    async def quiet() -> LoopWatch:
        with LoopWatch() as watch:
            await asyncio.sleep(0.2)
        return watch

    assert asyncio.run(quiet()).max_stall_s < 0.12  # no stall of its own making, whatever the host does


def test_the_run_queue_wait_is_the_threads_own_and_only_grows():
    first = run_queue_wait_s()
    if first is None:
        pytest.skip("no /proc/thread-self/schedstat on this OS")
    sum(range(2_000_000))
    assert run_queue_wait_s() >= first
