"""Several router replicas in front of one prefill and one decode engine (serve_config.yaml with
`router.num_replicas: 2`, its default policy, NIXL): each router schedules on the engines' load reports plus its
own requests, and must count the other router's requests from those reports alone.

1. Both routers are up: /health, answered by either (Serve's proxy picks one per request), names each.
2. One long stream goes through one of them. While it runs, the other router, which holds no request of its own
   (the owner holds the stream until it ends), counts it once, from the engine's report. (Serve's proxy sends
   /health to the router with fewer requests in flight, which is the other one.)
3. Concurrent requests spread over both routers answer exactly like the reference engine.
4. Nothing leaked: both engines idle with no KV blocks, and each router's estimate of every engine, its own
   requests and its admission slots back to zero.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench import engines, processes, replicas
from bench.systems import serve_config
from tests.conftest import TEST_KV_HANDLE_KEY, connect_driver, send
from tests.e2e.workload import MODEL, request_body

NUM_ROUTERS = 2
EXACT_REQUESTS = ("chat_capital", "completion_short", "completion_long")


def _config() -> dict[str, Any]:
    return serve_config(router={"num_replicas": NUM_ROUTERS}, scheduling={"load_report_period_s": 0.25},
                        transfer={"backend": "nixl"})


def _health_by_router(base_url: str, *, until: Any = None, timeout_s: float = 60) -> dict[str, dict]:
    """/health as each router answers it, polled until `until(health_by_router)` holds (or every router answered,
    without `until`); returns the newest answer of each."""
    seen: dict[str, dict] = {}
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        health = replicas.health(base_url)
        router_id = health.get("scheduling", {}).get("router_id")
        if router_id is not None:
            seen[router_id] = health
        if len(seen) == NUM_ROUTERS and (until is None or until(seen)):
            return seen
        time.sleep(0.05)
    raise AssertionError(f"timed out; last /health per router: {seen}")


@pytest.fixture(scope="module")
def routers(reference_outputs, logs_dir) -> Iterator[str]:
    import ray

    env = {"SPLITSERVE_KV_HANDLE_KEY": TEST_KV_HANDLE_KEY}
    with processes.serve_run(_config(), name="several-routers", logs_dir=logs_dir, env=env) as served:
        connect_driver(served.ray_address)
        try:
            yield served.base_url
        finally:
            engines.disconnect_driver()


def test_both_routers_answer_and_name_themselves(routers):
    by_router = _health_by_router(routers, until=lambda seen: all(
        len(health["scheduling"]["engines"]) == 2 for health in seen.values()))  # both have load reports
    assert len(by_router) == NUM_ROUTERS
    for health in by_router.values():
        assert health["status"] == "ok" and health["scheduling"]["policy"] == "predictive"


def test_a_router_counts_the_other_routers_request_from_the_engines_report(routers):
    body = {"model": MODEL, "prompt": "Count slowly from one to one hundred:", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started, finished = threading.Event(), threading.Event()
    events: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{routers}/v1/completions", json=body, timeout=300) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        events.append(line)
                        started.set()
        finally:
            finished.set()

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    assert started.wait(120), "the stream never started"

    seen: list[dict] = []
    while not finished.is_set() and not seen:
        scheduling = replicas.health(routers).get("scheduling", {})
        loads = scheduling.get("engines", {}).values()
        # A router with no request of its own (so not the stream's), counting the stream once, from a report.
        if loads and all(load["num_own_requests"] == 0 for load in loads) \
                and sorted(load["num_requests"] for load in loads) == [0, 1]:
            seen.append(scheduling)
        time.sleep(0.05)
    worker.join(timeout=300)
    assert events and events[-1] == "data: [DONE]", events[-3:]
    assert seen, "no router counted the other router's stream while it ran"


def test_requests_through_both_routers_answer_exactly(routers, reference_outputs):
    import openai

    client = openai.OpenAI(base_url=f"{routers}/v1", api_key="unused", max_retries=0, timeout=300)
    jobs = [name for name in EXACT_REQUESTS for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda name: send(client, *request_body(name), stream=True), jobs))
    for name, answer in zip(jobs, answers, strict=True):
        assert answer["token_ids"] == reference_outputs[name]["token_ids"], name
        assert answer["text"] == reference_outputs[name]["text"], name


def test_nothing_leaked_with_several_routers(routers):
    def all_idle(seen: dict[str, dict]) -> bool:
        return all(set(health["admission"].values()) == {0}
                   and all((load["num_pending_prompt_tokens"], load["num_requests"], load["num_own_requests"])
                           == (0, 0, 0) for load in health["scheduling"]["engines"].values())
                   for health in seen.values())

    _health_by_router(routers, until=all_idle, timeout_s=60)
    idle = engines.wait_idle(is_object_store=False)
    assert idle.is_idle, idle.busy
    decode = idle.counters["decode"]
    assert decode.num_kv_failed_transfers == 0 and decode.num_kv_expired_requests == 0
