"""Trace reading, scaling and synthesis, on small fixtures (the SLO arithmetic: tests/unit/test_slo.py)."""

from __future__ import annotations

import pytest

from bench.traces import Scaling, TraceRequest, poisson_trace, read_trace, scale_trace, write_splitwise_csv

AZURE_FIXTURE = """TIMESTAMP,ContextTokens,GeneratedTokens
2023-11-16 18:15:46.6805900,374,44
2023-11-16 18:15:50.9951690,396,109
2023-11-16 18:15:48.0000000,4000,0
"""

SPLITWISE_FIXTURE = """request_id,request_type,application_id,arrival_timestamp,batch_size,prompt_size,token_size
0,2,0,10.5,1,100,20
1,2,0,11.0,1,3000,400
"""


def test_an_azure_trace_becomes_requests_relative_to_its_first_arrival(tmp_path):
    path = tmp_path / "azure.csv"
    path.write_text(AZURE_FIXTURE)
    requests = read_trace(path)
    assert [(r.arrival_s, r.prompt_tokens, r.output_tokens) for r in requests] == [
        (0.0, 374, 44), (pytest.approx(1.31941), 4000, 1), (pytest.approx(4.314579), 396, 109)]  # sorted; 0 → 1


def test_a_splitwise_trace_round_trips(tmp_path):
    source = tmp_path / "splitwise.csv"
    source.write_text(SPLITWISE_FIXTURE)
    requests = read_trace(source)
    assert requests == [TraceRequest(request_id=0, arrival_s=0.0, prompt_tokens=100, output_tokens=20),
                        TraceRequest(request_id=1, arrival_s=0.5, prompt_tokens=3000, output_tokens=400)]
    copy = tmp_path / "copy.csv"
    write_splitwise_csv(requests, copy)
    assert copy.read_text().splitlines()[0] == (
        "request_id,request_type,application_id,arrival_timestamp,batch_size,prompt_size,token_size")
    assert read_trace(copy) == requests


def test_an_unknown_csv_is_refused_with_the_formats_named(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="SplitwiseSim.*Azure"):
        read_trace(path)


def test_scaling_takes_a_window_stretches_time_and_fits_token_counts():
    requests = [TraceRequest(request_id=i, arrival_s=float(i), prompt_tokens=1000 * (i + 1), output_tokens=50)
                for i in range(6)]
    scaled = scale_trace(requests, Scaling(start_s=1, duration_s=4, rate_factor=0.5, prompt_scale=0.5,
                                           max_prompt_tokens=1500, output_scale=0.1, max_requests=3))
    assert [(r.request_id, r.arrival_s, r.prompt_tokens, r.output_tokens) for r in scaled] == [
        (0, 0.0, 1000, 5), (1, 2.0, 1500, 5), (2, 4.0, 1500, 5)]


def test_poisson_arrivals_have_the_asked_rate_and_sizes_from_the_source():
    sizes = [TraceRequest(request_id=0, arrival_s=0, prompt_tokens=300, output_tokens=32),
             TraceRequest(request_id=1, arrival_s=0, prompt_tokens=900, output_tokens=8)]
    trace = poisson_trace(rate_per_s=4.0, num_requests=2000, sizes_from=sizes, seed=1)
    assert trace[0].arrival_s == 0.0
    assert all(a.arrival_s <= b.arrival_s for a, b in zip(trace, trace[1:]))
    assert len(trace) / trace[-1].arrival_s == pytest.approx(4.0, rel=0.1)
    assert {(r.prompt_tokens, r.output_tokens) for r in trace} == {(300, 32), (900, 8)}
    assert poisson_trace(rate_per_s=4.0, num_requests=2000, sizes_from=sizes, seed=1) == trace  # reproducible
