"""The KV handle: the one message that crosses prefill -> router -> decode.

vLLM's connectors speak through a free-form `kv_transfer_params` dict. This module is the only place that reads
or writes that dict; everything else in splitserve passes a frozen, versioned `KVHandle`.

Ownership: from the moment prefill returns a handle until decode's engine has read the blocks, prefill's engine
owns them (held on a lease of `transfer.kv_lease_s` seconds, then freed even if nobody came).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

HANDLE_VERSION = 1

# The keys vLLM's NixlConnector needs on the decode side to find the prefill engine's blocks.
_NIXL_REQUIRED_KEYS = ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids")


class KVHandleError(ValueError):
    """A handle that decode must not use: wrong version, wrong backend, missing fields."""


class KVHandle(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = HANDLE_VERSION
    backend: Literal["nixl"]
    request_id: str
    num_prompt_tokens: int = Field(ge=1)
    # vLLM's kv_transfer_params exactly as the prefill engine's connector returned them.
    connector_params: dict[str, Any]

    @classmethod
    def from_kv_transfer_params(
        cls, params: dict[str, Any] | None, *, backend: Literal["nixl"], request_id: str, num_prompt_tokens: int
    ) -> KVHandle:
        if not params:
            raise KVHandleError(f"prefill of {request_id} returned no kv_transfer_params: is the KV connector on?")
        missing = [key for key in _NIXL_REQUIRED_KEYS if params.get(key) is None]
        if missing:
            raise KVHandleError(f"prefill of {request_id} returned kv_transfer_params without {missing}")
        return cls(
            backend=backend, request_id=request_id, num_prompt_tokens=num_prompt_tokens, connector_params=dict(params)
        )

    def to_kv_transfer_params(self) -> dict[str, Any]:
        """The params that make decode's connector pull these blocks instead of recomputing the prompt."""
        if self.version != HANDLE_VERSION:
            raise KVHandleError(f"KV handle version {self.version} is not supported (this build reads {HANDLE_VERSION})")
        return dict(self.connector_params)

    @property
    def num_blocks(self) -> int:
        groups = self.connector_params.get("remote_block_ids") or []
        return sum(len(group) for group in groups)


def prefill_kv_transfer_params() -> dict[str, Any]:
    """What the prefill request carries: 'run the prompt, keep the KV for a remote decoder'."""
    return {
        "do_remote_decode": True,
        "do_remote_prefill": False,
        "remote_engine_id": None,
        "remote_block_ids": None,
        "remote_host": None,
        "remote_port": None,
    }
