"""An autoscaled prefill pool on the real app (Serve's autoscaler, our PrefillPool policy on the replicas' own
measured prompt seconds): small limits, so that it happens within a test.

1. Sustained load: clients send long prompts back to back, each with its own `cache_salt` (vLLM's prefix-cache
   isolation), so that every prompt is computed in full and the prompt seconds queued stay above one replica's
   target. A vLLM engine takes about a minute to start here, so a burst would drain before any replica could join.
2. Serve starts a second prefill replica within a bounded time; the load goes on until the new replica has computed
   prompts of its own. Every answer of the load, streamed or not, is exact.
3. Quiet: after the downscale delay the pool goes back to one replica. The replica that stops first waits for the
   KV it handed out, so requests sent while it stops are exact too.
4. Nothing leaked: every engine idle with no KV held, the router holding no admission slot.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from ray import serve

from bench import engines, processes, replicas
from bench.engines import APP_NAME
from tests.conftest import TEST_KV_HANDLE_KEY, TEST_OVERRIDES, connect_driver, send
from tests.e2e.workload import request_body

AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_queue_s": 1.0, "upscale_delay_s": 2,
               "downscale_delay_s": 15, "metrics_interval_s": 0.5, "look_back_period_s": 2}
NUM_CLIENTS = 4
SCALE_OUT_WITHIN_S = 240  # the upscale delay, then a replica's start: a vLLM engine takes about a minute here
NEW_REPLICA_SERVES_WITHIN_S = 60
SCALE_IN_WITHIN_S = 180


def _config() -> dict[str, Any]:
    from bench.systems import serve_config

    config = serve_config(**TEST_OVERRIDES)
    args = config["applications"][0]["args"]
    args["prefill"].update({"num_replicas": 1, "cpu_binding": ["0"], "max_queued_requests": 32,
                            "autoscaling": AUTOSCALING})
    args["transfer"]["backend"] = "auto"
    return config


@pytest.fixture(scope="module")
def scaled(reference_outputs, logs_dir) -> Iterator[processes.ServedApp]:
    import ray

    with processes.serve_run(_config(), name="autoscaling", logs_dir=logs_dir,
                             env={"SPLITSERVE_KV_HANDLE_KEY": TEST_KV_HANDLE_KEY}) as served:
        connect_driver(served.ray_address)
        try:
            yield served
        finally:
            engines.disconnect_driver()


def _num_running_prefill() -> int:
    status = serve.status().applications[APP_NAME].deployments["PrefillServer"]
    return status.replica_states.get("RUNNING", 0)


def _client(served: processes.ServedApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=600)


def _salted(client: openai.OpenAI, name: str, salt: str, stream: bool) -> list[int]:
    endpoint, body = request_body(name)
    return send(client, endpoint, body, stream=stream, extra={"cache_salt": salt})["token_ids"]


class _Load:
    """1. `NUM_CLIENTS` clients sending salted long prompts back to back until stopped; every answer kept."""

    def __init__(self, served: processes.ServedApp):
        self._client = _client(served)
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(NUM_CLIENTS)
        self._futures = [self._pool.submit(self._run, index) for index in range(NUM_CLIENTS)]

    def _run(self, index: int) -> list[list[int]]:
        answers = []
        while not self._stop.is_set():
            salt = f"autoscaling-{index}-{len(answers)}-{uuid.uuid4().hex}"
            answers.append(_salted(self._client, "completion_long", salt, stream=index % 2 == 1))
        return answers

    def stop(self) -> list[list[int]]:
        self._stop.set()
        answers = [answer for future in self._futures for answer in future.result(timeout=600)]
        self._pool.shutdown()
        return answers


def _prefill_replicas(base_url: str) -> set[str]:
    """Serve replica ids of the prefill engines the router's scheduler has load reports from."""
    engines_seen = replicas.health(base_url).get("scheduling", {}).get("engines", {})
    return {replica_id for replica_id, load in engines_seen.items() if load["role"] == "prefill"}


def test_sustained_load_scales_prefill_out_and_a_quiet_spell_back_in_with_every_stream_exact(
        scaled, reference_outputs):
    expected = reference_outputs["completion_long"]["token_ids"]
    assert _num_running_prefill() == 1
    # The router learns its engines from their load reports (every 0.5 s, through Serve's controller): an app
    # that has just turned healthy may not have sent the first one yet.
    processes.wait_until(lambda: len(_prefill_replicas(scaled.base_url)) == 1, timeout_s=60,
                         what="the prefill replica's first load report", log_path=scaled.log_path, interval_s=0.5)
    (first,) = _prefill_replicas(scaled.base_url)

    # 1-2. Load until Serve has a second replica running and the router routes prompts to it.
    began = time.monotonic()
    load = _Load(scaled)
    try:
        processes.wait_until(lambda: _num_running_prefill() == 2, timeout_s=SCALE_OUT_WITHIN_S,
                             what="a second prefill replica", log_path=scaled.log_path, interval_s=1)
        scaled_out_s = time.monotonic() - began
        processes.wait_until(
            lambda: any(engines.counters("prefill", replica).num_prompt_tokens_computed > 0
                        for replica in _prefill_replicas(scaled.base_url) - {first}),
            timeout_s=NEW_REPLICA_SERVES_WITHIN_S, what="prompts computed by the new prefill replica",
            log_path=scaled.log_path, interval_s=1)
    finally:
        answers = load.stop()
    print(f"scaled out {scaled_out_s:.0f} s after the load began; {len(answers)} answers under load")
    assert len(answers) >= NUM_CLIENTS
    assert all(answer == expected for answer in answers), [i for i, a in enumerate(answers) if a != expected]

    # 3. Quiet, then back to one replica; requests keep coming (one at a time) while it stops, all exact.
    client = _client(scaled)
    began = time.monotonic()
    while _num_running_prefill() > 1:
        assert time.monotonic() - began < SCALE_IN_WITHIN_S, "prefill never scaled back in"
        output = send(client, *request_body("chat_capital"))
        assert output["token_ids"] == reference_outputs["chat_capital"]["token_ids"]
        time.sleep(2)
    print(f"scaled in {time.monotonic() - began:.0f} s after the load stopped")
    for index in range(2):
        assert _salted(client, "completion_long", f"after-{index}", stream=index == 1) == expected


def test_nothing_leaked_while_replicas_came_and_went(scaled):
    """4."""
    deadline = time.monotonic() + 60
    while True:
        counters = [engines.counters("prefill"), engines.counters("decode")]
        health = replicas.health(scaled.base_url)
        is_idle = (all((c.num_running_requests, c.num_waiting_requests, c.kv_cache_usage) == (0, 0, 0.0)
                       for c in counters)
                   and set(health.get("admission", {"": 1}).values()) == {0})
        if is_idle or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert is_idle, (counters, health)
    assert sum(counter.num_kv_failed_transfers for counter in counters) == 0
