"""The comparison's arithmetic and outputs on small fixtures: cells from a trace (a rate sweep sized by time and
count), summary rows judged against one reference, goodput from the sweep, the report's ratios with intervals,
raw cells that resume, and every figure file."""

from __future__ import annotations

import argparse
import dataclasses

import json
import math
import os
import re
from pathlib import Path

import pytest

from bench import plots, report
from bench.compare import (SystemRun, _parse_arrivals, _parse_per_trace, _prompt_order, fit_reference_from,
                           summarize)
from bench.host_probe import host_probe
from bench.load_generator import GeneratorStats, RequestRecord
from bench.raw_cells import RawCells, cell_digest, measured_commit
from bench.slo import LinearFit, ReferenceFit
from bench.sweep_rates import SweepRates
from bench.traces import TraceRequest, scale_trace, scaling_for_rate, write_splitwise_csv
from bench.workloads import TRACE_FILES, Plan, TokenScaling, rate_at


def _trace(tmp_path: Path) -> Path:
    # 400 requests, one every 0.5 s: a mean rate of 2 requests/s; prompts of 100 to 4,090 tokens.
    requests = [TraceRequest(request_id=i, arrival_s=0.5 * i, prompt_tokens=100 + 10 * i, output_tokens=20)
                for i in range(400)]
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


def _plan(tmp_path: Path, **update) -> Plan:
    return Plan(**{"traces": ("conv",), "rates_per_s": {"conv": (0.5, 1.0, 2.0)}, "light_rates_per_s": {},
                   "min_duration_s": 10,
                   "min_requests": 10, "num_uncontended": 30, "anchor_concurrencies": (1, 2),
                   "num_anchor_requests_per_user": 2, "traces_dir": _trace(tmp_path),
                   "token_scaling": {"conv": TokenScaling(prompt_scale=0.5, max_prompt_tokens=600, output_scale=1.0,
                                                          max_output_tokens=10)}, **update})


def test_the_plan_sizes_each_rate_by_time_and_count_and_spans_sizes_in_the_uncontended_cell(tmp_path):
    cells = {cell.name: cell for cell in _plan(tmp_path).workloads()}
    assert list(cells) == ["uncontended-conv", "conv@0.5/s", "conv@1/s", "conv@2/s", "anchor-c1", "anchor-c2"]
    # A cell lasts max(10 s, 10 requests / rate): 20 s at 0.5/s, 10 s at 1/s and at 2/s.
    assert [len(cells[name].requests) for name in cells] == [30, 10, 10, 20, 2, 4]
    assert cells["conv@2/s"].requests[-1].arrival_s < 10
    # The uncontended requests are spread over the sizes of the trace's first requests (the mix), smallest to
    # largest; the loaded cells replay the trace from its start, so they send the mix's requests.
    uncontended = [r.prompt_tokens for r in cells["uncontended-conv"].requests]
    mix = sorted(r.prompt_tokens for r in _plan(tmp_path).mix("conv"))
    assert uncontended == sorted(uncontended) and (uncontended[0], uncontended[-1]) == (mix[0], mix[-1])
    loaded = [r.prompt_tokens for name in ("conv@0.5/s", "conv@1/s", "conv@2/s") for r in cells[name].requests]
    assert set(loaded) <= set(mix)
    assert {(r.prompt_tokens, r.output_tokens) for r in cells["anchor-c2"].requests} == {(300, 32)}


def _records(cell, *, slowdown: float, num_failed: int = 0, gap_s: float = 0.02) -> list[RequestRecord]:
    """Every request `slowdown` × a reference of 100 ms + 0.5 ms per prompt token to the first token."""
    records = []
    for request in cell.requests:
        ttft = slowdown * (0.1 + 0.0005 * request.prompt_tokens)
        gaps = [gap_s] * (request.output_tokens - 1)
        records.append(RequestRecord(request_id=request.request_id, arrival_s=request.arrival_s,
                                     start_s=request.arrival_s + 0.001, prompt_tokens=request.prompt_tokens,
                                     output_tokens=request.output_tokens, ttft_s=ttft, tbt_s=gaps,
                                     e2e_s=ttft + sum(gaps), workload=cell.name))
    for record in records[:num_failed]:
        record.error, record.ttft_s, record.e2e_s, record.tbt_s = "APIStatusError: 503", None, None, []
    return records


def _runs_and_cells(tmp_path):
    cells = _plan(tmp_path).workloads()
    by_name = {cell.name: cell for cell in cells}
    slowdowns = {"collocated": {"conv@0.5/s": 1.1, "conv@1/s": 1.3, "conv@2/s": 4.0, "anchor-c2": 1.5},
                 "splitserve": {"conv@0.5/s": 1.2, "conv@1/s": 2.2, "conv@2/s": 2.5, "anchor-c2": 1.2}}
    runs = []
    for system, by_cell in slowdowns.items():
        run = SystemRun(name=system, description="")
        for name, cell in by_name.items():
            run.records[name] = _records(cell, slowdown=by_cell.get(name, 1.0), gap_s=0.02 if system ==
                                         "collocated" else 0.016)
        runs.append(run)
    runs[1].records["conv@2/s"] = _records(by_name["conv@2/s"], slowdown=2.5, num_failed=4)
    return runs, cells


