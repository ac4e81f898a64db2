"""An autoscaled prefill pool on the real app (Serve's autoscaler, our PrefillPool policy on the replicas' own
measured prompt seconds): small limits, so that it happens within a test.

1. A burst of long prompts queues more prompt seconds than one replica's target: Serve starts a second prefill
   replica within a bounded time, while every stream of the burst stays exact.
2. Quiet: after the downscale delay the pool goes back to one replica. The replica that stops first waits for the
   KV it handed out, so requests sent while it stops are exact too.
3. Nothing leaked: every engine idle with no KV held, the router holding no admission slot.
"""

from __future__ import annotations

import concurrent.futures
import time
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
NUM_BURST = 12
SCALE_OUT_WITHIN_S = 240  # the upscale delay, then a replica's start: a vLLM engine takes about a minute here
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
            ray.shutdown()


def _num_running_prefill() -> int:
    status = serve.status().applications[APP_NAME].deployments["PrefillServer"]
    return status.replica_states.get("RUNNING", 0)


def _burst(served: processes.ServedApp, name: str, num: int) -> list[dict[str, Any]]:
    client = openai.OpenAI(base_url=f"{served.base_url}/v1", api_key="unused", max_retries=0, timeout=600)
    with concurrent.futures.ThreadPoolExecutor(num) as pool:
        return list(pool.map(lambda _: send(client, *request_body(name)), range(num)))


def test_a_burst_scales_prefill_out_and_a_quiet_spell_back_in_with_every_stream_exact(scaled, reference_outputs):
    expected = reference_outputs["completion_long"]["token_ids"]
    assert _num_running_prefill() == 1

    # 1. The burst, and Serve's scale-out while it runs.
    began = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        burst = pool.submit(_burst, scaled, "completion_long", NUM_BURST)
        processes.wait_until(lambda: _num_running_prefill() == 2, timeout_s=SCALE_OUT_WITHIN_S,
                             what="a second prefill replica", log_path=scaled.log_path, interval_s=1)
        scaled_out_s = time.monotonic() - began
        outputs = burst.result(timeout=900)
    assert [output["token_ids"] for output in outputs] == [expected] * NUM_BURST
    print(f"scaled out {scaled_out_s:.0f} s after the burst began")

    # 2. Quiet, then back to one replica; requests keep coming (one at a time) while it stops, all exact.
    began = time.monotonic()
    while _num_running_prefill() > 1:
        assert time.monotonic() - began < SCALE_IN_WITHIN_S, "prefill never scaled back in"
        output = _burst(scaled, "chat_capital", 1)[0]
        assert output["token_ids"] == reference_outputs["chat_capital"]["token_ids"]
        time.sleep(2)
    assert [output["token_ids"] for output in _burst(scaled, "completion_long", 2)] == [expected] * 2


def test_nothing_leaked_while_replicas_came_and_went(scaled):
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
