"""bench/ttft_bound.py: the least TTFT a cell allows on one or two prompt engines."""

from __future__ import annotations

import csv

import pytest

from bench.load_generator import RequestRecord
from bench.result_files import write_requests_csv
from bench.slo import LinearFit, Reference, ReferenceFit
from bench.ttft_bound import cell_bounds, closed_loop_bounds, finish_times, report


def test_one_server_queues_what_two_servers_run_side_by_side():
    # Three 1 s jobs at t=0: one server ends them at 1, 2, 3; two at 1, 1, 2; a job after a gap starts on arrival.
    assert finish_times([0.0, 0.0, 0.0, 10.0], [1.0, 1.0, 1.0, 1.0], 1) == [1.0, 2.0, 3.0, 11.0]
    assert finish_times([0.0, 0.0, 0.0, 10.0], [1.0, 1.0, 1.0, 1.0], 2) == [1.0, 1.0, 2.0, 11.0]


def test_a_burst_costs_one_engine_more_than_two_and_a_trickle_costs_neither():
    burst = cell_bounds([0.0] * 10, [1000] * 10, slope_s=0.001)  # ten 1 s prompts at once
    assert burst[1][0] == pytest.approx(5.5)  # p50 of 1..10 s
    assert burst[2][0] == pytest.approx(3.0)  # p50 of 1,1,2,2,...,5,5 s
    trickle = cell_bounds([10.0 * i for i in range(10)], [1000] * 10, slope_s=0.001)
    assert trickle[1] == trickle[2] == (pytest.approx(1.0), pytest.approx(1.0))


def test_the_report_reads_a_comparison_folder(tmp_path):
    fit = ReferenceFit(num_requests=30, ttft=LinearFit(intercept_s=0.05, slope_s=0.002, floor_s=0.05, median_abs_error=0.1),
                       tpot=LinearFit(intercept_s=0.08, slope_s=0.0, floor_s=0.08, median_abs_error=0.1))
    (tmp_path / "reference.json").write_text(
        Reference(system="collocated", commit="abc", fits={"code": fit, "all": fit}).model_dump_json())
    write_requests_csv([RequestRecord(request_id=i, arrival_s=0.0, prompt_tokens=tokens, output_tokens=8,
                                      workload=cell)
                        for cell, tokens in (("code@0.4/s", 500), ("anchor-c1", 300)) for i in range(4)],
                       tmp_path / "requests_collocated.csv")
    with (tmp_path / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["system", "workload", "trace", "kind", "ttft_p50_ms",
                                                    "ttft_p90_ms", "concurrency", "throughput_tok_s"])
        writer.writeheader()
        writer.writerow({"system": "collocated", "workload": "code@0.4/s", "trace": "code", "kind": "open",
                         "ttft_p50_ms": 2500, "ttft_p90_ms": 4000})
        writer.writerow({"system": "collocated", "workload": "anchor-c1", "trace": "all", "kind": "closed",
                         "ttft_p50_ms": 700, "ttft_p90_ms": 800, "concurrency": 1, "throughput_tok_s": 5.0})
    text = report(tmp_path)
    ttft_table, closed_table = text.split("## Closed-loop cells")
    assert "anchor-c1" not in ttft_table  # closed-loop cells have no arrivals to queue
    # One user, 300 tokens at 2 ms and 7 gaps of 80 ms: 1.16 s a request, 8 tokens: 6.9 tokens/s either way.
    assert "| anchor-c1 | 1 | 300 / 8 | 6.9 | 6.9 | 1.00× | 0% | 5.0 |" in closed_table
    # Four 1 s prompts at once: one engine p50 2.5 s / p90 3.7 s, two engines 1.5 s / 2.0 s.
    assert "| code@0.4/s |" in text and "2.50 / 3.70 | 1.50 / 2.00 | 1.7× | 2.50 / 4.00 |" in text


def test_a_closed_loop_bound_on_one_prefill_engine_against_two_whole_engines():
    # Four users, 1 s of prompt and 2 s of decode steps each. Split-only: the prefill engine serves 1 request/s
    # (each user alone could go at 1/3 s). Two engines with two users each: 2 / (2 + 2) = 0.5 req/s apiece.
    bound = closed_loop_bounds(4, prompt_s=1.0, decode_s=2.0)
    assert bound["split_req_s"] == pytest.approx(1.0) and bound["two_engines_req_s"] == pytest.approx(1.0)
    assert bound["decode_share_for_parity"] == pytest.approx(0.0)
    # Longer prompts: prefill caps the split at 0.5 req/s against 2 * 2 / (4 + 2) = 0.667 for whole requests;
    # parity needs a quarter of the prompts on decode (the prefill engine's 0.5 req/s over 0.667).
    bound = closed_loop_bounds(4, prompt_s=2.0, decode_s=2.0)
    assert bound["split_req_s"] == pytest.approx(0.5) and bound["two_engines_req_s"] == pytest.approx(2 / 3)
    assert bound["decode_share_for_parity"] == pytest.approx(0.25)
    # One user: the same bound either way, its own request after request.
    one = closed_loop_bounds(1, prompt_s=1.0, decode_s=2.0)
    assert one["split_req_s"] == pytest.approx(one["two_engines_req_s"]) == pytest.approx(1 / 3)
