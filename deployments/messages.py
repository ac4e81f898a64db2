"""What crosses between the router and the engine replicas, typed. (The KV handle, which crosses prefill → router →
decode, is kv_transfer/handle.py's `KVHandle`.)

1. `OpenAIRequest`: the request the router parsed, as vLLM's own pydantic type; prefill, decode and collocated
   replicas take it as it is and answer with vLLM's own response types or an `ErrorResponse`.
2. `RoleStatus`: what an engine replica says about itself, for `/health` and for tests and benchmarks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionStreamResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionStreamResponse

OpenAIRequest = ChatCompletionRequest | CompletionRequest
# The typed chunk of a stream, per request type (for Python callers of the router's handle API).
STREAM_CHUNK_TYPES: dict[type, type] = {ChatCompletionRequest: ChatCompletionStreamResponse,
                                        CompletionRequest: CompletionStreamResponse}


class RoleStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: str  # prefill, decode or collocated
    engine_id: str
    is_engine_alive: bool
    transfer_backend: str | None = None  # prefill and decode
    kv_store: str | None = None  # prefill on the object_store backend: its KV store's actor name
