"""What crosses between the router and the engine replicas, typed. (The KV handle, which crosses prefill → router →
decode, is kv_transfer/handle.py's `KVHandle`.)

1. `OpenAIRequest`: the request the router parsed, as vLLM's own pydantic type; prefill, decode and collocated
   replicas take it as it is and answer with vLLM's own response types or an `ErrorResponse`.
2. `Dispatch`: what the router's scheduler adds to a call to an engine replica: the replica it chose (Serve's
   request router reads it: replica_choice.py), the prompt tokens that replica will compute, and the router's id
   and dispatch number: the replica's load reports give each router its own share, which that router replaces
   with what it knows now.
3. `LoadReport`: an engine replica's load, published through Serve's routing stats (`record_routing_stats`) and
   read by every router replica's scheduler (deployments/scheduler.py converts it, in that one place).
4. `RoleStatus`: what an engine replica says about itself, for `/health` and for tests and benchmarks.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict
from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest, ChatCompletionStreamResponse
from vllm.entrypoints.openai.completion.protocol import CompletionRequest, CompletionStreamResponse

OpenAIRequest = ChatCompletionRequest | CompletionRequest
# The typed chunk of a stream, per request type (for Python callers of the router's handle API).
STREAM_CHUNK_TYPES: dict[type, type] = {ChatCompletionRequest: ChatCompletionStreamResponse,
                                        CompletionRequest: CompletionStreamResponse}


class Dispatch(BaseModel):
    model_config = ConfigDict(frozen=True)

    router_id: str  # the router replica that sent it (its Serve replica id)
    seq: int  # that router's dispatch number, rising: its key for the request in its load book
    replica_id: str | None = None  # the engine replica chosen for it; None: Serve's own choice
    num_prompt_tokens: int = 0  # prompt tokens this engine will compute (0 when the KV arrives from prefill)


class LoadReport(BaseModel):
    """An engine replica's load now. Published as a plain dict (Serve's routing stats are compared and broadcast
    by its controller); `from_routing_stats` reads it back."""

    model_config = ConfigDict(frozen=True)

    engine_id: str
    role: str  # prefill, decode (collocated engines are not scheduled)
    num_pending_prompt_tokens: int = 0  # prompt tokens accepted and not yet computed
    num_requests: int = 0  # requests accepted and not finished (running, waiting, or waiting for KV)
    num_running: int = 0  # of those, vLLM's running requests (its last step)
    kv_usage: float = 0.0  # vLLM's KV-cache usage, 0 to 1
    # Prompt tokens the engine has computed since it started (vLLM's own count, every router's requests): the
    # routers take its growth between reports as the engine's prompt throughput (scheduling/loads.py).
    num_prompt_tokens_computed: int = 0
    # Per router replica, its share of the counts above: (requests it sent that are held here, their prompt tokens
    # pending). A router replaces its own share with what it knows now of its requests (scheduling/loads.py).
    by_router: dict[str, tuple[int, int]] = {}
    # Pure decode steps (no prompt computed in them) since the previous report: [batch size, mean seconds, count].
    decode_steps: list[tuple[int, float, int]] = []

    def to_routing_stats(self) -> dict:
        return {"load": self.model_dump(mode="json")}

    @classmethod
    def from_routing_stats(cls, stats: dict | None) -> LoadReport | None:
        load = (stats or {}).get("load")
        return None if load is None else cls.model_validate(load)


class RoleStatus(BaseModel):
    model_config = ConfigDict(frozen=True)

    role: str  # prefill, decode or collocated
    engine_id: str
    is_engine_alive: bool
    transfer_backend: str | None = None  # prefill and decode
    kv_store: str | None = None  # prefill on the object_store backend: its KV store's actor name
    node_ip: str | None = None  # the Ray node the replica runs on (several nodes: which pool is where)
    side_channel: str | None = None  # NIXL: host:port its side channel listens on (what KV handles name)
