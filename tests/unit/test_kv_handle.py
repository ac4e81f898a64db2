"""The KV handle is the only reader and writer of vLLM's kv_transfer_params dict."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kv_transfer.handle import HANDLE_VERSION, KVHandle, KVHandleError, prefill_kv_transfer_params

PREFILL_RESPONSE_PARAMS = {
    "do_remote_prefill": True,
    "do_remote_decode": False,
    "remote_block_ids": [[3, 4]],
    "remote_engine_id": "prefill-0-abc",
    "remote_request_id": "chatcmpl-r1-prefill",
    "remote_host": "127.0.0.1",
    "remote_port": 5601,
    "tp_size": 1,
}


def test_round_trip_keeps_the_connector_params_unchanged():
    handle = KVHandle.from_kv_transfer_params(PREFILL_RESPONSE_PARAMS, backend="nixl", request_id="r1",
                                              num_prompt_tokens=200)
    assert handle.version == HANDLE_VERSION
    assert handle.num_blocks == 2
    assert handle.to_kv_transfer_params() == PREFILL_RESPONSE_PARAMS
    # A copy: decode's vLLM may mutate the dict it receives (it pops keys) without touching the handle.
    handle.to_kv_transfer_params().clear()
    assert handle.to_kv_transfer_params() == PREFILL_RESPONSE_PARAMS


def test_handle_is_frozen_and_rejects_unknown_fields():
    handle = KVHandle.from_kv_transfer_params(PREFILL_RESPONSE_PARAMS, backend="nixl", request_id="r1",
                                              num_prompt_tokens=200)
    with pytest.raises(ValidationError):
        handle.request_id = "r2"
    with pytest.raises(ValidationError):
        KVHandle(backend="nixl", request_id="r1", num_prompt_tokens=1, connector_params={}, extra=1)


@pytest.mark.parametrize("params", [None, {}, {**PREFILL_RESPONSE_PARAMS, "remote_host": None}])
def test_missing_params_are_a_clear_error(params):
    with pytest.raises(KVHandleError, match="r1"):
        KVHandle.from_kv_transfer_params(params, backend="nixl", request_id="r1", num_prompt_tokens=5)


def test_a_handle_of_another_version_is_refused():
    handle = KVHandle(version=HANDLE_VERSION + 1, backend="nixl", request_id="r1", num_prompt_tokens=5,
                      connector_params=PREFILL_RESPONSE_PARAMS)
    with pytest.raises(KVHandleError, match="version"):
        handle.to_kv_transfer_params()


def test_prefill_params_ask_for_a_remote_decoder():
    params = prefill_kv_transfer_params()
    assert params["do_remote_decode"] is True and params["do_remote_prefill"] is False
