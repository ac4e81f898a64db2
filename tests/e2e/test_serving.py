"""The app started from serve_config.yaml, driven by the official openai client.

Life cycle checked per request: the router sends the prompt to prefill, prefill computes it, its KV moves to
decode through the connector, decode continues without recomputing the prompt, and the tokens equal those of a
single standalone vLLM engine.
"""

from __future__ import annotations

import pytest

from bench import engines, replicas
from tests.conftest import _app_config, loaded_prompt_counts, send
from tests.e2e.workload import EXACTNESS_REQUESTS, MODEL, request_body

CPU_BLOCK_SIZE = 128  # vLLM's default block size on CPU (serve_config.yaml leaves block_size to vLLM)


@pytest.mark.parametrize("name", list(EXACTNESS_REQUESTS))
def test_output_equals_single_engine_and_decode_loads_prompt_kv(name, openai_client, reference_outputs,
                                                                  ray_driver, app):
    endpoint, body = request_body(name)
    prefill_before, decode_before = engines.counters("prefill"), engines.counters("decode")

    output = send(openai_client, endpoint, body)

    prefill_delta = engines.delta(engines.counters("prefill"), prefill_before)
    decode_delta = engines.delta(engines.counters("decode"), decode_before)
    reference = reference_outputs[name]
    num_prompt_tokens = output["usage"]["prompt_tokens"]

    # 1. Exactness: the same tokens as one standalone engine, token for token.
    assert output["token_ids"] == reference["token_ids"], (output["text"], reference["text"])
    assert output["text"] == reference["text"]
    assert output["finish_reason"] == reference["finish_reason"]
    assert num_prompt_tokens == reference["usage"]["prompt_tokens"]
    # 2. Prefill ran the prompt: every prompt token was computed there (or found in its own prefix cache).
    assert prefill_delta["num_prompt_tokens"] == num_prompt_tokens
    assert prefill_delta["num_prompt_tokens_computed"] + prefill_delta["num_prompt_tokens_local_cache_hit"] \
        == num_prompt_tokens
    # 3. Decode recomputed nothing: the prompt's KV came in through the connector, but for the last token, which
    #    every decoder computes to sample from (counted as loaded or computed by how the KV loaded)...
    assert decode_delta["num_prompt_tokens"] == num_prompt_tokens
    assert (decode_delta["num_prompt_tokens_computed"], decode_delta["num_prompt_tokens_external"]) \
        in loaded_prompt_counts(app.resolved_backend, num_prompt_tokens), decode_delta
    # 4. ...in one transfer of exactly the prompt's blocks.
    expected_bytes = engines.num_blocks(num_prompt_tokens, CPU_BLOCK_SIZE) * engines.kv_bytes_per_block(
        app.model_path, CPU_BLOCK_SIZE)
    assert decode_delta["num_kv_transfers"] == 1, decode_delta
    assert decode_delta["num_kv_bytes_transferred"] == expected_bytes, decode_delta
    assert decode_delta["num_kv_failed_transfers"] == 0


def test_a_split_loads_inside_the_decode_step_that_computes_it(openai_client, reference_outputs, app):
    """`transfer.is_load_in_step` (the default on both backends): decode loads a split's KV inside the engine step
    that computes the prompt's last token. The object store does so for every handle with its receipt; NIXL once
    decode holds a connection to the prefill engine, which the first split from that engine makes
    (kv_transfer/nixl/in_step.py).
    Both prompts are shorter than a block, so neither engine's prefix cache can hold them."""
    # 1. One split, so that decode is connected to prefill's engine (NIXL; the object store needs no connection).
    warm = send(openai_client, *request_body("completion_short"))
    assert warm["token_ids"] == reference_outputs["completion_short"]["token_ids"]

    # 2. The next split is loaded in step: decode computes exactly the last prompt token, and loads the rest in
    #    one transfer.
    before = engines.counters("decode")
    output = send(openai_client, *request_body("chat_capital"))
    during = engines.delta(engines.counters("decode"), before)
    num_prompt_tokens = output["usage"]["prompt_tokens"]
    assert 2 <= num_prompt_tokens < CPU_BLOCK_SIZE
    assert output["token_ids"] == reference_outputs["chat_capital"]["token_ids"]
    assert (during["num_prompt_tokens_computed"], during["num_prompt_tokens_external"]) \
        == (1, num_prompt_tokens - 1), during
    assert (during["num_kv_transfers"], during["num_kv_failed_transfers"]) == (1, 0), during


