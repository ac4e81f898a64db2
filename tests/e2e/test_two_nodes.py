"""Two Ray nodes on one host: prefill on one, decode on the other, placed by node labels; once per KV backend.

The second node has its own raylet and object store and its own loopback address (127.0.0.2), as a second machine
would: KV crosses between two object stores (object store backend), and NIXL's side channel must listen on, and
KV handles must name, the prefill node's address (a loopback bind on the wrong address would not be reached).

1. Placement: /health shows prefill on 127.0.0.2 and decode on the head, the roles' `node_labels`
   matching the nodes' labels; on NIXL, prefill's side channel listens on its node's address.
2. Every answer equals the single reference engine's, and decode computed none of the prompts (the KV came
   across the nodes).
3. The prefill node's raylet is stopped while long prompts are in flight: each request gets its exact answer (decode
   recomputes a prompt whose KV is gone) or a clean OpenAI error, never a hang or a crash; decode and the router are
   left holding nothing.
"""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from bench import engines, processes, replicas
from tests.conftest import TEST_KV_HANDLE_KEY, TEST_OVERRIDES, connect_driver, loaded_prompt_counts, send
from tests.e2e.workload import request_body

PREFILL_NODE = processes.Node(node_ip="127.0.0.2", labels={"splitserve/pool": "prefill"})
HEAD_LABELS = {"splitserve/pool": "decode", "splitserve/ingress": "true"}
EXACT_REQUESTS = ("chat_capital", "completion_long")
NUM_IN_FLIGHT = 3


@dataclass
class TwoNodeApp:
    backend: str
    base_url: str
    log_path: Any
    served: processes.ServedApp


def _config(backend: str) -> dict[str, Any]:
    from bench.systems import serve_config

    config = serve_config(**TEST_OVERRIDES)
    args = config["applications"][0]["args"]
    args["prefill"]["node_labels"] = {"splitserve/pool": "prefill"}
    args["decode"]["node_labels"] = {"splitserve/pool": "decode"}
    args["router"]["node_labels"] = {"splitserve/ingress": "true"}  # the router stays when the prefill node goes
    args["transfer"]["backend"] = backend
    return config


@pytest.fixture(scope="module", params=["nixl", "object_store"])
def two_nodes(request, reference_outputs, logs_dir) -> Iterator[TwoNodeApp]:
    import ray

    backend = request.param
    with processes.serve_run(_config(backend), name=f"two-nodes-{backend}", logs_dir=logs_dir,
                             env={"SPLITSERVE_KV_HANDLE_KEY": TEST_KV_HANDLE_KEY}, head_labels=HEAD_LABELS,
                             nodes=(PREFILL_NODE,)) as served:
        connect_driver(served.ray_address)
        try:
            yield TwoNodeApp(backend=backend, base_url=served.base_url, log_path=served.log_path, served=served)
        finally:
            engines.disconnect_driver()


def _client(app: TwoNodeApp) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_each_pool_runs_on_the_node_its_labels_select(two_nodes):
    roles = replicas.health(two_nodes.base_url)["roles"]
    assert roles["prefill"]["node_ip"] == PREFILL_NODE.node_ip, roles
    # The head, wherever Ray lists it (a head started on loopback registers under the host's address here).
    assert roles["decode"]["node_ip"] not in (None, PREFILL_NODE.node_ip), roles
    if two_nodes.backend == "nixl":  # decode must reach it from the other node: the node's address, not loopback
        assert roles["prefill"]["side_channel"].startswith(f"{PREFILL_NODE.node_ip}:"), roles


@pytest.mark.parametrize("name", EXACT_REQUESTS)
def test_answers_are_exact_with_the_kv_moved_across_nodes(two_nodes, reference_outputs, name):
    before = engines.counters("decode")
    output = send(_client(two_nodes), *request_body(name))
    after = engines.delta(engines.counters("decode"), before)
    assert output["token_ids"] == reference_outputs[name]["token_ids"]
    num_prompt_tokens = output["usage"]["prompt_tokens"]
    assert (after["num_prompt_tokens_computed"], after["num_prompt_tokens_external"]) \
        in loaded_prompt_counts(two_nodes.backend, num_prompt_tokens), after  # decode loaded the prompt's KV
    assert after["num_kv_transfers"] == 1 and after["num_kv_failed_transfers"] == 0, after


def test_the_prefill_node_stopped_mid_load_leaves_exact_answers_or_clean_errors_and_nothing_held(
        two_nodes, reference_outputs):
    endpoint, body = request_body("completion_long_faults")
    expected = reference_outputs["completion_long_faults"]["token_ids"]
    client = _client(two_nodes)

    def one() -> dict[str, Any]:
        try:
            return send(client, endpoint, body)
        except openai.APIStatusError as error:  # a clean refusal: an OpenAI error body with its status
            return {"status": error.status_code, "error": error.body}

    # 1. Long prompts in flight; once decode holds one of them (its KV handed over or on its way), stop the node.
    before = engines.counters("decode")
    with concurrent.futures.ThreadPoolExecutor(NUM_IN_FLIGHT) as pool:
        futures = [pool.submit(one) for _ in range(NUM_IN_FLIGHT)]
        deadline = time.monotonic() + 120
        while engines.delta(engines.counters("decode"), before)["num_kv_transfers"] < 1:
            assert time.monotonic() < deadline, "no KV handed over within 120 s"
            time.sleep(0.05)
        processes.stop_node(two_nodes.served.nodes[0])
        outputs = [future.result(timeout=300) for future in futures]

    # 2. Each answer is exact (decode recomputed a prompt whose KV went with the node), or an OpenAI error.
    for output in outputs:
        if "token_ids" in output:
            assert output["token_ids"] == expected
        else:
            assert output["status"] in (500, 502, 503, 504), output
            assert isinstance(output["error"], dict) and output["error"].get("message"), output

    # 3. Decode and the router hold nothing: no request, no KV block, no admission slot, no load estimate.
    deadline = time.monotonic() + 60
    while True:
        decode = engines.counters("decode")
        health = replicas.health(two_nodes.base_url)
        decode_loads = [load for load in health.get("scheduling", {}).get("engines", {}).values()
                        if load["role"] == "decode"]
        is_idle = ((decode.num_running_requests, decode.num_waiting_requests, decode.kv_cache_usage) == (0, 0, 0.0)
                   and "admission" in health and set(health["admission"].values()) <= {0}
                   and all((load["num_pending_prompt_tokens"], load["num_requests"]) == (0, 0)
                           for load in decode_loads))
        if is_idle or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert is_idle, (decode, health)
    assert health["roles"]["decode"]["ready"], health["roles"]
