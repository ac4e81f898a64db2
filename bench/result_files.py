"""The benchmark's result files, in SplitwiseSim's spirit: one CSV row per request per system, and summary.csv
with one row per system (latency percentiles, throughput, SLO attainment, errors).

Per-request CSV: every inter-token gap is kept (space-separated in `tbt_s`), so CDFs can be drawn from it later.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path
from typing import Any

from bench.load_generator import RequestRecord
from bench.slo import PERCENTILES, RequestLatency, latency_percentiles, meets_slos, slo_attainment

REQUEST_FIELDS = ["workload", "request_id", "arrival_s", "start_s", "prompt_tokens", "output_tokens", "ttft_s", "e2e_s",
                  "tbt_s", "error", "prefill_s", "prefill_engine_id", "first_chunk_s"]


def measured_commit() -> str:
    """The commit a result measured, `-dirty` when the working tree had uncommitted changes; `unknown` outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        is_dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                       capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if is_dirty else "")


def write_requests_csv(records: list[RequestRecord], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REQUEST_FIELDS)
        writer.writeheader()
        for record in records:
            writer.writerow({"workload": record.workload, "request_id": record.request_id, "arrival_s": record.arrival_s,
                             "start_s": record.start_s, "prompt_tokens": record.prompt_tokens,
                             "output_tokens": record.output_tokens, "ttft_s": record.ttft_s, "e2e_s": record.e2e_s,
                             "tbt_s": " ".join(f"{gap:.6f}" for gap in record.tbt_s), "error": record.error or "",
                             "prefill_s": record.prefill_s, "prefill_engine_id": record.prefill_engine_id,
                             "first_chunk_s": record.first_chunk_s})


def read_requests_csv(path: Path) -> list[RequestRecord]:
    def number(text: str) -> float | None:
        return float(text) if text else None

    with open(path, newline="") as handle:
        return [RequestRecord(request_id=int(row["request_id"]), arrival_s=float(row["arrival_s"]),
                              start_s=number(row["start_s"]), prompt_tokens=int(row["prompt_tokens"]),
                              output_tokens=int(row["output_tokens"]), ttft_s=number(row["ttft_s"]),
                              e2e_s=number(row["e2e_s"]), tbt_s=[float(gap) for gap in row["tbt_s"].split()],
                              error=row["error"] or None, prefill_s=number(row.get("prefill_s", "")),
                              prefill_engine_id=row.get("prefill_engine_id", ""),
                              first_chunk_s=number(row.get("first_chunk_s", "")), workload=row.get("workload", ""))
                for row in csv.DictReader(handle)]


def latencies(records: list[RequestRecord]) -> list[RequestLatency]:
    return [RequestLatency(ttft_s=r.ttft_s, tbt_s=tuple(r.tbt_s), e2e_s=r.e2e_s) for r in records if r.is_ok]


def summary_row(system: str, records: list[RequestRecord], duration_s: float,
                bounds: dict[str, dict[int, float]] | None = None) -> dict[str, Any]:
    """One system's line of summary.csv; `bounds` (from its uncontended run) adds the SLO columns."""
    ok = latencies(records)
    row: dict[str, Any] = {"system": system, "num_requests": len(records), "num_errors": len(records) - len(ok),
                           "duration_s": round(duration_s, 3),
                           "throughput_req_s": round(len(ok) / duration_s, 4) if duration_s > 0 else 0.0,
                           "throughput_tok_s": round(sum(r.output_tokens for r in records if r.is_ok) / duration_s, 2)
                           if duration_s > 0 else 0.0}
    measured = latency_percentiles(ok) if ok else {}
    for metric in ("ttft", "tbt", "tpot", "e2e"):
        for q in PERCENTILES:
            value = measured.get(metric, {}).get(q)
            row[f"{metric}_p{q}_ms"] = round(value * 1e3, 2) if value is not None else ""
    if bounds is not None:
        row["slo_attainment"] = round(slo_attainment(ok, bounds) * len(ok) / len(records), 4) if records else 0.0
        row["meets_slos"] = bool(ok) and len(ok) == len(records) and meets_slos(ok, bounds)
    return row


def write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
