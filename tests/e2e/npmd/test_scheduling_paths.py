"""The scheduler on the real app: two prefill engines and one decode engine (nPmD with small KV caches, on two
cores, prefill ordering prompts shortest first), the shipped default policy (`predictive`), and the operator's
path override so that each path is driven on purpose; once per KV backend (NIXL: decode reads from two prefill
agents; the object store: each prefill replica's own store). The app is this folder's (conftest.py): two routers in
front, the prefill pool on a second Ray node.

1. Each path (split, decode-local, prefill-local) answers exactly like the reference engine, greedy and with a
   fixed sampling seed, and the engine counters show which engine computed the prompt (none on decode for a
   split: its KV came through the connector).
2. Concurrent prompts are spread over both prefill engines (token JSQ on the reported loads plus each router's own
   dispatches); `Server-Timing` names the engine that ran each.
3. A call addressed to one prefill replica (how the router sends a KV release to the handle's owner) reaches that
   replica and no other (its KV store's counters show it, on the object store).
4. The predictive policy learns its rates from the engines' reports and the router's observations, and then
   predicts each request's TTFT (/health shows the error).
5. Nothing leaked: every engine idle with no KV block held, both KV stores empty (object store), and every router
   holding no admission slot, with its estimate of every engine, and of its own requests there, back to zero.
"""

from __future__ import annotations

import concurrent.futures
import re
import time
from typing import Any

import httpx
import pytest

from bench import engines, replicas
from bench.load_generator import filler_document
from tests.conftest import loaded_prompt_counts, send
from tests.e2e.npmd.conftest import NUM_PREFILL_REPLICAS, NPMDApp, health_by_router
from tests.e2e.workload import MODEL, SCHEDULING_REQUESTS, request_body

PATHS = ("split", "decode_local", "prefill_local")


def _all_counters(app: NPMDApp) -> dict[str, Any]:
    counters = {replica: engines.counters("prefill", replica) for replica in app.prefill_replicas}
    counters[app.decode_replica] = engines.counters("decode", app.decode_replica)
    return counters


def _deltas(after: dict[str, Any], before: dict[str, Any]) -> dict[str, dict[str, float]]:
    return {replica: engines.delta(after[replica], before[replica]) for replica in after}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(SCHEDULING_REQUESTS))
def test_each_path_answers_like_one_engine_and_its_engine_computed_the_prompt(npmd, reference_outputs, name,
                                                                            path):
    client = npmd.client(path)
    endpoint, body = request_body(name)
    before = _all_counters(npmd)

    output = send(client, endpoint, body)

    deltas = _deltas(_all_counters(npmd), before)
    reference = reference_outputs[name]
    num_prompt_tokens = output["usage"]["prompt_tokens"]
    # 1. Exactly the reference engine's tokens, on every path.
    assert output["token_ids"] == reference["token_ids"], (path, output["text"], reference["text"])
    assert num_prompt_tokens == reference["usage"]["prompt_tokens"]
    # 2. Which engine saw the prompt, and where its KV came from.
    decode = deltas[npmd.decode_replica]
    prefills = [deltas[replica] for replica in npmd.prefill_replicas]
    prefill_prompt_tokens = sorted(delta["num_prompt_tokens"] for delta in prefills)
    if path == "split":
        assert prefill_prompt_tokens == [0, num_prompt_tokens]  # one prefill engine ran it
        assert (decode["num_prompt_tokens_computed"], decode["num_prompt_tokens_external"]) \
            in loaded_prompt_counts(npmd.backend, num_prompt_tokens), decode  # decode loaded it
    elif path == "decode_local":
        assert prefill_prompt_tokens == [0, 0]
        assert decode["num_prompt_tokens"] == num_prompt_tokens and decode["num_prompt_tokens_external"] == 0
    else:  # prefill_local: one prefill engine ran it all; decode saw nothing
        assert prefill_prompt_tokens == [0, num_prompt_tokens]
        assert sorted(delta["num_generation_tokens"] for delta in prefills)[-1] == len(output["token_ids"])
        assert decode["num_prompt_tokens"] == 0 and decode["num_generation_tokens"] == 0, decode
        assert sum(delta["num_prompt_tokens_external"] for delta in prefills) == 0


def _server_timing_engine(header: str) -> str:
    match = re.search(r'prefill;dur=[0-9.]+;desc="([^"]+)"', header)
    assert match, header
    return match.group(1)


