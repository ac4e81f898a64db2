"""A transfer's receipt: where every part of it lies in Ray's object store, as plain text that rides in the KV handle,
so that decode fetches the parts without asking the KV store (no actor call on the request's path).

1. Prefill's sender puts each batch of parts (`ray.put`) and, once the last part is in, writes the receipt:
   for each object its id, its owner's address and status (what Ray itself sends when a reference is passed to a
   task), and for each part the object and position that hold it.
2. The receipt crosses from vLLM's worker process to its scheduler (the step's connector worker metadata), then
   the engine-core boundary (msgpack), the router and Ray Serve (pickle) inside RemoteKV, signed with the rest of
   the handle: it must be plain text, and nobody but the app can forge one.
3. Decode rebuilds the references and `ray.get`s them: a zero-copy map on the node that put them, a pull from it
   on another node. The KV store still holds its own references (lease, memory bound, release), so a receipt is
   good for as long as the transfer is; a part the store has let go of may still be readable (Ray evicts lazily:
   an object id never names other bytes), and one Ray evicted fails the load, and decode recomputes.

Ray has no public call for this: pickling a reference outside a task pins its object for the life of the process
(a leak of every transfer). The two private calls used here are the ones Ray's own serializer makes for a reference
inside a task's arguments, without that pin; Ray is pinned in pyproject.toml, and both the round trip and the
absence of a pin are tested against the installed Ray (tests/unit/test_receipt.py, test_transport_contract.py).
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import BaseModel, ConfigDict

RECEIPT_VERSION = 1


def _text(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _raw(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


class StoredObject(BaseModel):
    """One object a transfer's parts were put into: what Ray needs to rebuild a borrowed reference to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    object_id: str
    owner_address: str
    object_status: str


class Receipt(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: int = RECEIPT_VERSION
    objects: tuple[StoredObject, ...]
    # Part i lies in objects[parts[i][0]] at position parts[i][1] of the list that object holds.
    parts: tuple[tuple[int, int], ...]

    def to_text(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_text(cls, text: str) -> Receipt:
        receipt = cls.model_validate_json(text)
        if receipt.version != RECEIPT_VERSION:
            raise ValueError(f"receipt version {receipt.version} is not supported (this build reads {RECEIPT_VERSION})")
        return receipt


def write_receipt(located: list[tuple[Any, int]]) -> Receipt:
    """The receipt of parts in order, each as (the ObjectRef of the list that holds it, its position there)."""
    import ray

    core_worker = ray._private.worker.global_worker.core_worker
    index_of: dict[Any, int] = {}
    objects: list[StoredObject] = []
    parts = []
    for ref, position in located:
        if ref not in index_of:
            index_of[ref] = len(objects)
            serialized, owner_address, object_status = core_worker.serialize_object_ref(ref)
            objects.append(StoredObject(object_id=_text(serialized.binary()), owner_address=_text(owner_address),
                                        object_status=_text(object_status)))
        parts.append((index_of[ref], position))
    return Receipt(objects=tuple(objects), parts=tuple(parts))


def read_refs(receipt: Receipt) -> list[Any]:
    """The ObjectRefs of the receipt's objects, registered in this process as borrowed from their owner."""
    from ray._private.serialization import _object_ref_deserializer

    return [_object_ref_deserializer(_raw(stored.object_id), "", _raw(stored.owner_address),
                                     _raw(stored.object_status), None) for stored in receipt.objects]
