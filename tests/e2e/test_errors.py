"""The bad-input catalogue: every bad request gets OpenAI-style error JSON with the right status, and the app
serves a normal request right after. Also the API key (the second run requires one) and the edge's limits."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.workload import MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOO_LONG_PROMPT = "word " * 3000  # > 2,048 tokens


def _post(app, path: str, headers: dict | None = None, **kwargs) -> httpx.Response:
    return httpx.post(f"{app.base_url}{path}", timeout=120, headers={**app.headers, **(headers or {})}, **kwargs)


def _assert_openai_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] == status
    return error


def _assert_still_serving(openai_client) -> None:
    response = openai_client.completions.create(model=MODEL, prompt="One, two,", max_tokens=2, temperature=0)
    assert response.choices[0].text


HI = [{"role": "user", "content": "hi"}]
JSON = {"content-type": "application/json"}
# A KV handle as our connector writes it, naming a transfer that no longer exists: clients may not send one.
STALE_HANDLE = {"do_remote_prefill": True, "splitserve": {"version": 1, "source": "splitserve-kv-store-prefill-0-0",
                                                          "transfer_key": "an-old-request", "num_tokens": 2,
                                                          "num_blocks": 1}}


def _case(name: str, path: str, status: int, body=None, **kwargs):
    if body is not None:
        kwargs["json"] = body
    return pytest.param(path, kwargs, status, id=name)


CATALOGUE = [
    # the body itself
    _case("malformed-json", CHAT, 400, content=b"{not json", headers=JSON),
    _case("invalid-utf8", COMPLETIONS, 400, content=b'{"model": "m", "prompt": "\xff\xfe"}', headers=JSON),
    _case("json-array-body", COMPLETIONS, 400, [1, 2]),
    _case("wrong-content-type", COMPLETIONS, 415, content=b'{"prompt": "hi"}', headers={"content-type": "text/plain"}),
    _case("oversized-body", COMPLETIONS, 413, content=b'{"prompt": "' + b"a" * (5 << 20) + b'"}', headers=JSON),
    _case("unknown-path", "/v1/no-such-endpoint", 404, {}),
    # fields: missing, wrong types
    _case("messages-missing", CHAT, 400, {"model": MODEL}),
    _case("messages-wrong-type", CHAT, 400, {"model": MODEL, "messages": "not a list"}),
    _case("max-tokens-wrong-type", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "max_tokens": "many"}),
    _case("temperature-wrong-type", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "temperature": "hot"}),
    _case("stop-wrong-type", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "stop": 5}),
    # prompts: empty, huge, over the context
    _case("empty-prompt", COMPLETIONS, 400, {"model": MODEL, "prompt": "", "max_tokens": 2}),
    _case("empty-messages", CHAT, 400, {"model": MODEL, "messages": [], "max_tokens": 2}),
    _case("prompt-over-context-chat", CHAT, 400,
          {"model": MODEL, "messages": [{"role": "user", "content": TOO_LONG_PROMPT}]}),
    _case("prompt-over-context-completion", COMPLETIONS, 400, {"model": MODEL, "prompt": TOO_LONG_PROMPT}),
    _case("huge-prompt", COMPLETIONS, 400, {"model": MODEL, "prompt": "word " * 200_000}),
    # max_tokens: zero, negative, huge
    _case("max-tokens-zero", CHAT, 400, {"model": MODEL, "messages": HI, "max_tokens": 0}),
    _case("max-tokens-negative", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "max_tokens": -5}),
    _case("max-completion-tokens-zero", CHAT, 400, {"model": MODEL, "messages": HI, "max_completion_tokens": 0}),
    _case("max-tokens-huge", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "max_tokens": 10**9}),
    _case("min-tokens-above-max", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "min_tokens": 10, "max_tokens": 2}),
    # sampling values
    _case("negative-temperature", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "temperature": -1}),
    _case("top-p-above-one", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "top_p": 1.5}),
    _case("top-k-negative", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "top_k": -5}),
    _case("presence-penalty-out-of-range", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "presence_penalty": 5}),
    _case("logprobs-too-many", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "logprobs": 50}),
    _case("logit-bias-not-token-ids", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "logit_bias": {"abc": 1}}),
    # models: unknown, or a path on the server
    _case("unknown-model-chat", CHAT, 404, {"model": "no-such-model", "messages": HI}),
    _case("unknown-model-completion", COMPLETIONS, 404, {"model": "no-such-model", "prompt": "hi"}),
    _case("model-as-server-path", COMPLETIONS, 404, {"model": "/etc/passwd", "prompt": "hi"}),
    # parameters a split request or this model does not support
    _case("n-above-one", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "n": 2}),
    _case("beam-search", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "use_beam_search": True}),
    _case("prompt-logprobs", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "prompt_logprobs": 1}),
    _case("several-prompts", COMPLETIONS, 400, {"model": MODEL, "prompt": ["a", "b"]}),
    _case("suffix", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "suffix": "x"}),
    _case("tool-choice-auto-without-parser", CHAT, 400, {
        "model": MODEL, "messages": HI, "tool_choice": "auto",
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}),
    _case("response-format-unknown", CHAT, 400, {"model": MODEL, "messages": HI, "response_format": {"type": "x"}}),
    # streaming options misuse
    _case("stream-options-without-stream", CHAT, 400,
          {"model": MODEL, "messages": HI, "stream_options": {"include_usage": True}}),
    # KV handles and connector settings are the server's
    _case("forged-kv-transfer-params", COMPLETIONS, 400, {"model": MODEL, "prompt": "hi", "kv_transfer_params": {
        "do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [[1]], "remote_host": "127.0.0.1",
        "remote_port": 1}}),
    _case("stale-kv-handle", CHAT, 400, {"model": MODEL, "messages": HI, "kv_transfer_params": STALE_HANDLE}),
]


@pytest.mark.parametrize(("path", "kwargs", "status"), CATALOGUE)
def test_bad_request_gets_error_json_and_app_keeps_serving(app, openai_client, path, kwargs, status):
    _assert_openai_error(_post(app, path, **kwargs), status)
    _assert_still_serving(openai_client)


def test_openai_client_sees_typed_errors(openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.BadRequestError):
        openai_client.completions.create(model=MODEL, prompt=TOO_LONG_PROMPT, max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=0)
    _assert_still_serving(openai_client)


def test_streaming_request_with_bad_input_gets_error_status_not_a_broken_stream(app, openai_client):
    response = _post(app, CHAT, json={"model": "no-such-model", "stream": True,
                                      "messages": [{"role": "user", "content": "hi"}]})
    _assert_openai_error(response, 404)
    _assert_still_serving(openai_client)


def test_catalogue_has_at_least_25_cases():
    assert len(CATALOGUE) >= 25


def test_wrong_method_gets_405_json(app):
    _assert_openai_error(httpx.get(f"{app.base_url}{COMPLETIONS}", headers=app.headers, timeout=30), 405)


def test_api_key_is_required_when_configured(app):
    """The second run sets SPLITSERVE_API_KEY for the app: /v1 needs the key, /health does not."""
    if app.api_key is None:
        pytest.skip("this run has no API key: /v1 is open, as by default")
    body = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": app.api_key}):
        response = httpx.post(f"{app.base_url}{COMPLETIONS}", json=body, headers=headers, timeout=30)
        _assert_openai_error(response, 401)
        assert response.headers["www-authenticate"] == "Bearer"
    _assert_openai_error(httpx.get(f"{app.base_url}/v1/models", timeout=30), 401)
    assert httpx.get(f"{app.base_url}/health", timeout=30).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{app.base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert _post(app, COMPLETIONS, json=body).status_code == 200
