"""deployments/step_trace.py: one line per engine step, only when asked for."""

from __future__ import annotations

from vllm.v1.metrics.stats import IterationStats, PrefillStats, SchedulerStats

from deployments.step_trace import COLUMNS, STEP_TRACE_DIR_ENV, step_trace_logger, step_trace_path


def test_off_unless_the_directory_is_set(monkeypatch, tmp_path):
    monkeypatch.delenv(STEP_TRACE_DIR_ENV, raising=False)
    assert step_trace_path("prefill", "prefill-0-ab") is None
    monkeypatch.setenv(STEP_TRACE_DIR_ENV, str(tmp_path))
    assert step_trace_path("prefill", "prefill-0-ab") == tmp_path / "prefill-prefill-0-ab.steps.tsv"


def test_each_step_is_a_line_a_prompt_step_then_an_idle_poll(tmp_path):
    path = tmp_path / "trace" / "prefill-x.steps.tsv"
    logger = step_trace_logger(path)(vllm_config=None)
    # 1. A step that finished one 300-token prompt, with a NIXL transfer reported, two more waiting.
    iteration = IterationStats()
    iteration.prompt_token_stats.update_from_output(
        PrefillStats(num_prompt_tokens=300, num_computed_tokens=300, num_cached_tokens=0,
                     num_local_cached_tokens=0, num_external_cached_tokens=0))
    iteration.time_to_first_tokens_iter.append(0.5)
    iteration.num_generation_tokens = 1
    logger.record(SchedulerStats(num_running_reqs=1, num_waiting_reqs=2, kv_cache_usage=0.25, kv_connector_stats={
        "transfer_duration": [0.002], "bytes_transferred": [100], "num_failed_transfers": [],
        "num_kv_expired_reqs": []}), iteration)
    # 2. An idle poll: no iteration, nothing scheduled.
    logger.record(SchedulerStats(), None)
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert lines[0] == list(COLUMNS)
    assert lines[1][1:] == ["1", "300", "1", "1", "2", "0.2500", "1"]
    assert lines[2][1:] == ["0", "0", "0", "0", "0", "0.0000", "0"]
    assert float(lines[1][0]) <= float(lines[2][0])
