"""One OpenAI request becomes a prefill request and a decode request; what cannot be split is refused."""

from __future__ import annotations

import pytest
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest

from deployments.pd_protocol import check_disaggregable, to_decode_request, to_prefill_request
from kv_transfer.handle import KVHandle

MESSAGES = [{"role": "user", "content": "hi"}]


def _handle() -> KVHandle:
    return KVHandle(backend="nixl", request_id="r1", num_prompt_tokens=3, connector_params={
        "remote_engine_id": "p", "remote_request_id": "x", "remote_host": "h", "remote_port": 1,
        "remote_block_ids": [[1]], "do_remote_prefill": True})


def test_prefill_request_runs_one_token_without_streaming():
    request = ChatCompletionRequest(model="m", messages=MESSAGES, max_completion_tokens=50, stream=True,
                                    stream_options={"include_usage": True}, min_tokens=5, request_id="r1")
    prefill = to_prefill_request(request)
    assert (prefill.max_tokens, prefill.max_completion_tokens, prefill.min_tokens) == (1, None, 0)
    assert prefill.stream is False and prefill.stream_options is None
    assert prefill.kv_transfer_params["do_remote_decode"] is True
    assert prefill.request_id == "r1-prefill"
    assert request.max_completion_tokens == 50 and request.stream is True  # the original is untouched


def test_decode_request_is_the_original_plus_the_handle():
    request = CompletionRequest(model="m", prompt="hi", max_tokens=7, stream=True, request_id="r1")
    decode = to_decode_request(request, _handle())
    assert decode.kv_transfer_params == _handle().to_kv_transfer_params()
    assert decode.model_dump(exclude={"kv_transfer_params"}) == request.model_dump(exclude={"kv_transfer_params"})


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (ChatCompletionRequest(model="m", messages=MESSAGES, max_tokens=0), "max_tokens"),
        (ChatCompletionRequest(model="m", messages=MESSAGES, max_completion_tokens=-1), "max_tokens"),
        (CompletionRequest(model="m", prompt="hi", n=3), "n"),
        (CompletionRequest(model="m", prompt=["a", "b"]), "prompt"),
        (CompletionRequest(model="m", prompt="hi", prompt_logprobs=1), "prompt_logprobs"),
        (CompletionRequest(model="m", prompt="hi", kv_transfer_params={"do_remote_prefill": True}),
         "kv_transfer_params"),
    ],
)
def test_what_cannot_be_split_is_a_400(request_, param):
    error = check_disaggregable(request_)
    assert error is not None
    assert error.error.code == 400 and error.error.param == param


def test_ordinary_requests_pass():
    assert check_disaggregable(ChatCompletionRequest(model="m", messages=MESSAGES, max_tokens=5)) is None
    assert check_disaggregable(CompletionRequest(model="m", prompt=[1, 2, 3], max_tokens=5)) is None
