"""The KV handle: the one message that crosses prefill -> router -> decode.

vLLM's connectors speak through a free-form `kv_transfer_params` dict. This module is the only place that reads
or writes that dict; everything else in splitserve passes a frozen, versioned `KVHandle`.

Ownership: from the moment prefill returns a handle until decode's engine has read the blocks, prefill's engine
owns them (held on a lease of `transfer.kv_lease_s` seconds, then freed even if nobody came).
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from kv_transfer.config import Backend

HANDLE_VERSION = 1
# The keys each backend's connector needs on the decode side to find the prefill engine's KV.
_REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    "nixl": ("remote_engine_id", "remote_request_id", "remote_host", "remote_port", "remote_block_ids"),
    "object_store": ("splitserve",),
}
# Where our own connector keeps its typed RemoteKV inside kv_transfer_params.
_SPLITSERVE_KEY = "splitserve"


class KVHandleError(ValueError):
    """A handle that decode must not use: wrong version, wrong backend, missing fields."""


class KVHandle(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = HANDLE_VERSION
    backend: Backend
    request_id: str
    num_prompt_tokens: int = Field(ge=1)
    # Which prefill engine holds the KV: for logs, traces and the benchmark's per-replica timeline.
    prefill_engine_id: str = ""
    # vLLM's kv_transfer_params exactly as the prefill engine's connector returned them.
    connector_params: dict[str, Any]
    # When prefill made the handle (wall clock, seconds): its KV is held on a lease that starts then.
    issued_at: float = 0.0
    # HMAC of everything above, by the prefill replica that made the handle (handle_signing.py).
    signature: str = ""

    @classmethod
    def from_kv_transfer_params(
        cls, params: dict[str, Any] | None, *, backend: Backend, request_id: str, num_prompt_tokens: int,
        prefill_engine_id: str = "",
    ) -> KVHandle:
        if not params:
            raise KVHandleError(f"prefill of {request_id} returned no kv_transfer_params: is the KV connector on?")
        missing = [key for key in _REQUIRED_KEYS[backend] if params.get(key) is None]
        if missing:
            raise KVHandleError(f"prefill of {request_id} returned kv_transfer_params without {missing}")
        return cls(
            backend=backend, request_id=request_id, num_prompt_tokens=num_prompt_tokens,
            prefill_engine_id=prefill_engine_id, connector_params=dict(params), issued_at=time.time(),
        )

    def is_fresh(self, lease_s: float) -> bool:
        """Whether at least half of the KV's lease is left. Decode must not start a load later: NIXL reads
        prefill's blocks one-sidedly, and blocks whose lease ran out may already hold another request's KV (seen:
        a request that waited 50 s for a replacement decode replica decoded garbage). Once decode's engine has the
        request, its heartbeats renew the lease; half a lease leaves them ample time to start."""
        return time.time() - self.issued_at < lease_s / 2

    def to_kv_transfer_params(self) -> dict[str, Any]:
        """The params that make decode's connector pull these blocks instead of recomputing the prompt."""
        if self.version != HANDLE_VERSION:
            raise KVHandleError(f"KV handle version {self.version} is not supported (this build reads {HANDLE_VERSION})")
        return dict(self.connector_params)

    @property
    def object_store_key(self) -> str | None:
        """The transfer's key in prefill's KV store (object_store backend), else None."""
        if self.backend != "object_store":
            return None
        return RemoteKV.model_validate(self.connector_params[_SPLITSERVE_KEY]).transfer_key

    @property
    def num_blocks(self) -> int:
        if self.backend == "object_store":
            return RemoteKV.model_validate(self.connector_params[_SPLITSERVE_KEY]).num_blocks
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


class RemoteKV(BaseModel):
    """What our connector's decode half needs to fetch a prompt's KV: it travels inside kv_transfer_params."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = HANDLE_VERSION
    source: str  # the KV store that holds the blocks (prefill's own)
    transfer_key: str
    num_tokens: int = Field(ge=1)
    num_blocks: int = Field(ge=1)
    # Where the parts lie in Ray's object store (kv_transfer/object_store/receipt.py), so that decode reads them
    # without a store call; None when the receipt missed its engine step (decode claims them instead).
    receipt: str | None = None


def remote_kv_to_params(remote: RemoteKV) -> dict[str, Any]:
    """The prefill engine's answer: decode should load `remote` instead of computing the prompt."""
    return {"do_remote_prefill": True, "do_remote_decode": False, _SPLITSERVE_KEY: remote.model_dump()}


def attach_receipt(params: dict[str, Any], receipt: str) -> None:
    """Adds the transfer's receipt to params `remote_kv_to_params` made, in place: vLLM asks a connector for a
    finished request's params before it hands it the step's worker output, where the receipt arrives, and sends
    the params on only after both (as it adds its own `remote_prefill_cached_tokens` to them in between)."""
    params[_SPLITSERVE_KEY]["receipt"] = receipt


def remote_kv_from_params(params: dict[str, Any] | None) -> RemoteKV | None:
    """RemoteKV if these params ask decode to load KV from our connector, else None."""
    if not params or not params.get("do_remote_prefill") or _SPLITSERVE_KEY not in params:
        return None
    remote = RemoteKV.model_validate(params[_SPLITSERVE_KEY])
    if remote.version != HANDLE_VERSION:
        raise KVHandleError(f"remote KV version {remote.version} is not supported (this build reads {HANDLE_VERSION})")
    return remote


def is_remote_decode_request(params: dict[str, Any] | None) -> bool:
    """Whether a prefill-side request asks to keep its KV for a remote decoder."""
    return bool(params and params.get("do_remote_decode"))
