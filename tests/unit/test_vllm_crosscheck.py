"""bench/vllm_crosscheck.py: a cell as vLLM's timed trace, vLLM's detailed results read back, and both clients
compared request by request."""

from __future__ import annotations

import json
import math

import pytest

from bench.load_generator import RequestRecord
from bench.traces import TraceRequest
from bench.vllm_crosscheck import compare_clients, our_values, timed_trace_lines, vllm_values
from bench.workloads import Workload

CELL = Workload(name="conv@1/s", trace="conv", kind="open", rate_per_s=1.0,
                requests=(TraceRequest(request_id=7, arrival_s=0.0, prompt_tokens=20, output_tokens=3),
                          TraceRequest(request_id=8, arrival_s=1.5, prompt_tokens=16, output_tokens=1),
                          TraceRequest(request_id=9, arrival_s=2.25, prompt_tokens=33, output_tokens=5)))


def test_a_cell_becomes_a_timed_trace_whose_prompts_share_no_prefix():
    entries = [json.loads(line) for line in timed_trace_lines(CELL)]
    assert [(e["timestamp"], e["input_length"], e["output_length"]) for e in entries] == [
        (0.0, 20, 3), (1.5, 16, 1), (2.25, 33, 5)]
    # One hash id per 16 prompt tokens (rounded up), never reused: vLLM expands each id into its own tokens.
    assert [e["hash_ids"] for e in entries] == [[0, 1], [2], [3, 4, 5]]


def test_vllms_detailed_results_are_read_per_request_and_a_failure_is_none():
    detailed = {"ttfts": [0.2, 0.0, 0.4], "latencies": [0.6, 0.0, 1.2], "output_lens": [3, 0, 5],
                "errors": ["", "timeout", ""]}
    first, failed, last = vllm_values(detailed)
    assert first == pytest.approx({"ttft": 0.2, "tpot": 0.2, "e2e": 0.6})  # (0.6 - 0.2) / 2 gaps
    assert failed is None
    assert last == pytest.approx({"ttft": 0.4, "tpot": 0.2, "e2e": 1.2})


def _record(request_id: int, ttft: float, e2e: float, num_output: int) -> RequestRecord:
    gaps = [(e2e - ttft) / (num_output - 1)] * (num_output - 1) if num_output > 1 else []
    return RequestRecord(workload=CELL.name, request_id=request_id, arrival_s=0.0, start_s=0.0, prompt_tokens=16,
                         output_tokens=num_output, ttft_s=ttft, e2e_s=e2e, tbt_s=gaps)


def test_both_clients_are_compared_in_the_cells_order_over_what_both_served():
    # Ours: request 9 then 7 came back (any order); 8 is missing, so it counts as not served.
    ours = our_values(CELL, [_record(9, 0.8, 2.4, 5), _record(7, 0.4, 1.2, 3)])
    assert ours[1] is None and ours[0]["ttft"] == pytest.approx(0.4) and ours[2]["e2e"] == pytest.approx(2.4)
    theirs = [{"ttft": 0.2, "tpot": 0.2, "e2e": 0.6}, {"ttft": 0.1, "tpot": math.nan, "e2e": 0.1},
              {"ttft": 0.4, "tpot": 0.2, "e2e": 1.2}]
    found = compare_clients(ours, theirs)
    assert (found["num_requests"], found["num_failed_ours"], found["num_failed_vllm"]) == (3, 1, 0)
    # Ours is exactly twice vLLM's on both requests both served: every ratio is 2, its interval too.
    for key in ("ttft_p50", "ttft_p90", "tpot_p50", "e2e_p90"):
        assert found["metrics"][key]["num_pairs"] == 2
        assert (found["metrics"][key]["ratio"], found["metrics"][key]["low"],
                found["metrics"][key]["high"]) == pytest.approx((2.0, 2.0, 2.0)), key
        assert found["metrics"][key]["is_separable"]