def test_every_system_is_judged_against_the_one_reference_and_goodput_is_interpolated(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    reference = fit_reference_from(runs[0], cells, "abc")
    assert reference.system == "collocated" and set(reference.fits) == {"conv", "all"}
    assert reference.fits["conv"].ttft_s(300) == pytest.approx(0.25)
    rows = {(row["system"], row["workload"]): row for row in summarize(runs, cells, reference)}
    # TTFT slowdowns are the fixture's factors; TTFT bounds 2×/3×/6× and E2E 1.25×/1.5×/5× decide.
    assert rows["collocated", "conv@0.5/s"]["slowdown_ttft_p50"] == pytest.approx(1.1)
    assert rows["collocated", "conv@0.5/s"]["meets_slos"] is True
    assert rows["collocated", "conv@1/s"]["meets_slos"] is True
    assert rows["collocated", "conv@2/s"]["meets_slos"] is False
    # splitserve: gaps 0.8× the reference's; at 1/s TTFT 2.2× misses P50's 2× (1.1), and E2E P50 1.4× misses
    # its 1.25× by more (1.12), which is the margin; 4 failures of 20 miss every P90.
    assert rows["splitserve", "conv@0.5/s"]["meets_slos"] is True
    assert rows["splitserve", "conv@1/s"]["slowdown_ttft_p50"] == pytest.approx(2.2)
    assert rows["splitserve", "conv@1/s"]["slo_margin"] == pytest.approx(1.4 / 1.25, rel=0.01)
    assert math.isinf(rows["splitserve", "conv@2/s"]["slo_margin"])
    assert rows["splitserve", "conv@2/s"]["num_errors"] == 4
    # Goodput: collocated meets 0.5 and 1, misses 2: interpolated between them; splitserve between 0.5 and 1.
    collocated = rows["collocated", "conv@1/s"]
    assert collocated["goodput_kind"] == "interpolated" and 1.0 < collocated["goodput_req_s"] < 2.0
    assert rows["splitserve", "conv@1/s"]["goodput_kind"] == "interpolated"
    assert 0.5 < rows["splitserve", "conv@1/s"]["goodput_req_s"] < 1.0
    assert "goodput_req_s" not in rows["splitserve", "anchor-c2"]  # closed loop: no rate


def test_the_report_gives_every_ratio_an_interval_and_claims_only_separable_ones(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    rows = summarize(runs, cells, fit_reference_from(runs[0], cells, "abc"))
    table, ratios = report.latency_table(runs, cells, "collocated")
    # 1.2 / 1.5 of the baseline's TTFT on the same requests: 0.8×, with nothing to spread it.
    assert "| anchor-c2 | splitserve | 4 | 300 (0.80× [0.80–0.80]) |" in table
    # The uncontended cells are the same on both sides: not separable.
    assert "(1.00× [1.00–1.00], n.s.)" in table
    assert "| conv@2/s | splitserve | 16 |" in table  # the failures are counted, not timed
    margins = "\n".join(report.slo_section(rows))
    # Each rate's margin, then the share of requests within the P90 bounds; then both goodputs: all of the
    # requests at 1/s are within (100%), none at 2/s, so 90% is crossed a tenth of the way (1.1/s).
    assert re.search(r"\| collocated \| 0\.\d\d ✓ · 100% \| 0\.\d\d ✓ · 100% \| 2\.00 ✗ · 0% \| 1\.\d+ \| 1\.1 \|",
                     margins), margins
    assert re.search(r"\| splitserve \| 0\.\d\d ✓ · 100% \| 1\.12 ✗ · 100% \| ∞ ✗ · 0% \| 0\.\d+ \| 1\.1 \|",
                     margins), margins
    (finding, *per_cell) = report.findings(ratios)
    assert finding.startswith("- **splitserve**: of ") and "not separable" in finding
    assert any(line.startswith("  - anchor-c2: better TTFT p50 0.80×") for line in per_cell)


def test_the_report_says_where_each_system_stopped_keeping_up_with_the_offered_rate():
    def row(system, rate, delivered):
        return {"system": system, "trace": "conv", "kind": "open", "rate_per_s": rate, "throughput_req_s": delivered}

    sweep = [row("collocated", 0.5, 0.49), row("collocated", 1.0, 0.97), row("collocated", 2.0, 1.3),
             row("splitserve", 0.5, 0.48), row("splitserve", 1.0, 0.85), row("splitserve", 2.0, 0.9)]
    lines = report.saturation_lines(sweep, [0.5, 1.0, 2.0])
    # 1.3 of 2 offered is 0.65 (past); 0.85 of 1 is below 0.9 already: splitserve passed its throughput at 1/s.
    assert "| collocated | 0.98 | 0.97 | 0.65 | 2/s |" in lines
    assert "| splitserve | 0.96 | 0.85 | 0.45 | 1/s |" in lines
    assert "| collocated | 0.98 | 0.97 | not reached |" in report.saturation_lines(sweep[:2], [0.5, 1.0])


def test_a_late_generator_is_flagged(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    runs[1].records["conv@1/s"][3].start_s += 0.4  # left 400 ms after it was due
    runs[1].generator["conv@1/s"] = [GeneratorStats(wall_s=10.0, cpu_s=0.1, nice=-10, steal_s=2.0)]
    rows = summarize(runs, cells, None)
    late = [row for row in rows if row["is_generator_late"]]
    assert [(row["system"], row["workload"]) for row in late] == [("splitserve", "conv@1/s")]
    section = "\n".join(report.generator_section(rows))
    assert f"| conv@1/s | splitserve | 1.0 / " in section and f"{2.0 / (10.0 * os.cpu_count()):.1%} |" in section
    assert "steal time" in section


def test_raw_cells_resume_at_the_same_commit_and_the_same_requests_only(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    cell = next(cell for cell in cells if cell.name == "conv@1/s")
    raw = RawCells(tmp_path / "raw")
    stats = GeneratorStats(wall_s=20.0, cpu_s=1.5, nice=-10)
    # 1. A saved cell is done at its commit, for its repeat, and loads back as it was.
    raw.save("splitserve", cell, 0, runs[1].records["conv@1/s"], stats, "abc")
    assert raw.is_done("splitserve", cell, 0, "abc")
    assert not raw.is_done("splitserve", cell, 0, "def") and not raw.is_done("splitserve", cell, 1, "abc")
    records, loaded_stats = raw.load("splitserve", "conv@1/s", 0)
    assert records == runs[1].records["conv@1/s"] and loaded_stats == stats
    assert measured_commit(raw, ["splitserve"], cells, 1) == "abc"
    # 2. The same name sending other requests (here: more of them) is not done, and no report mixes it in.
    longer = _plan(tmp_path, min_requests=15).workloads()
    changed = next(other for other in longer if other.name == "conv@1/s")
    assert cell_digest(changed) != cell_digest(cell) and not raw.is_done("splitserve", changed, 0, "abc")
    with pytest.raises(SystemExit, match="splitserve/conv@1/s"):
        measured_commit(raw, ["splitserve"], longer, 1)
    # 3. Files from before digests were recorded are taken by name.
    meta_path = tmp_path / "raw" / "splitserve" / "conv_1rps.r0.json"
    meta_path.write_text(json.dumps({key: value for key, value in json.loads(meta_path.read_text()).items()
                                     if key != "cell_digest"}))
    assert raw.is_done("splitserve", changed, 0, "abc")
    # 4. A report never mixes commits.
    raw.save("collocated", cell, 0, runs[0].records["conv@1/s"], stats, "def")
    with pytest.raises(SystemExit, match="one commit"):
        measured_commit(raw, ["splitserve", "collocated"], cells, 1)


def test_raw_cells_count_at_a_later_commit_with_the_same_measured_code(tmp_path):
    """Commits "abc" and "abd" differ only in what is not measured (docs, results); "xyz" changed the app."""
    runs, cells = _runs_and_cells(tmp_path)
    cell = next(cell for cell in cells if cell.name == "conv@1/s")
    raw = RawCells(tmp_path / "raw", is_same_code=lambda a, b: {a, b} <= {"abc", "abd"})
    stats = GeneratorStats(wall_s=20.0, cpu_s=1.5, nice=-10)
    raw.save("splitserve", cell, 0, runs[1].records["conv@1/s"], stats, "abc")
    meta_path = tmp_path / "raw" / "splitserve" / "conv_1rps.r0.json"
    meta_path.write_text(json.dumps(json.loads(meta_path.read_text()) | {"finished_at": "2026-12-01 10:00:00"}))
    assert raw.is_done("splitserve", cell, 0, "abd") and not raw.is_done("splitserve", cell, 0, "xyz")
    # A later commit adds a system: a report reads both at the newer commit, and says so.
    raw.save("collocated", cell, 0, runs[0].records["conv@1/s"], stats, "abd")
    assert measured_commit(raw, ["splitserve", "collocated"], [cell], 1) == "abd"
    raw.save("collocated", cell, 0, runs[0].records["conv@1/s"], stats, "xyz")
    with pytest.raises(SystemExit, match="abc differ from xyz"):
        measured_commit(raw, ["splitserve", "collocated"], [cell], 1)
    # A file from before digests were recorded counts at its own commit only.
    meta_path.write_text(json.dumps({key: value for key, value in json.loads(meta_path.read_text()).items()
                                     if key != "cell_digest"}))
    assert raw.is_done("splitserve", cell, 0, "abc") and not raw.is_done("splitserve", cell, 0, "abd")


def test_the_same_measured_code_is_told_by_git():
    from bench.provenance import is_same_measured_code

    assert is_same_measured_code("abc", "abc")
    assert not is_same_measured_code("abc-dirty", "abd") and not is_same_measured_code("no-such", "commit")


def test_the_light_end_joins_the_sweep_without_changing_the_uncontended_picks(tmp_path):
    plain = {cell.name: cell for cell in _plan(tmp_path).workloads()}
    lit = {cell.name: cell for cell in _plan(tmp_path, light_rates_per_s={"conv": (0.2, 1.0)}).workloads()}
    # In rate order, and a light rate the sweep already has is one cell, not two.
    assert list(lit) == ["uncontended-conv", "conv@0.2/s", "conv@0.5/s", "conv@1/s", "conv@2/s", "anchor-c1",
                         "anchor-c2"]
    assert len(lit["conv@0.2/s"].requests) == 10 and lit["conv@0.2/s"].requests[-1].arrival_s > 40  # 10 / 0.2 s
    assert lit["uncontended-conv"] == plain["uncontended-conv"]
    assert Plan().light_rates_per_s == {}  # opt-in: the default sweep's light end is its first load


def _host_fits(slowness: float) -> dict[str, ReferenceFit]:
    """About the Intel host's reference (a prompt token 2 ms, a decode step 65 ms), `slowness` times slower."""
    fit = ReferenceFit(num_requests=30, ttft=LinearFit(intercept_s=0.1 * slowness, slope_s=0.002 * slowness,
                                                       floor_s=0.1 * slowness, median_abs_error=0.0),
                       tpot=LinearFit(intercept_s=0.065 * slowness, slope_s=0.0, floor_s=0.065 * slowness,
                                      median_abs_error=0.0))
    return {"conv": fit, "code": fit}


def test_the_default_sweep_is_set_in_loads_of_this_hosts_reference():
    """≥ 5 rates per trace from light load (≤ 1 reference request in flight) to past saturation (≥ 2.4), every
    loaded cell ≥ 60 s and ≥ 50 requests; a host twice as slow gets about half the rates, so that a sweep tuned on
    one host neither starts past saturation on a slower one nor ends below it on a faster one."""
    plan = Plan()
    with pytest.raises(ValueError, match="unit rate"):
        plan.workloads()
    assert all(cell.kind != "open" for cell in plan.fixed_workloads())
    fast, slow = plan.unit_rates(_host_fits(1.0)), plan.unit_rates(_host_fits(2.0))
    # A unit rate is 1 / the reference's mean E2E over the trace's first requests, by its fit for their sizes.
    mix = plan.mix("conv")
    fit = _host_fits(1.0)["conv"]
    assert fast["conv"] == pytest.approx(len(mix) / sum(fit.e2e_s(r.prompt_tokens, r.output_tokens) for r in mix))
    for trace in ("conv", "code"):
        assert slow[trace] == pytest.approx(fast[trace] / 2, rel=0.01)
        loads = plan.loads_of(trace)
        assert len(loads) >= 5 and loads[0] <= 1.0 and loads[-1] >= 2.4
    for units in (fast, slow):
        loaded = [cell for cell in plan.workloads(units) if cell.kind == "open"]
        for trace in ("conv", "code"):
            rates = [cell.rate_per_s for cell in loaded if cell.trace == trace]
            assert rates == [rate_at(load, units[trace]) for load in plan.loads_of(trace)]
        # ≥ 60 s of arrivals: the window ends where the next request would arrive, a mean gap after the last.
        assert all(len(cell.requests) >= 50 and cell.requests[-1].arrival_s + 1.5 / cell.rate_per_s >= 60
                   for cell in loaded)
    # Explicit rates replace a trace's loads, and need no reference.
    explicit = Plan(rates_per_s={"code": (0.2, 0.4)})
    assert explicit.calibrated_traces() == ["conv"]
    assert explicit.sweep_rates({"conv": 0.2})["code"] == (0.2, 0.4)
    assert rate_at(0.7, 0.226) == 0.16 and rate_at(6, 0.226) == 1.4  # two significant digits


def test_rates_and_loads_on_the_command_line():
    traces = ("conv", "code")
    assert _parse_per_trace(None, traces) == {}  # every trace keeps its loads
    assert _parse_per_trace(["code=0.2,0.4"], traces) == {"code": (0.2, 0.4)}
    assert _parse_per_trace(["conv=0.15", "code=0.1"], traces, "--light-rates") == {"conv": (0.15,), "code": (0.1,)}
    assert _parse_per_trace(["none"], traces) == {"conv": (), "code": ()}
    assert _parse_per_trace(["none", "code=0.05"], traces) == {"conv": (), "code": (0.05,)}
    with pytest.raises(SystemExit, match="--light-rates names 'chat'"):
        _parse_per_trace(["chat=0.1"], traces, "--light-rates")


def test_the_baselines_raw_uncontended_cells_set_the_sweep_again(tmp_path):
    """A resumed run and a rebuilt report read the baseline's uncontended cells back from raw/ and expand the same
    cells; the uncontended cells keep their prompts' ids whatever the rates turn out to be."""
    plan = _plan(tmp_path, rates_per_s={})  # conv in loads
    args = argparse.Namespace(reference=None, repeats=1, min_reference_requests=30)
    raw = RawCells(tmp_path / "raw")
    sweep = SweepRates(plan, raw, args, baseline="collocated")
    assert sweep.unit_rates is None and [cell.kind for cell in sweep.cells()] == ["uncontended", "closed", "closed"]
    sweep.settle("abc", is_required=False)  # nothing measured yet: still unknown
    assert sweep.unit_rates is None
    with pytest.raises(SystemExit, match="did not give a reference"):
        sweep.settle("abc")
    uncontended = sweep.cells()[0]
    raw.save("collocated", uncontended, 0, _records(uncontended, slowdown=1.0),
             GeneratorStats(wall_s=1.0, cpu_s=0.1, nice=0), "abc")
    sweep.settle("abc")
    fit = fit_reference_from(SystemRun(name="collocated", description="", records={
        uncontended.name: _records(uncontended, slowdown=1.0)}), [uncontended], "abc").fits["conv"]
    assert sweep.unit_rates == pytest.approx({"conv": plan.unit_rates({"conv": fit})["conv"]})
    again = SweepRates(plan, raw, args, baseline="collocated")
    again.settle("abc")
    assert [cell.name for cell in again.cells()] == [cell.name for cell in sweep.cells()]
    assert [cell.kind for cell in sweep.cells()] == ["uncontended", *["open"] * 5, "closed", "closed"]
    assert sweep.cells()[1].rate_per_s == rate_at(plan.loads_of("conv")[0], sweep.unit_rates["conv"])
    # Another commit's raw files set nothing.
    other = SweepRates(plan, raw, args, baseline="collocated")
    other.settle("def", is_required=False)
    assert other.unit_rates is None
    # A cell's block of prompt ids: the cells that need no rate first, in the same order before and after.
    before = [cell.name for cell in _prompt_order(plan.fixed_workloads())]
    after = [cell.name for cell in _prompt_order(sweep.cells())]
    assert after[:len(before)] == before and before[0] == "warm-up"


def test_every_repeat_of_a_cell_sends_prompts_no_earlier_run_sent():
    """A repeat that re-sent its first run's prompts was served from the prefix caches (collocated's uncontended code
    TTFT p50 349 ms in its second run against 993 ms in its first, a3a61ec)."""
    from bench.compare import Prompts
    from serve_app.config import DEFAULT_MODEL_DIR

    cells = [Plan().fixed_workloads()[0]]
    prompts = Prompts(str(DEFAULT_MODEL_DIR), lambda: cells)
    first, second = prompts.of(cells[0]), prompts.of(cells[0], 1)
    assert len(set(first) | set(second)) == 2 * len(cells[0].requests)  # unique across requests and repeats
    assert prompts.of(cells[0], 0) == first  # the first run's prompts are those of runs before repeats differed
    # The same sizes, but where the unique head ("Request 10000042.") alone is longer than the prompt asked for:
    # such a prompt fits in one KV block, which no prefix cache shares anyway.
    sizer = prompts.builder._tokenizer
    sizes = [[len(sizer.encode(prompt, add_special_tokens=False)) for prompt in run] for run in (first, second)]
    longer = [index for index, request in enumerate(cells[0].requests) if request.prompt_tokens >= 16]
    assert longer and [sizes[0][i] for i in longer] == [sizes[1][i] for i in longer]


def test_every_scheduling_policy_is_a_system_of_its_own():
    from bench.compare import _arguments as parse_args
    from bench.systems import POLICY_SYSTEMS, SYSTEMS, app_config

    # The default run measures splitserve as shipped: serve_config.yaml's own policy, on NIXL.
    assert parse_args([]).systems == ["collocated", "splitserve-predictive", "ray-serve-llm-pd-cpu-fixed"]
    assert app_config().scheduling.policy == "predictive"
    chosen = parse_args(["--systems", "policies"]).systems
    assert chosen[:2] == ["collocated", "splitserve-nixl"] and chosen[-1] == "ray-serve-llm-pd-cpu-fixed"
    assert set(POLICY_SYSTEMS) <= set(chosen) and len(chosen) == len(set(chosen))
    policies = {app_config(SYSTEMS[name].config()).scheduling.policy for name in POLICY_SYSTEMS}
    assert policies == {"token_jsq", "conditional", "mixed_pool", "predictive"}
    # The transfer systems measure the split path itself, whatever the default; collocated has one pool.
    for name in ("splitserve-nixl", "splitserve-object-store", "collocated"):
        assert app_config(SYSTEMS[name].config()).scheduling.policy == "always_split", name
    assert {app_config(SYSTEMS[name].config()).transfer.backend for name in POLICY_SYSTEMS} == {"nixl"}
    # The chunked variant differs from predictive only in decode's chunk budget.
    chunked = app_config(SYSTEMS["splitserve-predictive-chunked"].config())
    assert "splitserve-predictive-chunked" in chosen and chunked.scheduling.policy == "predictive"
    assert chunked.decode.num_prefill_chunk_tokens == 64 and chunked.prefill.long_prefill_token_threshold == 0
    shortest_first = app_config(SYSTEMS["splitserve-predictive-shortest-first"].config())
    assert (shortest_first.scheduling.policy, shortest_first.prefill.scheduling_policy) == ("predictive",
                                                                                          "shortest_first")
    assert shortest_first.decode.scheduling_policy == "fcfs"


def test_every_figure_is_written(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    record = runs[1].records["conv@2/s"][-1]
    record.prefill_s, record.first_chunk_s, record.prefill_engine_id = 0.6, 0.3, "prefill-0-ab"
    figures = plots.draw_all(runs, cells, summarize(runs, cells, fit_reference_from(runs[0], cells, "abc")), tmp_path)
    names = [name for _, name in figures]
    assert names == ["latency_vs_load_conv.png", "cdf_conv_0_5rps.png", "cdf_conv_1rps.png", "cdf_conv_2rps.png",
                     "cdf_anchor-c1.png", "cdf_anchor-c2.png", "timeline_conv_2rps.png", "timeline_anchor-c2.png"]
    for name in names:
        assert (tmp_path / name).stat().st_size > 5000


def test_poisson_arrivals_and_a_trace_file_of_ones_own(tmp_path):
    own = _trace(tmp_path) / TRACE_FILES["conv"]
    plan = Plan(traces=(str(own),), arrivals={own.stem: "poisson"}, rates_per_s={own.stem: (2.0,)},
                min_duration_s=10, min_requests=5, anchor_concurrencies=())
    uncontended, loaded = plan.workloads()
    assert (uncontended.trace, loaded.name, len(loaded.requests)) == (own.stem, f"{own.stem}@2/s", 20)
    gaps = [b.arrival_s - a.arrival_s for a, b in zip(loaded.requests, loaded.requests[1:])]
    assert len(set(round(gap, 6) for gap in gaps)) > 10  # exponential gaps, not the trace's even 0.5 s
    assert {r.prompt_tokens for r in loaded.requests} <= {min(1536, 100 + 10 * i) for i in range(400)}  # sizes kept
    with pytest.raises(ValueError, match="neither"):
        Plan(traces=("no-such-trace",)).workloads()


def test_by_default_code_draws_poisson_arrivals_one_ladder_and_conv_replays_its_own():
    """Code's cells send the same draws at every rate, only the time axis scaled, with sizes from the requests the
    uncontended cell spans; conversation's replay the trace's own arrival times."""
    plan = Plan(rates_per_s={"conv": (0.5, 1.0), "code": (0.5, 1.0)}, anchor_concurrencies=())
    cells = {cell.name: cell for cell in plan.workloads()}
    light, heavy = cells["code@0.5/s"], cells["code@1/s"]
    assert (len(light.requests), len(heavy.requests)) == (50, 60)
    stretch = light.requests[1].arrival_s / heavy.requests[1].arrival_s
    for slow, fast in zip(light.requests, heavy.requests):  # one seed: the same requests, on a stretched time axis
        assert (slow.prompt_tokens, slow.output_tokens) == (fast.prompt_tokens, fast.output_tokens)
        assert slow.arrival_s == pytest.approx(stretch * fast.arrival_s)
    for cell in (light, heavy):  # the offered rate is the rate asked: n requests in n / rate, the next one due then
        assert cell.requests[-1].arrival_s < len(cell.requests) / cell.rate_per_s
        assert cell.requests[-1].arrival_s > (len(cell.requests) - 10) / cell.rate_per_s
    mix = {(request.prompt_tokens, request.output_tokens) for request in plan.mix("code")}
    assert {(request.prompt_tokens, request.output_tokens) for request in heavy.requests} <= mix
    assert heavy.scaling.max_requests == plan.num_mix_requests and heavy.scaling.rate_factor == 1.0
    conv = cells["conv@0.5/s"]
    assert conv.scaling.rate_factor != 1.0  # the trace's own window, stretched to the rate
    assert [request.arrival_s for request in conv.requests] == [
        request.arrival_s for request in scale_trace(plan._source("conv")[1], conv.scaling)]

    assert _parse_arrivals(None, ("conv", "code")) == {"conv": "trace", "code": "poisson"}
    assert _parse_arrivals(["poisson"], ("conv", "code")) == {"conv": "poisson", "code": "poisson"}
    assert _parse_arrivals(["code=trace"], ("conv", "code")) == {"conv": "trace", "code": "trace"}
    for wrong in (["code=bursty"], ["mine=poisson"]):
        with pytest.raises(SystemExit):
            _parse_arrivals(wrong, ("conv", "code"))


def test_scheduled_systems_are_also_held_against_always_split(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    split = SystemRun(name="splitserve-nixl", description="")
    split.records = {name: [dataclasses.replace(record, path="split") for record in records]
                     for name, records in runs[1].records.items()}
    policy = SystemRun(name="splitserve-predictive", description="")
    policy.records = {name: [dataclasses.replace(record, path="decode_local", ttft_s=record.ttft_s and record.ttft_s / 2)
                             for record in records] for name, records in runs[1].records.items()}
    # 1. Without the always_split system, or without a scheduled one, there is no such section.
    assert report.second_baseline_section([runs[0], policy], cells, "splitserve-nixl") == []
    assert report.second_baseline_section([runs[0], split], cells, "splitserve-nixl") == []
    # 2. With both: the policy's TTFT is half of always_split's on the same requests; collocated is not in it.
    lines = report.second_baseline_section([runs[0], split, policy], cells, "splitserve-nixl")
    text = "\n".join(lines)
    assert "## Against splitserve-nixl" in text
    assert "| anchor-c2 | splitserve-predictive | 4 | 150 (0.50× [0.50–0.50]) |" in text
    assert "| collocated |" not in text and "**splitserve-predictive**" in text


def test_a_rebuilt_report_keeps_what_only_the_measuring_run_knew(tmp_path):
    from bench.compare import carried_over

    measured = {"started_at": "2026-12-03 15:56:12", "wall_s": 3275.0, "measured_commit": "abc",
                "is_report_only": False, "systems": [{"name": "collocated", "startup_s": 64.9}]}
    (tmp_path / "run.json").write_text(json.dumps(measured))
    rebuilt = {"started_at": "2026-12-03 17:00:00", "wall_s": 0.6, "measured_commit": "abc", "is_report_only": True,
               "systems": [{"name": "collocated", "startup_s": None}, {"name": "new", "startup_s": None}]}
    kept = carried_over(tmp_path / "run.json", rebuilt)
    assert (kept["started_at"], kept["wall_s"], kept["is_report_only"]) == ("2026-12-03 15:56:12", 3275.0, True)
    assert [system["startup_s"] for system in kept["systems"]] == [64.9, None]
    # Another commit's run.json, or none, carries nothing over.
    assert carried_over(tmp_path / "run.json", rebuilt | {"measured_commit": "def"})["wall_s"] == 0.6
    assert carried_over(tmp_path / "missing.json", rebuilt) == rebuilt


def test_a_report_rebuilt_later_names_the_commit_its_cells_measured(tmp_path):
    runs, cells = _runs_and_cells(tmp_path)
    rows = summarize(runs, cells, None)
    meta = {"started_at": "2026-12-03 08:00:00", "commit": "headcommit12", "is_dirty": True,
            "measured_commit": "abc123def456", "is_report_only": True, "cells_finished_between": None,
            "host": {"num_cores": 2, "cpu": "test cpu", "memory_gib": 1.0}, "versions": {}, "wall_s": 0.0,
            "repeats": 1, "baseline": "collocated", "model": "m",
            "systems": [{"name": run.name, "description": "", "startup_s": None, "error": None} for run in runs],
            "cells": [{"name": cell.name, "kind": cell.kind, "rate_per_s": cell.rate_per_s,
                       "concurrency": cell.concurrency, "num_requests": len(cell.requests), "scaling": None}
                      for cell in cells]}
    report.write(runs, cells, rows, meta, None, [], tmp_path / "report.md")
    header = (tmp_path / "report.md").read_text().splitlines()[2]
    # The raw files' commit, not the one the report was rebuilt at; HEAD's dirty tree is not the cells'.
    assert header.startswith("Measured at commit `abc123def456`.")
    assert "rebuilt from its raw files at commit `headcommit12`" in header and "uncommitted" not in header
    assert "a digest per cell" not in header
    # Raw cells that carry what they sent are checked against the plan; the header says so.
    report.write(runs, cells, rows, meta | {"are_cells_digested": True}, None, [], tmp_path / "report.md")
    assert "Every cell sent what this plan's cell of its name sends" in (tmp_path / "report.md").read_text()
    assert "set in loads" not in (tmp_path / "report.md").read_text()  # rates given: nothing to say
    # A sweep set in loads says at which unit rate, and what rates the loads became.
    calibrated = meta | {"unit_rates_per_s": {"conv": 0.25}, "plan": {"loads": {"conv": [2.0, 4.0]}},
                         "sweep_rates_per_s": {"conv": [0.5, 1.0]}}
    report.write(runs, cells, rows, calibrated, None, [], tmp_path / "report.md")
    assert ("conv: one request in flight at 0.250/s (a mean uncontended E2E of 4.00 s), loads 2, 4 → 0.5, 1 "
            "requests/s") in (tmp_path / "report.md").read_text()


def test_every_cell_records_the_hosts_speed_and_the_report_flags_a_drifted_host(tmp_path):
    """The probes time fixed work (compute in cache, a matrix-vector product streamed from memory); a cell's probes
    travel from its raw file into summary.csv, and the report names the cells measured on a host more than 15% off
    its speed when the reference was measured, by either probe."""
    probe = host_probe(repeats=3)
    assert 0 < probe.cpu_ms <= probe.wall_ms * 1.05  # one thread: it cannot run longer than the wall clock
    assert probe.memory_ms > 0
    runs, cells = _runs_and_cells(tmp_path)
    uncontended = next(cell.name for cell in cells if cell.kind == "uncontended")
    runs[0].host_probes = {"host_probe_ms": {uncontended: [100.0], "conv@0.5/s": [105.0], "conv@1/s": [130.0]},
                           "host_memory_probe_ms": {uncontended: [20.0], "conv@0.5/s": [30.0], "conv@1/s": [21.0]}}
    runs[1].host_probes = {"host_probe_ms": {"conv@0.5/s": [80.0, 90.0]}}
    rows = summarize(runs, cells, fit_reference_from(runs[0], cells, "abc"))
    by_cell = {(row["system"], row["workload"]): row for row in rows}
    assert by_cell["splitserve", "conv@0.5/s"]["host_probe_ms"] == 85.0  # the median of its repeats
    assert "host_probe_ms" not in by_cell["splitserve", "conv@1/s"]
    assert by_cell["collocated", "conv@0.5/s"]["host_memory_probe_ms"] == 30.0
    lines = "\n".join(report.host_section(rows, "collocated"))
    assert "When the reference's uncontended cells were measured: 100.0 ms." in lines
    assert "When the reference's uncontended cells were measured: 20.0 ms." in lines
    assert "| conv@1/s | collocated | compute | 130.0 | 1.30× |" in lines
    assert "| conv@0.5/s | splitserve | compute | 85.0 | 0.85× |" in lines
    assert "| conv@0.5/s | collocated | memory | 30.0 | 1.50× |" in lines  # in cache it read 5% off: memory moved
    assert "| conv@0.5/s | collocated | compute |" not in lines and "| conv@1/s | collocated | memory |" not in lines
    assert report.host_section([], "collocated") == [
        "No cell recorded the host's speed (cells measured before the probe existed)."]


def test_each_repeat_runs_on_a_fresh_start_of_the_system(tmp_path, monkeypatch):
    """Where a start's processes land moves every latency of that start alike (47, 49 and 55 ms per token in three
    starts of the same decode path): repeats pooled within one start would hide that spread from the intervals."""
    import contextlib

    from bench import compare

    events: list[str] = []

    @contextlib.contextmanager
    def start(logs_dir: Path):
        events.append(f"start {logs_dir.name}")
        yield f"http://start-{len(events)}"
        events.append("stop")

    class Runner:
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    async def warm_up(**kwargs):
        events.append(f"warm {kwargs['base_url']}")

    def run_cell(runner, base_url, model, cell, prompts, repeat):
        events.append(f"{cell.name} r{repeat} on {base_url}")
        return [], GeneratorStats(wall_s=0.0, cpu_s=0.0, nice=0)

    monkeypatch.setattr(compare, "CellRunner", Runner)
    monkeypatch.setattr(compare, "run_closed_loop", warm_up)
    monkeypatch.setattr(compare, "_run_cell", run_cell)
    monkeypatch.setattr(compare, "host_probe", lambda: None)
    saved = []
    raw = type("Raw", (), {"save": lambda self, *args, **kwargs: saved.append(args[2])})()
    cells = [type("Cell", (), {"name": name})() for name in ("a", "b")]
    run = SystemRun(name="s", description="", config={})
    compare._measure(run, start, iter([[(cells[0], 0), (cells[1], 0), (cells[0], 1), (cells[1], 1)]]),
                     lambda cell, repeat: [], "m", tmp_path / "logs", raw, "c0")
    # 1. Repeat 0 on the first start, warmed up; 2. the first start stops before repeat 1's start begins.
    assert events == ["start logs", "warm http://start-1", "a r0 on http://start-1", "b r0 on http://start-1",
                      "stop", "start repeat-1", "warm http://start-6", "a r1 on http://start-6",
                      "b r1 on http://start-6", "stop"]
    assert saved == [0, 0, 1, 1] and run.error is None and run.startup_s is not None
