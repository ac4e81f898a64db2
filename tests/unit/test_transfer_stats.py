"""kv_transfer/stats.py: the one reader of vLLM's connector-stats keys, for both backends."""

from __future__ import annotations

import torch

from kv_transfer import stats
from kv_transfer.stats import TransferStats
from kv_transfer.object_store.worker_side import WorkerSide


def test_an_empty_or_missing_interval_is_empty():
    assert TransferStats.from_connector_stats(None).is_empty
    assert TransferStats.from_connector_stats(stats.empty_connector_stats()).is_empty


def test_our_connectors_keys_read_as_transfers_and_send_waits():
    data = stats.empty_connector_stats()
    data[stats.TRANSFER_DURATION] += [0.5]
    data[stats.BYTES_TRANSFERRED] += [4096]
    data[stats.SEND_WAIT_DURATION] += [0.25, 0.25]
    parsed = TransferStats.from_connector_stats(data)
    assert (parsed.num_transfers, parsed.num_bytes, parsed.total_send_wait_seconds) == (1, 4096, 0.5)
    assert parsed.summary() == {"num_transfers": 1, "bytes_transferred": 4096, "num_failed_transfers": 0,
                                "send_wait_seconds": 0.5}


def test_a_failure_alone_is_not_an_empty_interval():
    data = stats.empty_connector_stats()
    data[stats.NUM_FAILED_TRANSFERS].append(1)
    assert not TransferStats.from_connector_stats(data).is_empty


def test_tokens_of_a_failed_in_step_load_read_as_recomputed():
    data = stats.empty_connector_stats()
    data[stats.FAILED_IN_STEP_TOKENS] += [9, 30]
    parsed = TransferStats.from_connector_stats(data)
    assert parsed.num_recomputed_tokens == 39 and not parsed.is_empty


def test_the_worker_writes_exactly_the_keys_this_module_reads():
    worker = WorkerSide(lambda: None, num_blocks=2, load_timeout_s=1)
    worker.register_kv_caches({"layer": torch.zeros(2, 1, 4, 2)})
    assert set(worker.take_stats()) == set(stats.OBJECT_STORE_KEYS)
