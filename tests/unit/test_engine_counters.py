"""The counting stat logger adds up what vLLM reports per step."""

from __future__ import annotations

from vllm.v1.metrics.stats import IterationStats, PrefillStats, SchedulerStats

from deployments.engine_counters import counting_stat_logger


def _prompt_step(num_prompt_tokens: int, num_external: int) -> IterationStats:
    """A step in which one prompt finished, `num_external` of its tokens counted by vLLM as loaded."""
    iteration = IterationStats()
    iteration.prompt_token_stats.update_from_output(
        PrefillStats(num_prompt_tokens=num_prompt_tokens, num_computed_tokens=num_prompt_tokens - num_external,
                     num_cached_tokens=num_external, num_local_cached_tokens=0,
                     num_external_cached_tokens=num_external))
    return iteration


def test_counts_prompt_tokens_by_source_and_connector_transfers():
    factory, accumulator = counting_stat_logger()
    logger = factory(vllm_config=None)

    iteration = _prompt_step(300, num_external=300)
    iteration.num_generation_tokens = 1
    scheduler = SchedulerStats(num_running_reqs=1, kv_cache_usage=0.25, kv_connector_stats={
        "transfer_duration": [0.002], "bytes_transferred": [5898240], "num_failed_transfers": [],
        "num_kv_expired_reqs": []})
    logger.record(scheduler, iteration)
    logger.record(SchedulerStats(), None)

    counters = accumulator.snapshot()
    assert counters.num_prompt_tokens == 300
    assert counters.num_prompt_tokens_external == 300
    assert counters.num_prompt_tokens_computed == 0
    assert counters.num_generation_tokens == 1
    assert counters.num_kv_transfers == 1
    assert counters.num_kv_bytes_transferred == 5898240
    # gauges follow the latest step
    assert counters.num_running_requests == 0 and counters.kv_cache_usage == 0.0


def test_nixl_failures_and_expiries_count_as_vllm_counts_them_and_reach_the_metrics_sink():
    seen = []
    factory, accumulator = counting_stat_logger(on_transfer_stats=seen.append)
    logger = factory(vllm_config=None)
    nixl_step = {"transfer_duration": [0.01, 0.02], "bytes_transferred": [100, 200], "num_failed_transfers": [1],
                 "num_failed_handshakes": [1], "num_failed_notifications": [], "num_kv_expired_reqs": [1],
                 "post_duration": [0.001, 0.001], "num_descriptors": [3, 3]}
    logger.record(SchedulerStats(kv_connector_stats=nixl_step), None)

    counters = accumulator.snapshot()
    assert (counters.num_kv_transfers, counters.num_kv_bytes_transferred) == (2, 300)
    assert counters.num_kv_failed_transfers == 2  # a failed read or handshake is a failed transfer
    assert counters.num_kv_expired_requests == 1
    assert abs(counters.kv_load_seconds - 0.03) < 1e-9
    assert len(seen) == 1 and seen[0].num_bytes == 300


def test_each_transfer_keeps_its_own_time_and_only_the_latest_are_kept(monkeypatch):
    import deployments.engine_counters as engine_counters

    monkeypatch.setattr(engine_counters, "NUM_RECENT_TRANSFERS", 3)
    factory, accumulator = counting_stat_logger()
    logger = factory(vllm_config=None)
    # 1. Two steps report four loads: a sum would hide the slow one; the values keep it.
    for durations in ([0.01, 0.02], [0.5, 0.03]):
        logger.record(SchedulerStats(kv_connector_stats={"transfer_duration": durations,
                                                         "bytes_transferred": [1] * len(durations)}), None)
    # 2. Bounded: the oldest is gone, the order is the engine's.
    assert accumulator.recent_transfer_seconds() == [0.02, 0.5, 0.03]
    assert accumulator.snapshot().num_kv_transfers == 4


def test_a_load_that_failed_inside_its_step_counts_its_tokens_as_computed():
    # vLLM counted 299 tokens as loaded when it scheduled the request (an in-step load: the last one is computed),
    # then the load failed and the engine computed all 300 again: the counters say so.
    factory, accumulator = counting_stat_logger()
    logger = factory(vllm_config=None)
    logger.record(SchedulerStats(kv_connector_stats={"num_failed_transfers": [1], "failed_in_step_tokens": [299]}),
                  _prompt_step(300, num_external=299))

    counters = accumulator.snapshot()
    assert (counters.num_prompt_tokens_computed, counters.num_prompt_tokens_external) == (300, 0)
    assert counters.num_kv_failed_transfers == 1 and counters.num_kv_transfers == 0
