"""Replicas that die, KV that never arrives, clients that leave: every request completes correctly or fails cleanly
within a bounded time, Serve replaces what died, and afterwards no engine or store holds KV for a dead request.

Each fault that restarts a replica costs an engine start (about a minute here), so they are shared out:
- first run (nixl): a decode engine process killed (the replica turns unhealthy and Serve replaces it), then a
  decode replica killed mid-stream;
- second run (object store): a prefill replica killed mid-request (decode computes the prompt itself), a KV
  transfer that times out, and clients that disconnect during prefill and during streaming.
"""

from __future__ import annotations

import json
import threading
import time
import uuid

import httpx
import pytest
from ray import serve

from bench import engines, replicas
from bench.engines import APP_NAME
from kv_transfer.handle_signing import HandleSigner
from tests.conftest import send
from tests.e2e.workload import MODEL, long_document, request_body

BOUND_S = 60  # no request may hang longer than this on a fault


def _only(app, resolved_backend: str) -> None:
    if app.resolved_backend != resolved_backend:
        pytest.skip(f"runs once, in the {resolved_backend} run (each replica restart costs an engine start)")


def _serve_reports_healthy(ray_driver) -> bool:
    status = serve.status().applications[APP_NAME]
    return status.status == "RUNNING" and all(deployment.status == "HEALTHY"
                                              for deployment in status.deployments.values())


def test_a_dead_decode_engine_makes_the_replica_unhealthy_and_serve_replaces_it(app, ray_driver, openai_client,
                                                                                  reference_outputs):
    _only(app, "nixl")
    old_engine_id = replicas.engine_id(app.base_url, "decode")
    assert _serve_reports_healthy(ray_driver)

    # 1. Kill decode's engine process (not the replica): the replica lives on, with a dead engine. Until Serve
    #    stops it (three failed health checks, 10 s apart), it answers with a retryable 503, not vLLM's 500.
    replicas.engine_core_process("decode").kill()
    time.sleep(2)
    response = httpx.post(f"{app.base_url}/v1/completions", headers=app.headers, timeout=BOUND_S,
                          json={"model": MODEL, "prompt": "Hello", "max_tokens": 4, "temperature": 0})
    assert response.status_code == 503 and response.headers["retry-after"], response.text
    assert "replaced" in response.json()["error"]["message"]

    # 2. The replica reports it: /health says decode is not ready, and Serve's health check marks it unhealthy.
    deadline = time.monotonic() + 120
    seen_unhealthy = False
    while not seen_unhealthy and time.monotonic() < deadline:
        report = replicas.health(app.base_url)
        decode = report.get("roles", {}).get("decode", {})
        seen_unhealthy = report.get("status") == "unavailable" or decode.get("ready") is False \
            or not _serve_reports_healthy(ray_driver)
        time.sleep(1)
    assert seen_unhealthy, "the dead engine was never reported"

    # 3. Serve replaces the replica: a new engine, HEALTHY in `serve status`, and exact answers again.
    replicas.wait_for_replacement(app.base_url, "decode", old_engine_id)
    deadline = time.monotonic() + 60
    while not _serve_reports_healthy(ray_driver):
        assert time.monotonic() < deadline, serve.status()
        time.sleep(2)
    app.injected["num_failed_loads"] = 0  # the new decode engine counts from zero
    endpoint, body = request_body("completion_short")
    assert send(openai_client, endpoint, body)["token_ids"] == reference_outputs["completion_short"]["token_ids"]


def test_a_decode_replica_killed_mid_stream_ends_the_stream_cleanly(app, ray_driver, openai_client,
                                                                      reference_outputs):
    _only(app, "nixl")
    old_engine_id = replicas.engine_id(app.base_url, "decode")
    body = {"model": MODEL, "prompt": "Count from one to one hundred: one, two,", "max_tokens": 400,
            "temperature": 0, "stream": True, "ignore_eos": True}
    events: list[str] = []
    started = time.monotonic()
    # 1. A long stream; once tokens flow, the decode replica's process is killed.
    with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body, headers=app.headers,
                      timeout=BOUND_S) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if not line.startswith("data: "):
                continue  # the blank lines between events: kill once, on the fifth event itself
            events.append(line)
            if len(events) == 5:
                replicas.replica_process("decode").kill()
    # 2. The stream ended within the bound, with an error event and [DONE] after the tokens that went out.
    assert time.monotonic() - started < BOUND_S
    assert events[-1] == "data: [DONE]"
    error = json.loads(events[-2][len("data: "):])["error"]
    assert error["code"] == 503 and error["message"]
    assert 5 <= len(events) < 400

    # 3. Serve starts a new decode replica; requests are exact again; prefill holds nothing for the dead one.
    replicas.wait_for_replacement(app.base_url, "decode", old_engine_id)
    app.injected["num_failed_loads"] = 0
    endpoint, request = request_body("chat_capital")
    assert send(openai_client, endpoint, request)["token_ids"] == reference_outputs["chat_capital"]["token_ids"]
    idle = engines.wait_idle(("prefill",), is_object_store=False)  # nixl: no store
    assert idle.is_idle, idle


