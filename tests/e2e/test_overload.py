"""Overload: at twice the load the app sustains, admitted requests keep a bounded latency, the rest are refused
at once with 503, Retry-After and OpenAI error JSON, and nothing grows: not the router's memory, not the KV held.

The suite's app has a small bound (conftest.TEST_OVERRIDES: 4 queued per role beyond the engines' 16), so that
it is reached within seconds.
"""

from __future__ import annotations

import asyncio
import statistics
import time

import httpx

from bench import engines, replicas
from tests.e2e.workload import MODEL

NUM_USERS = 16  # the engines' batch (max_num_seqs): what the app serves without queueing
WARMUP_S = 4
SUSTAINED_S = 10
OVERLOAD_S = 15


async def _one(client: httpx.AsyncClient, app, index: int) -> tuple[int, float, httpx.Response]:
    body = {"model": MODEL, "prompt": f"Request {index}: write a sentence about the sea.", "max_tokens": 16,
            "temperature": 0, "ignore_eos": True}
    started = time.perf_counter()
    response = await client.post(f"{app.base_url}/v1/completions", json=body, headers=app.headers, timeout=120)
    return response.status_code, time.perf_counter() - started, response


async def _closed_loop(app, seconds: float) -> tuple[float, float]:
    """NUM_USERS users, each sending its next request when the last is answered: (requests/s, slowest latency).
    The rate is Little's law over the run's median latency: counting requests over the run's wall time would
    include its ramp-up and drain and understate what the app sustains (by 2x in one run here)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def user(client: httpx.AsyncClient, user_index: int) -> None:
        index = 0
        while time.perf_counter() < deadline:
            status, latency, _ = await _one(client, app, 1000 * user_index + index)
            assert status == 200
            latencies.append(latency)
            index += 1

    async with httpx.AsyncClient() as client:
        await asyncio.gather(*(user(client, index) for index in range(NUM_USERS)))
    return NUM_USERS / statistics.median(latencies), max(latencies)


async def _open_loop(app, rate: float) -> list[tuple[int, float, httpx.Response]]:
    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=500)) as client:
        tasks = []
        for index in range(int(rate * OVERLOAD_S)):
            tasks.append(asyncio.create_task(_one(client, app, 100_000 + index)))
            await asyncio.sleep(1 / rate)
        return await asyncio.gather(*tasks)


def test_twice_the_sustainable_load_is_refused_cleanly_with_bounded_latency(app, ray_driver):
    rss_before = replicas.router_process().memory_info().rss

    # 1. What the app sustains: a closed loop of as many users as the engines batch, once warm (a cold app's
    #    first batches are slower, and would understate it).
    asyncio.run(_closed_loop(app, WARMUP_S))
    sustainable_rate, slowest_sustained_s = asyncio.run(_closed_loop(app, SUSTAINED_S))
    assert sustainable_rate > 0

    # 2. Twice that, open loop: requests keep arriving whether or not earlier ones were answered.
    results = asyncio.run(_open_loop(app, 2 * sustainable_rate))
    admitted = [latency for status, latency, _ in results if status == 200]
    refused = [(latency, response) for status, latency, response in results if status == 503]
    assert len(admitted) + len(refused) == len(results), {status for status, _, _ in results}
    assert admitted and refused, (len(admitted), len(refused))

    # 3. Refusals are immediate and say when to come back, as OpenAI errors.
    for latency, response in refused:
        assert latency < 5
        assert response.headers["retry-after"] == "2"
        error = response.json()["error"]
        assert error["code"] == 503 and "capacity" in error["message"]

    # 4. Admitted requests wait at most for what the bound lets queue, not for the whole backlog.
    assert max(admitted) < 3 * slowest_sustained_s + 10, (max(admitted), slowest_sustained_s)

    # 5. Nothing grows: the engines go idle holding no KV, the store holds nothing, the router's memory is flat.
    for role in ("prefill", "decode"):
        deadline = time.monotonic() + 60
        while (counters := engines.counters(role)).num_running_requests or counters.kv_cache_usage:
            assert time.monotonic() < deadline, counters
            time.sleep(1)
    if app.resolved_backend == "object_store":
        store = engines.store_counters()
        assert (store.num_open, store.num_bytes_in_use) == (0, 0), store
    assert replicas.router_process().memory_info().rss - rss_before < 100 * 2**20
    health = replicas.health(app.base_url)
    assert health["status"] == "ok"
    assert health["admission"] == {"num_in_flight": 0, "num_in_prefill": 0}  # every admitted request left
