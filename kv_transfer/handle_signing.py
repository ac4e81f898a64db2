"""Signed KV handles: decode and prefill's release accept only handles that this app's prefill replicas made.

A KV handle points at KV: a NIXL peer (host, port, engine id, block ids) or a transfer in a named KV store. A caller
inside the cluster that could forge one could make decode read another request's KV, or connect to a NIXL peer of
its choosing, or make prefill drop another request's KV early. So prefill signs every handle it makes (HMAC-SHA256
over the handle's canonical JSON, with a key that only the app's replicas are given), and decode and release verify
the signature before they act on a handle: decode computes the prompt of a handle it cannot trust itself (safe,
and right for the honest case of a handle from the previous deploy's prefill during a redeploy), and release
ignores it.

The key: `transfer.handle_key_env` names an environment variable (SPLITSERVE_KV_HANDLE_KEY) for operators who want
one key across redeploys or apps; without it the builder makes a fresh random key for each deploy.
"""

from __future__ import annotations

import hashlib
import hmac
import json

from kv_transfer.handle import KVHandle


class HandleSigner:
    def __init__(self, key: str):
        if len(key) < 32:
            raise ValueError("a KV handle key must have at least 32 characters")
        self._key = key.encode()

    def sign(self, handle: KVHandle) -> KVHandle:
        return handle.model_copy(update={"signature": self._digest(handle)})

    def is_authentic(self, handle: KVHandle) -> bool:
        """Whether `handle` carries this app's signature over exactly its contents (compared in constant time)."""
        expected = self._digest(handle).encode()
        return bool(handle.signature) and hmac.compare_digest(handle.signature.encode(), expected)

    def _digest(self, handle: KVHandle) -> str:
        canonical = json.dumps(handle.model_dump(exclude={"signature"}), sort_keys=True, separators=(",", ":"),
                               default=str)
        return hmac.new(self._key, canonical.encode(), hashlib.sha256).hexdigest()
