"""How one OpenAI request becomes a prefill request and a decode request (the PD protocol vLLM's connectors share).

1. `check_disaggregable`: refuse, as a 400, what a split request cannot honour (several choices or prompts,
   beam search, prompt logprobs, a client-supplied `kv_transfer_params`, `max_tokens` < 1, which the prefill
   request's own `max_tokens=1` would otherwise hide from vLLM's validation).
2. `to_prefill_request`: the same request, run for one token, not streamed, asking the connector to keep the
   prompt's KV for a remote decoder.
3. `to_decode_request`: the user's request unchanged but for the KV handle, so decode's output is the output a
   single engine would give.
"""

from __future__ import annotations

from typing import Any, TypeVar

from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
from vllm.entrypoints.openai.completion.protocol import CompletionRequest
from vllm.entrypoints.serve.engine.protocol import ErrorResponse

from deployments.error_responses import bad_request
from deployments.messages import OpenAIRequest
from kv_transfer.handle import KVHandle, prefill_kv_transfer_params

# The same request type in as out: a chat request stays a chat request.
Request = TypeVar("Request", ChatCompletionRequest, CompletionRequest)


def _num_prompts(request: CompletionRequest) -> int:
    prompt = request.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def check_disaggregable(request: OpenAIRequest) -> ErrorResponse | None:
    if request.kv_transfer_params is not None:
        return bad_request("kv_transfer_params is set by the server and may not be sent by clients",
                           "kv_transfer_params")
    max_tokens = getattr(request, "max_completion_tokens", None)
    if max_tokens is None:
        max_tokens = request.max_tokens
    if max_tokens is not None and max_tokens < 1:
        return bad_request(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    if (request.n or 1) != 1:
        return bad_request(f"n={request.n} is not supported: each request yields one choice", "n")
    if request.use_beam_search:
        return bad_request("beam search is not supported by disaggregated serving", "use_beam_search")
    if getattr(request, "prompt_logprobs", None) is not None:
        return bad_request("prompt_logprobs is not supported: decode does not recompute the prompt",
                           "prompt_logprobs")
    if isinstance(request, CompletionRequest):
        if request.prompt is None and getattr(request, "prompt_embeds", None) is None:
            return bad_request("prompt is required", "prompt")
        if _num_prompts(request) != 1:
            return bad_request("send one prompt per request", "prompt")
    return None


def to_prefill_request(request: Request) -> Request:
    update: dict[str, Any] = {
        "request_id": f"{request.request_id}-prefill",
        "max_tokens": 1,
        "min_tokens": 0,
        "stream": False,
        "stream_options": None,
        "kv_transfer_params": prefill_kv_transfer_params(),
    }
    if isinstance(request, ChatCompletionRequest):
        update["max_completion_tokens"] = None
    return request.model_copy(update=update)


def to_decode_request(request: Request, handle: KVHandle) -> Request:
    return request.model_copy(update={"kv_transfer_params": handle.to_kv_transfer_params()})
