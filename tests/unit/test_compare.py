"""The comparison's arithmetic and outputs on small fixtures: workload cells from a trace, summary rows with SLO
attainment against each system's own uncontended cell, goodput, the report's ratios, and every figure file."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import plots, report
from bench.compare import SystemRun, summarize
from bench.load_generator import RequestRecord
from bench.traces import TraceRequest, scale_trace, scaling_for_rate, write_splitwise_csv
from bench.workloads import TRACE_FILES, Plan, TokenScaling


def _trace(tmp_path: Path) -> Path:
    # 40 requests, one every 0.5 s: a mean rate of 2 requests/s.
    requests = [TraceRequest(request_id=i, arrival_s=0.5 * i, prompt_tokens=100 + 10 * i, output_tokens=20)
                for i in range(40)]
    write_splitwise_csv(requests, tmp_path / TRACE_FILES["conv"])
    return tmp_path


def test_scaling_for_rate_replays_the_trace_at_the_asked_mean_rate():
    requests = [TraceRequest(request_id=i, arrival_s=0.5 * i, prompt_tokens=10, output_tokens=2) for i in range(40)]
    scaling = scaling_for_rate(requests, rate_per_s=0.5, duration_s=10, max_prompt_tokens=8)
    scaled = scale_trace(requests, scaling)
    assert len(scaled) == 5  # 0.5/s for 10 s
    assert scaling.rate_factor == pytest.approx(0.25)  # the source's 2/s slowed to 0.5/s
    assert [r.arrival_s for r in scaled] == pytest.approx([0, 2, 4, 6, 8])
    assert {r.prompt_tokens for r in scaled} == {8}
    with pytest.raises(ValueError, match="40 requests"):
        scaling_for_rate(requests, rate_per_s=5, duration_s=10)


def test_plan_expands_into_uncontended_open_loop_and_anchor_cells(tmp_path):
    plan = Plan(traces=("conv",), rates_per_s={"conv": (0.5, 1.0)}, duration_s=8, num_uncontended=3,
                anchor_concurrencies=(1, 2), num_anchor_requests_per_user=2, traces_dir=_trace(tmp_path),
                token_scaling={"conv": TokenScaling(prompt_scale=0.5, max_prompt_tokens=60, output_scale=1.0,
                                                    max_output_tokens=10)})
    cells = {cell.name: cell for cell in plan.workloads()}
    assert list(cells) == ["uncontended-conv", "conv@0.5/s", "conv@1/s", "anchor-c1", "anchor-c2"]
    assert [len(cells[name].requests) for name in cells] == [3, 4, 8, 2, 4]
    assert cells["conv@1/s"].scaling.rate_factor == pytest.approx(0.5)
    assert {r.prompt_tokens for r in cells["conv@1/s"].requests} <= set(range(50, 61))
    assert {r.output_tokens for r in cells["conv@1/s"].requests} == {10}
    # The uncontended cell is drawn from the loaded cells' own mix: first, middle and last of the busiest one.
    loaded = cells["conv@1/s"].requests
    assert [r.prompt_tokens for r in cells["uncontended-conv"].requests] == [
        loaded[0].prompt_tokens, loaded[4].prompt_tokens, loaded[7].prompt_tokens]
    assert {(r.prompt_tokens, r.output_tokens) for r in cells["anchor-c2"].requests} == {(300, 32)}


def _records(ttft_s: float, num: int, *, gap_s: float = 0.05, num_failed: int = 0) -> list[RequestRecord]:
    records = [RequestRecord(request_id=i, arrival_s=float(i), start_s=float(i), prompt_tokens=100,
                             output_tokens=5, ttft_s=ttft_s, tbt_s=[gap_s] * 4, e2e_s=ttft_s + 4 * gap_s)
               for i in range(num)]
    return records + [RequestRecord(request_id=num + i, arrival_s=0.0, start_s=0.0, prompt_tokens=0,
                                    output_tokens=0, error="timeout") for i in range(num_failed)]


def _runs_and_cells(tmp_path):
    cells = Plan(traces=("conv",), rates_per_s={"conv": (0.5, 1.0)}, duration_s=8, num_uncontended=3,
                 anchor_concurrencies=(1, 2), traces_dir=_trace(tmp_path)).workloads()
    baseline = SystemRun(name="collocated", description="", records={
        "uncontended-conv": _records(0.2, 3), "conv@0.5/s": _records(0.3, 4), "conv@1/s": _records(0.35, 8),
        "anchor-c1": _records(0.2, 3), "anchor-c2": _records(0.3, 6)})
    split = SystemRun(name="splitserve", description="", records={
        "uncontended-conv": _records(0.2, 3), "conv@0.5/s": _records(0.3, 4),
        "conv@1/s": _records(1.0, 8, num_failed=2),  # TTFT 5× its uncontended P90: beyond 3×
        "anchor-c1": _records(0.2, 3), "anchor-c2": _records(0.25, 6, gap_s=0.04)})
    return [baseline, split], cells


def test_summary_has_slo_attainment_against_each_systems_own_uncontended_cell_and_goodput(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    rows = {(row["system"], row["workload"]): row for row in summarize(runs, cells)}
    assert rows["collocated", "conv@1/s"]["slo_attainment"] == 1.0
    assert rows["collocated", "conv@1/s"]["goodput_req_s"] == 1.0
    assert rows["splitserve", "conv@0.5/s"]["slo_attainment"] == 1.0
    assert rows["splitserve", "conv@1/s"]["slo_attainment"] == 0.0
    assert rows["splitserve", "conv@1/s"]["num_errors"] == 2
    assert rows["splitserve", "conv@1/s"]["goodput_req_s"] == 0.5
    assert "goodput_req_s" not in rows["splitserve", "anchor-c2"]  # closed loop: no rate
    assert rows["splitserve", "anchor-c2"]["tbt_p50_ms"] == 40.0


def test_report_puts_ratios_against_the_baseline_side_by_side(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    rows = summarize(runs, cells)
    table = report.main_table(rows, "collocated")
    assert "| anchor-c2 | splitserve | 250 (0.83×) |" in table
    assert "| conv@1/s | splitserve | 1,000 (2.86×) |" in table
    goodput = report.goodput_table(rows)
    assert "| collocated | 1 |" in goodput and "| splitserve | 0.5 |" in goodput
    (finding,) = report.ahead_and_behind(rows, "collocated")
    assert "TTFT p50 ms: better in 1/4" in finding


def test_every_figure_is_written(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    runs[1].records["conv@1/s"][0].prefill_s = 0.6
    runs[1].records["conv@1/s"][0].first_chunk_s = 0.3
    runs[1].records["conv@1/s"][0].prefill_engine_id = "prefill-0-ab"
    figures = plots.draw_all(runs, cells, summarize(runs, cells), tmp_path)
    names = [name for _, name in figures]
    assert names == ["latency_vs_load_conv.png", "cdf_conv_0_5rps.png", "cdf_conv_1rps.png",
                     "cdf_anchor-c1.png", "cdf_anchor-c2.png", "timeline_conv_1rps.png",
                     "timeline_anchor-c2.png"]
    for name in names:
        assert (tmp_path / name).stat().st_size > 5000


def test_poisson_arrivals_and_a_trace_file_of_ones_own(tmp_path):
    own = _trace(tmp_path) / TRACE_FILES["conv"]
    plan = Plan(traces=(str(own),), arrivals="poisson", rates_per_s={own.stem: (2.0,)}, duration_s=10,
                anchor_concurrencies=())
    uncontended, loaded = plan.workloads()
    assert (uncontended.trace, loaded.name, len(loaded.requests)) == (own.stem, f"{own.stem}@2/s", 20)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(loaded.requests, loaded.requests[1:])]
    assert len(set(round(gap, 6) for gap in gaps)) > 10  # exponential gaps, not the trace's even 0.5 s
    assert {r.prompt_tokens for r in loaded.requests} <= {100 + 10 * i for i in range(40)}  # sizes kept
    with pytest.raises(ValueError, match="neither"):
        Plan(traces=("no-such-trace",)).workloads()
