"""The benchmark's CSV formats: per-request rows round-trip; summary.csv has the percentiles, throughput and SLOs."""

from __future__ import annotations

import csv

import pytest

from bench.load_generator import RequestRecord
from bench.result_files import (
    REQUEST_FIELDS,
    latencies,
    read_requests_csv,
    summary_row,
    write_requests_csv,
    write_summary_csv,
)
from bench.slo import slo_bounds


def _records() -> list[RequestRecord]:
    ok = [RequestRecord(request_id=i, arrival_s=0.5 * i, start_s=0.5 * i + 0.001, prompt_tokens=300,
                        output_tokens=3, ttft_s=0.1 * (i + 1), tbt_s=[0.02, 0.03], e2e_s=0.1 * (i + 1) + 0.05)
          for i in range(4)]
    failed = RequestRecord(request_id=4, arrival_s=2.0, start_s=2.0, prompt_tokens=0, output_tokens=0,
                           error="APIStatusError: 503")
    return ok + [failed]


def test_per_request_rows_round_trip_with_every_token_gap(tmp_path):
    path = tmp_path / "requests.csv"
    write_requests_csv(_records(), path)
    assert next(csv.reader(open(path))) == REQUEST_FIELDS
    assert read_requests_csv(path) == _records()


def test_summary_has_percentiles_throughput_and_slos(tmp_path):
    records = _records()
    bounds = slo_bounds(latencies(records[:1]))  # as if request 0 had been the uncontended run
    row = summary_row("splitserve-object_store", records, duration_s=2.0, bounds=bounds)
    assert (row["num_requests"], row["num_errors"]) == (5, 1)
    assert row["throughput_req_s"] == 2.0 and row["throughput_tok_s"] == 6.0
    assert row["ttft_p50_ms"] == pytest.approx(250.0)
    assert row["tbt_p50_ms"] == pytest.approx(25.0)
    assert row["tpot_p50_ms"] == pytest.approx(25.0)
    # P90 bounds: TTFT 3 × 100 ms holds for requests 0-2, and each one's TPOT (25 ms) is within 1.5 × its P90 gap;
    # request 3 is too slow to its first token; the failed request never attains.
    assert row["slo_attainment"] == pytest.approx(3 / 5)
    assert row["meets_slos"] is False

    write_summary_csv([row, summary_row("collocated", records[:2], duration_s=1.0)], tmp_path / "summary.csv")
    rows = list(csv.DictReader(open(tmp_path / "summary.csv")))
    assert [r["system"] for r in rows] == ["splitserve-object_store", "collocated"]
    assert rows[1]["slo_attainment"] == ""  # no uncontended run given: no SLO columns for it
