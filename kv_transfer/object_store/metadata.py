"""Typed metadata between the connector's halves, every engine step: scheduler -> worker (what to save and load),
and worker -> scheduler (the receipts of transfers now wholly in the object store), through vLLM's own channels."""

from __future__ import annotations

from dataclasses import dataclass, field

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata, KVConnectorWorkerMetadata


@dataclass(frozen=True)
class SaveRequest:
    """Prefill: this step completes the request's prompt; stage blocks `block_ids` of every layer."""

    request_id: str
    transfer_key: str
    block_ids: tuple[int, ...]


@dataclass(frozen=True)
class LoadRequest:
    """Decode: fetch `transfer_key` from `source` (by its receipt when the handle carries one) and write its
    blocks, from `first_remote_block` on, into `block_ids`. `is_in_step`: before this step's forward pass, which
    computes the request's next token (else in the background, reported done in `get_finished`). No `block_ids`:
    nothing is read, the transfer is only released (decode computes the prompt itself)."""

    request_id: str
    source: str
    transfer_key: str
    num_remote_blocks: int
    first_remote_block: int
    block_ids: tuple[int, ...]
    receipt: str | None = None  # where the parts lie (receipt.py); None: claim them from the store
    is_in_step: bool = False
    num_tokens: int = 0  # the prompt tokens this load brings in (vLLM counts them as not computed here)


@dataclass
class SplitserveConnectorMetadata(KVConnectorMetadata):
    saves: list[SaveRequest] = field(default_factory=list)
    loads: list[LoadRequest] = field(default_factory=list)


@dataclass
class SplitserveWorkerMetadata(KVConnectorWorkerMetadata):
    """Prefill: transfer key -> receipt (receipt.py) for each transfer the worker finished putting this step."""

    receipts: dict[str, str] = field(default_factory=dict)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, SplitserveWorkerMetadata):
            for key, receipt in other.receipts.items():
                self.receipts.setdefault(key, receipt)
        return self
