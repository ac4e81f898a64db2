"""Only handles signed with the app's key are authentic: any change to a signed handle, another key, no signature
or a garbled one is not, and a signed handle stays authentic after the trip through Ray (pickling)."""

from __future__ import annotations

import pickle
import time

import pytest

from kv_transfer.handle import KVHandle, RemoteKV, remote_kv_to_params
from kv_transfer.handle_signing import HandleSigner

KEY = "k" * 64


def _handle() -> KVHandle:
    remote = RemoteKV(source="splitserve-kv-store-prefill-0-abc", transfer_key="req-1-0", num_tokens=200,
                      num_blocks=2)
    return KVHandle(backend="object_store", request_id="req-1", num_prompt_tokens=200,
                    prefill_engine_id="prefill-0-abc", connector_params=remote_kv_to_params(remote))


def test_a_signed_handle_is_authentic_also_after_pickling():
    signed = HandleSigner(KEY).sign(_handle())
    assert signed.signature
    assert HandleSigner(KEY).is_authentic(signed)
    assert HandleSigner(KEY).is_authentic(pickle.loads(pickle.dumps(signed)))


@pytest.mark.parametrize("change", [
    {"request_id": "req-2"},
    {"prefill_engine_id": "prefill-1-def"},
    {"num_prompt_tokens": 201},
    {"connector_params": {**_handle().connector_params,
                          "splitserve": {**_handle().connector_params["splitserve"], "transfer_key": "req-2-0"}}},
])
def test_any_change_to_a_signed_handle_makes_it_not_authentic(change):
    signed = HandleSigner(KEY).sign(_handle())
    assert not HandleSigner(KEY).is_authentic(signed.model_copy(update=change))


@pytest.mark.parametrize("signature", ["", "0" * 64, "é" * 64])
def test_missing_or_garbled_signatures_are_not_authentic(signature):
    assert not HandleSigner(KEY).is_authentic(_handle().model_copy(update={"signature": signature}))


def test_another_key_does_not_verify():
    assert not HandleSigner("x" * 64).is_authentic(HandleSigner(KEY).sign(_handle()))


def test_a_handle_is_fresh_for_half_its_lease():
    handle = _handle().model_copy(update={"issued_at": time.time()})
    assert handle.is_fresh(lease_s=30)
    assert not handle.model_copy(update={"issued_at": time.time() - 16}).is_fresh(lease_s=30)


def test_short_keys_are_refused():
    with pytest.raises(ValueError, match="32"):
        HandleSigner("short")