def test_a_prefill_replica_killed_mid_request_is_recomputed_on_decode(app, ray_driver, openai_client,
                                                                      reference_outputs):
    _only(app, "object_store")
    old_engine_id = replicas.engine_id(app.base_url, "prefill")
    endpoint, body = request_body("completion_prefill_killed")
    outcome: dict = {}

    def request() -> None:
        started = time.monotonic()
        outcome["output"] = send(openai_client, endpoint, body)
        outcome["seconds"] = time.monotonic() - started

    # 1. A ~1,200-token prompt (about 3 s of prefill here); 1 s in, its replica (engine, KV store and all) is
    #    killed. The engine's step counters cannot say "running" earlier: a one-token prefill finishes within the
    #    step that starts it.
    victim = replicas.replica_process("prefill")
    decode_before = engines.counters("decode")
    worker = threading.Thread(target=request)
    worker.start()
    time.sleep(1.0)
    victim.kill()
    worker.join(BOUND_S)

    # 2. The request still completed, exactly, within the bound, and decode computed the whole prompt itself.
    assert not worker.is_alive(), "the request hung"
    assert outcome["output"]["token_ids"] == reference_outputs["completion_prefill_killed"]["token_ids"]
    assert outcome["seconds"] < BOUND_S
    decode = engines.delta(engines.counters("decode"), decode_before)
    assert decode["num_prompt_tokens_computed"] == outcome["output"]["usage"]["prompt_tokens"], decode
    assert decode["num_kv_transfers"] == 0, decode

    # 3. Serve replaces prefill (with a new, empty KV store); the app is whole again.
    replicas.wait_for_replacement(app.base_url, "prefill", old_engine_id)
    app.injected["num_released_unclaimed"] = app.injected["num_expired"] = 0  # the new store counts from zero
    endpoint, body = request_body("completion_short")
    assert send(openai_client, endpoint, body)["token_ids"] == reference_outputs["completion_short"]["token_ids"]
    # The store is read at once, not waited for: its reaper would empty it of a leaked transfer within a lease.
    idle = engines.wait_idle(("decode",), is_object_store=False)
    assert idle.is_idle, idle
    assert engines.store_counters().num_open == 0


def test_a_kv_transfer_that_times_out_is_recomputed(app, ray_driver, reference_outputs):
    _only(app, "object_store")
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from kv_transfer.layout import KVLayout

    _, body = request_body("completion_kv_timeout")
    request = CompletionRequest(**body, return_token_ids=True)
    prefill = serve.get_deployment_handle("PrefillServer", app_name=APP_NAME)
    decode = serve.get_deployment_handle("DecodeServer", app_name=APP_NAME)
    handle = prefill.prefill.remote(request).result(timeout_s=120)
    prefill.release.remote(handle).result(timeout_s=30)  # its real KV is not the point here
    assert handle.connector_params["splitserve"]["receipt"]  # the app's handles carry one: decode claims nothing

    # 1. A transfer that is opened in prefill's store and never completed: decode waits `load_timeout_s` (10 s
    #    in the suite) for it, then recomputes the prompt.
    status = prefill.role.remote().result(timeout_s=30)
    store = ray_driver.get_actor(status.kv_store, namespace="serve")
    stalled_key = f"stalled-{uuid.uuid4().hex}"
    ray_driver.get(store.open.remote(stalled_key, KVLayout(num_parts=1, part_shape=(1,), block_dim=0,
                                                            dtype="float32")))
    # Without a receipt (as from an engine whose halves run in two processes), decode claims it from the store.
    params = {**handle.connector_params, "splitserve": {**handle.connector_params["splitserve"],
                                                        "transfer_key": stalled_key, "receipt": None}}
    stalled = HandleSigner(app.kv_handle_key).sign(handle.model_copy(update={"connector_params": params}))
    before = engines.counters("decode")
    started = time.monotonic()
    (response,) = list(decode.options(stream=True).decode.remote(request, stalled))

    # 2. Exact output, after the timeout and well within the bound; the failure is counted, nothing is held.
    assert 10 <= time.monotonic() - started < BOUND_S
    assert list(response.choices[0].token_ids) == reference_outputs["completion_kv_timeout"]["token_ids"]
    during = engines.delta(engines.counters("decode"), before)
    assert during["num_kv_failed_transfers"] == 1
    assert during["num_prompt_tokens_computed"] == response.usage.prompt_tokens
    app.injected["num_failed_loads"] += 1
    app.injected["num_released_unclaimed"] += 2
    deadline = time.monotonic() + 30
    while ray_driver.get(store.counters.remote()).num_open:
        assert time.monotonic() < deadline, ray_driver.get(store.counters.remote())
        time.sleep(0.5)


def test_clients_that_disconnect_during_prefill_and_streaming_leave_nothing_behind(app, ray_driver):
    _only(app, "object_store")
    store_before = engines.store_counters()
    # 1. During prefill: a ~1,200-token prompt, and the client gives up after 0.3 s.
    body = {"model": MODEL, "prompt": long_document(first_year=1600), "max_tokens": 8, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{app.base_url}/v1/completions", json=body, headers=app.headers, timeout=0.3)
    # 2. During streaming: a long stream, and the client leaves after three events.
    body = {"model": MODEL, "prompt": "Count from one to one hundred:", "max_tokens": 400, "temperature": 0,
            "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body, headers=app.headers,
                      timeout=60) as response:
        for index, _ in enumerate(response.iter_lines()):
            if index == 3:
                break
    # 3. Both engines go idle with no blocks held. The store holds nothing once the lease of a prompt whose
    #    prefill had already finished when the client left (if any) has run out: bounded, never leaked.
    idle = engines.wait_idle(is_object_store=False, timeout_s=30)
    assert idle.is_idle, idle
    # transfer.kv_lease_s + the store's reaper interval and slack
    idle = engines.wait_idle(is_object_store=True, timeout_s=30 + 15)
    assert idle.is_idle, idle
    store = idle.store
    assert store.num_bytes_in_use == 0, store
    app.injected["num_expired"] += store.num_expired - store_before.num_expired
    app.injected["num_released_unclaimed"] += (
        (store.num_released - store_before.num_released) - (store.num_claimed - store_before.num_claimed))
    # 4. The router gave both clients' admission slots back: its capacity is whole again.
    assert replicas.health(app.base_url)["admission"] == {"num_in_flight": 0, "num_in_prefill": 0}
