"""The counting stat logger adds up what vLLM reports per step."""

from __future__ import annotations

from vllm.v1.metrics.stats import IterationStats, PrefillStats, SchedulerStats

from deployments.engine_counters import counting_stat_logger


def test_counts_prompt_tokens_by_source_and_connector_transfers():
    factory, accumulator = counting_stat_logger()
    logger = factory(vllm_config=None)

    iteration = IterationStats()
    iteration.prompt_token_stats.update_from_output(
        PrefillStats(num_prompt_tokens=300, num_computed_tokens=0, num_cached_tokens=300,
                     num_local_cached_tokens=0, num_external_cached_tokens=300))
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
