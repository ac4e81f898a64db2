"""Bad requests get OpenAI-style error JSON with the right status, and the app serves the next request."""

from __future__ import annotations

import httpx
import openai
import pytest

from tests.e2e.workload import MODEL

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOO_LONG_PROMPT = "word " * 3000  # > 2,048 tokens


def _post(app, path: str, **kwargs) -> httpx.Response:
    return httpx.post(f"{app.base_url}{path}", timeout=120, **kwargs)


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


@pytest.mark.parametrize(
    ("path", "kwargs", "status"),
    [
        pytest.param(CHAT, {"content": b"{not json", "headers": {"content-type": "application/json"}}, 400,
                     id="malformed-json"),
        pytest.param(CHAT, {"json": {"model": MODEL, "messages": "not a list"}}, 400, id="messages-wrong-type"),
        pytest.param(CHAT, {"json": {"model": MODEL}}, 400, id="messages-missing"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": "hi", "max_tokens": "many"}}, 400,
                     id="max-tokens-wrong-type"),
        pytest.param(CHAT, {"json": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]}},
                     404, id="unknown-model-chat"),
        pytest.param(COMPLETIONS, {"json": {"model": "no-such-model", "prompt": "hi"}}, 404,
                     id="unknown-model-completion"),
        pytest.param(CHAT, {"json": {"model": MODEL, "messages": [{"role": "user", "content": TOO_LONG_PROMPT}]}},
                     400, id="prompt-over-context-chat"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": TOO_LONG_PROMPT}}, 400,
                     id="prompt-over-context-completion"),
        pytest.param(CHAT, {"json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_tokens": 0}}, 400, id="max-tokens-zero"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": "hi", "max_tokens": -5}}, 400,
                     id="max-tokens-negative"),
        pytest.param(CHAT, {"json": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "max_completion_tokens": 0}}, 400, id="max-completion-tokens-zero"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": "hi", "temperature": -1}}, 400,
                     id="negative-temperature"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": "hi", "n": 2}}, 400, id="n-above-one"),
        pytest.param(COMPLETIONS, {"json": {"model": MODEL, "prompt": "hi", "kv_transfer_params": {
            "do_remote_prefill": True, "remote_engine_id": "x", "remote_block_ids": [[1]],
            "remote_host": "127.0.0.1", "remote_port": 1}}}, 400, id="client-kv-transfer-params"),
    ],
)
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