@pytest.mark.parametrize("name", ["chat_multi_turn", "completion_long"])
def test_streamed_output_equals_single_engine(name, openai_client, reference_outputs):
    endpoint, body = request_body(name)
    output = send(openai_client, endpoint, body, stream=True)
    reference = reference_outputs[name]
    assert output["token_ids"] == reference["token_ids"]
    assert output["text"] == reference["text"]
    assert output["usage"]["completion_tokens"] == len(reference["token_ids"])


def test_sse_stream_ends_with_done(app):
    import httpx

    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{app.base_url}/v1/completions", json=body, headers=app.headers, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert len(events) >= 2


def test_models_and_health(openai_client, app):
    import httpx

    models = openai_client.models.list()
    assert [model.id for model in models.data] == [MODEL]
    health = httpx.get(f"{app.base_url}/health", timeout=30).json()
    assert health["status"] == "ok"
    assert health["transfer_backend"] == app.resolved_backend
    assert health["roles"]["prefill"]["transfer_backend"] == app.resolved_backend
    assert health["roles"]["decode"]["transfer_backend"] == app.resolved_backend
    assert health["roles"]["prefill"]["ready"] and health["roles"]["decode"]["ready"]


def _cores(binding: str) -> set[int]:
    """vLLM's VLLM_CPU_OMP_THREADS_BIND syntax ("0", "0-3", "1,3") as a set of cores."""
    cores: set[int] = set()
    for part in binding.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def test_each_engine_computes_on_its_own_cores(app, ray_driver):
    """The thread that runs each engine's model stays on its role's `cpu_binding`. On CPU, vLLM's NIXL connector
    moves it to the last core of the NUMA node, so that both engines of a 2-core host would compute on core 1;
    kv_transfer/nixl/connector.py moves it back (`transfer.keep_engine_affinity`)."""
    _, config = _app_config()
    for role, role_config in (("prefill", config.prefill), ("decode", config.decode)):
        # vLLM's mp executor: the replica spawns the EngineCore, which spawns the worker that runs the model on
        # its main thread.
        workers = [child for child in replicas.engine_core_process(role).children()
                   if "resource_tracker" not in " ".join(child.cmdline())]
        assert len(workers) == 1, (role, [worker.cmdline() for worker in workers])
        assert set(workers[0].cpu_affinity()) == _cores(role_config.cpu_binding_for(0)), role


def test_nothing_leaked_after_all_requests(ray_driver, app):
    """Runs last (see conftest): both engines are idle and hold no KV blocks once every request is done."""
    is_object_store = app.resolved_backend == "object_store"
    # A transfer leaked and then reaped while this waits shows below, in the store's num_expired.
    idle = engines.wait_idle(is_object_store=is_object_store, timeout_s=60, poll_s=2)
    assert idle.is_idle, idle
    admission = replicas.health(app.base_url)["admission"]  # the router holds no slot for a finished request
    assert set(admission.values()) == {0}, admission
    decode = idle.counters["decode"]
    assert decode.num_kv_failed_transfers == app.injected["num_failed_loads"]  # none but the faults tests made
    assert decode.num_kv_expired_requests == 0
    if is_object_store:
        store = idle.store
        assert (store.num_open, store.num_bytes_in_use) == (0, 0), store
        assert store.num_expired == app.injected["num_expired"], store  # only what a fault test caused
        assert store.num_opened == store.num_released + store.num_expired > 0, store
        # Released without being claimed: only the KV of requests that fault tests left undecoded.
        assert store.num_released - store.num_claimed == app.injected["num_released_unclaimed"], store
