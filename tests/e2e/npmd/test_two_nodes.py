"""Two Ray nodes on one host: prefill on one, decode on the other, placed by node labels (this folder's app: the
prefill pool on a second node; once per KV backend).

The second node has its own raylet and object store and its own loopback address (127.0.0.2), as a second machine
would: KV crosses between two object stores (object store backend), and NIXL's side channel must listen on, and
KV handles must name, the prefill node's address (a loopback bind on the wrong address would not be reached).
Requests here take the split path (the operator's override), the one that moves KV across the nodes.

1. Placement: /health shows prefill on 127.0.0.2 and decode on the head, the roles' `node_labels`
   matching the nodes' labels; on NIXL, prefill's side channel listens on its node's address.
2. Every answer equals the single reference engine's, and decode computed none of the prompts (the KV came
   across the nodes).
3. Last of the folder's tests (`ends_app`, after its leak check): the prefill node's raylet is stopped while long
   prompts are in flight: each request gets its exact answer (decode recomputes a prompt whose KV is gone) or a
   clean OpenAI error, never a hang or a crash; decode and the routers are left holding nothing.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from typing import Any

import openai
import pytest

from bench import engines, processes, replicas
from tests.conftest import loaded_prompt_counts, send
from tests.e2e.npmd.conftest import PREFILL_NODE, health_by_router
from tests.e2e.workload import request_body

EXACT_REQUESTS = ("chat_capital", "completion_long")
NUM_IN_FLIGHT = 3


def test_each_pool_runs_on_the_node_its_labels_select(npmd):
    roles = replicas.health(npmd.base_url)["roles"]
    assert roles["prefill"]["node_ip"] == PREFILL_NODE.node_ip, roles
    # The head, wherever Ray lists it (a head started on loopback registers under the host's address here).
    assert roles["decode"]["node_ip"] not in (None, PREFILL_NODE.node_ip), roles
    if npmd.backend == "nixl":  # decode must reach it from the other node: the node's address, not loopback
        assert roles["prefill"]["side_channel"].startswith(f"{PREFILL_NODE.node_ip}:"), roles


@pytest.mark.parametrize("name", EXACT_REQUESTS)
def test_answers_are_exact_with_the_kv_moved_across_nodes(npmd, reference_outputs, name):
    before = engines.counters("decode")
    # Salted (vLLM's prefix-cache isolation): decode may hold this prompt's blocks from the folder's other tests,
    # and a prefix hit would leave nothing to move.
    output = send(npmd.client("split"), *request_body(name), extra={"cache_salt": f"two-nodes-{uuid.uuid4().hex}"})
    after = engines.delta(engines.counters("decode"), before)
    assert output["token_ids"] == reference_outputs[name]["token_ids"]
    num_prompt_tokens = output["usage"]["prompt_tokens"]
    assert (after["num_prompt_tokens_computed"], after["num_prompt_tokens_external"]) \
        in loaded_prompt_counts(npmd.backend, num_prompt_tokens), after  # decode loaded the prompt's KV
    assert after["num_kv_transfers"] == 1 and after["num_kv_failed_transfers"] == 0, after


@pytest.mark.ends_app
def test_the_prefill_node_stopped_mid_load_leaves_exact_answers_or_clean_errors_and_nothing_held(
        npmd, reference_outputs):
    endpoint, body = request_body("completion_long_faults")
    expected = reference_outputs["completion_long_faults"]["token_ids"]
    client = npmd.client("split")

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
        processes.stop_node(npmd.served.nodes[0])
        outputs = [future.result(timeout=300) for future in futures]

    # 2. Each answer is exact (decode recomputed a prompt whose KV went with the node), or an OpenAI error.
    for output in outputs:
        if "token_ids" in output:
            assert output["token_ids"] == expected
        else:
            assert output["status"] in (500, 502, 503, 504), output
            assert isinstance(output["error"], dict) and output["error"].get("message"), output

    # 3. Decode and both routers hold nothing: no request, no KV block, no admission slot, no load estimate.
    idle = engines.wait_idle(("decode",), is_object_store=False)
    assert idle.is_idle, idle.counters

    def holds_nothing(health: dict) -> bool:
        decode_loads = [load for load in health["scheduling"]["engines"].values() if load["role"] == "decode"]
        return ("admission" in health and set(health["admission"].values()) <= {0}
                and all((load["num_pending_prompt_tokens"], load["num_requests"]) == (0, 0) for load in decode_loads))

    by_router = health_by_router(npmd.base_url, until=lambda seen: all(map(holds_nothing, seen.values())))
    assert all(health["roles"]["decode"]["ready"] for health in by_router.values()), by_router
