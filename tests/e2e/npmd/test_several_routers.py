"""Several router replicas in front of the engines (this folder's app: two routers, two prefill engines and one
decode engine, serve_config.yaml's default policy; once per KV backend): each router schedules on the engines' load
reports plus its own requests, and must count the other router's requests from those reports alone.

1. Both routers are up: /health, answered by either (Serve's proxy picks one per request), names each.
2. One long stream goes through one of them. While it runs, the other router, which holds no request of its own
   (the owner holds the stream until it ends), counts it once, from the engine's report. (Serve's proxy sends
   /health to the router with fewer requests in flight, which is the other one.)
3. Concurrent requests spread over both routers answer exactly like the reference engine.
4. Nothing leaked: test_scheduling_paths.py's leak check, after every test of the folder, asks each router.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time

import httpx

from bench import replicas
from tests.conftest import send
from tests.e2e.npmd.conftest import NUM_PREFILL_REPLICAS, NUM_ROUTERS, health_by_router
from tests.e2e.workload import MODEL, request_body

EXACT_REQUESTS = ("chat_capital", "completion_short", "completion_long")


def test_both_routers_answer_and_name_themselves(npmd):
    by_router = health_by_router(npmd.base_url)
    assert len(by_router) == NUM_ROUTERS
    for health in by_router.values():
        assert health["status"] == "ok" and health["scheduling"]["policy"] == "predictive"
        assert len(health["scheduling"]["engines"]) == NUM_PREFILL_REPLICAS + 1  # a load report from each


def test_a_router_counts_the_other_routers_request_from_the_engines_report(npmd):
    body = {"model": MODEL, "prompt": "Count slowly from one to one hundred:", "max_tokens": 400,
            "temperature": 0, "ignore_eos": True, "stream": True}
    started, finished = threading.Event(), threading.Event()
    events: list[str] = []

    def stream() -> None:
        try:
            with httpx.stream("POST", f"{npmd.base_url}/v1/completions", json=body, timeout=300) as response:
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
        scheduling = replicas.health(npmd.base_url).get("scheduling", {})
        loads = scheduling.get("engines", {}).values()
        # A router with no request of its own (so not the stream's), counting the stream once, from a report.
        if loads and all(load["num_own_requests"] == 0 for load in loads) \
                and sorted(load["num_requests"] for load in loads) == [0] * (len(loads) - 1) + [1]:
            seen.append(scheduling)
        time.sleep(0.05)
    worker.join(timeout=300)
    assert events and events[-1] == "data: [DONE]", events[-3:]
    assert seen, "no router counted the other router's stream while it ran"


def test_requests_through_both_routers_answer_exactly(npmd, reference_outputs):
    client = npmd.client()
    jobs = [name for name in EXACT_REQUESTS for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        answers = list(pool.map(lambda name: send(client, *request_body(name), stream=True), jobs))
    for name, answer in zip(jobs, answers, strict=True):
        assert answer["token_ids"] == reference_outputs[name]["token_ids"], name
        assert answer["text"] == reference_outputs[name]["text"], name