def test_concurrent_prompts_are_spread_over_both_prefill_engines(npmd):
    def post(index: int) -> httpx.Response:
        body = {"model": MODEL, "prompt": filler_document(first_year=1200 + 40 * index), "max_tokens": 4,
                "temperature": 0}
        return httpx.post(f"{npmd.base_url}/v1/completions", json=body, timeout=300,
                          headers={"X-Splitserve-Path": "split"})

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(post, range(4)))
    assert [response.status_code for response in responses] == [200] * 4
    engine_ids = [_server_timing_engine(response.headers["server-timing"]) for response in responses]
    assert len(set(engine_ids)) == NUM_PREFILL_REPLICAS, engine_ids


def test_a_call_addressed_to_one_prefill_replica_reaches_it(npmd):
    """How the router releases a KV handle's blocks: on the replica that made them, never on another."""
    from ray import serve
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from deployments.messages import Dispatch

    prefill = serve.get_deployment_handle("PrefillServer", app_name=replicas.APP_NAME)
    for owner in npmd.prefill_replicas:
        to_owner = Dispatch(router_id="test", seq=0, replica_id=owner)
        owner_engine = prefill.role.remote(dispatch=to_owner).result(timeout_s=30).engine_id
        request = CompletionRequest(model=MODEL, prompt=f"Release test for {owner}:", max_tokens=4,
                                    request_id=f"release-{owner}")
        handle = prefill.prefill.remote(request, dispatch=to_owner).result(timeout_s=120)
        assert handle.prefill_engine_id == owner_engine
        if npmd.backend != "object_store":
            continue  # NIXL's blocks are freed by their lease; only the object store shows a release
        before = {replica: engines.store_counters(replica) for replica in npmd.prefill_replicas}
        prefill.release.remote(handle, dispatch=to_owner).result(timeout_s=30)
        after = {replica: engines.store_counters(replica) for replica in npmd.prefill_replicas}
        for replica in npmd.prefill_replicas:
            released = after[replica].num_released - before[replica].num_released
            assert released == (1 if replica == owner else 0), (replica, owner, after[replica])
            assert after[replica].num_open == 0
        npmd.released_unclaimed[owner] = npmd.released_unclaimed.get(owner, 0) + 1


def test_predictive_learns_the_rates_and_predicts_ttft(npmd):
    scheduling = replicas.health(npmd.base_url)["scheduling"]
    assert scheduling["policy"] == "predictive"  # the default: serve_config.yaml leaves it to the mode
    # Unforced streams, one at a time, until a router has learned the rates (a response sent whole times no first
    # token, so only streams teach them) and its decisions carry predictions. Serve's proxy spreads the streams over
    # both routers, each learning from its own.
    for index in range(32):
        body = {"model": MODEL, "prompt": filler_document(first_year=1000 + 10 * index)[: 600 + 150 * (index % 6)],
                "max_tokens": 8, "temperature": 0, "stream": True}
        with httpx.stream("POST", f"{npmd.base_url}/v1/completions", json=body, timeout=300) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        scheduling = replicas.health(npmd.base_url)["scheduling"]
        if scheduling["rates_known"] and scheduling["num_recent_predictions"] >= 3:
            break
    assert scheduling["rates_known"], scheduling
    assert scheduling["num_recent_predictions"] >= 3, scheduling
    assert scheduling["ttft_prediction_median_abs_error"] is not None
    by_router = health_by_router(npmd.base_url)
    num_decisions = sum(sum(health["scheduling"]["decisions"].values()) for health in by_router.values())
    assert num_decisions >= len(PATHS) * len(SCHEDULING_REQUESTS) + 4, by_router


def _is_router_idle(health: dict) -> bool:
    return set(health["admission"].values()) == {0} and all(
        (load["num_pending_prompt_tokens"], load["num_requests"], load["num_own_requests"]) == (0, 0, 0)
        for load in health["scheduling"]["engines"].values())


def test_nothing_leaked_in_the_npmd_app(npmd):
    by_router = health_by_router(npmd.base_url, until=lambda seen: all(map(_is_router_idle, seen.values())))
    deadline = time.monotonic() + 60
    while True:
        counters = _all_counters(npmd)
        stores = ({replica: engines.store_counters(replica) for replica in npmd.prefill_replicas}
                  if npmd.backend == "object_store" else {})
        is_idle = (all((c.num_running_requests, c.num_waiting_requests, c.kv_cache_usage) == (0, 0, 0.0)
                       for c in counters.values())
                   and all((store.num_open, store.num_bytes_in_use) == (0, 0) for store in stores.values()))
        if is_idle or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert is_idle, (counters, stores, by_router)
    for replica, store in stores.items():
        assert store.num_expired == 0, store
        assert store.num_opened == store.num_released, store
        assert store.num_released - store.num_claimed == npmd.released_unclaimed.get(replica, 0), store
    assert sum(counter.num_kv_failed_transfers for counter in counters.values()) == 0
    assert counters[npmd.decode_replica].num_kv_expired_requests == 0
