"""The benchmark's result files, in SplitwiseSim's spirit: one CSV row per request per system, and summary.csv
with one row per system and cell (latency percentiles, throughput, the generator's send lag, slowdowns against the
reference and the SLO verdict, errors).

Per-request CSV: every inter-token gap is kept (space-separated in `tbt_s`), so CDFs can be drawn from it later.
"""

from __future__ import annotations

import csv
import os
import subprocess
from pathlib import Path
from typing import Any

import numpy as np

from bench.load_generator import MAX_SEND_LAG_P99_S, GeneratorStats, RequestRecord, send_lag_summary
from bench.slo import (
    PERCENTILES,
    ReferenceFit,
    RequestSample,
    attainment,
    slo_margin,
    slowdown_percentiles,
    slowdowns,
)

REQUEST_FIELDS = ["workload", "repeat", "request_id", "arrival_s", "start_s", "prompt_tokens", "output_tokens",
                  "ttft_s", "e2e_s", "ttft_send_s", "e2e_send_s", "tbt_s", "error", "prefill_s", "prefill_engine_id",
                  "first_chunk_s", "path", "predicted_ttft_s"]
# The scheduler's paths, as splitserve's Server-Timing names them (a request without one has none).
PATHS = ("split", "decode_local", "prefill_local")
# The checkout a compiled copy of the sources was built from (bench/sim_compile.py): where its runs' commit is read.
CHECKOUT_ENV = "SPLITSERVE_CHECKOUT"


def measured_commit() -> str:
    """The commit a result measured, `-dirty` when the working tree had uncommitted changes outside bench/results/;
    `unknown` outside git. A run from a compiled copy of the sources (bench/sim_compile.py) names the checkout it
    was built from in CHECKOUT_ENV."""
    root = Path(os.environ.get(CHECKOUT_ENV) or Path(__file__).resolve().parent.parent)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True,
                                text=True, check=True).stdout.strip()
        # Results being written (or cleared for a new run) do not change the code they measure.
        is_dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                        ":(exclude)bench/results"], cwd=root,
                                       capture_output=True, text=True, check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("-dirty" if is_dirty else "")


def write_requests_csv(records: list[RequestRecord], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=REQUEST_FIELDS)
        writer.writeheader()
        for record in records:
            writer.writerow({"workload": record.workload, "repeat": record.repeat, "request_id": record.request_id,
                             "arrival_s": record.arrival_s, "start_s": record.start_s,
                             "prompt_tokens": record.prompt_tokens, "output_tokens": record.output_tokens,
                             "ttft_s": record.ttft_s, "e2e_s": record.e2e_s, "ttft_send_s": record.ttft_send_s,
                             "e2e_send_s": record.e2e_send_s,
                             "tbt_s": " ".join(f"{gap:.6f}" for gap in record.tbt_s), "error": record.error or "",
                             "prefill_s": record.prefill_s, "prefill_engine_id": record.prefill_engine_id,
                             "first_chunk_s": record.first_chunk_s, "path": record.path,
                             "predicted_ttft_s": record.predicted_ttft_s})


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
                              first_chunk_s=number(row.get("first_chunk_s", "")), path=row.get("path", ""),
                              predicted_ttft_s=number(row.get("predicted_ttft_s", "")),
                              workload=row.get("workload", ""),
                              repeat=int(row.get("repeat") or 0))
                for row in csv.DictReader(handle)]


def request_sample(record: RequestRecord) -> RequestSample | None:
    """The request as the SLO arithmetic sees it; None for a failed one (a miss)."""
    if not record.is_ok or record.e2e_s is None or record.prompt_tokens < 1 or record.output_tokens < 1:
        return None
    return RequestSample(prompt_tokens=record.prompt_tokens, output_tokens=record.output_tokens,
                         ttft_s=record.ttft_s, tpot_s=record.tpot_s, e2e_s=record.e2e_s)


LATENCY_KEYS = ("ttft", "ttft_send", "tbt", "tpot", "e2e", "e2e_send")


def request_values(record: RequestRecord, key: str) -> list[float]:
    """One request's values of a latency (`LATENCY_KEYS`): every token gap for `tbt`, else its one value, none
    when it has none (a one-token answer has no `tpot`). The one reader of a record's latencies, for summary.csv
    and for the report's paired intervals alike."""
    if key == "tbt":
        return list(record.tbt_s)
    value = getattr(record, f"{key}_s")
    return [] if value is None else [value]


def latency_samples(records: list[RequestRecord]) -> dict[str, list[float]]:
    """Of the served requests: TTFT and E2E from arrival and from the send, every token gap (`tbt`), and each
    request's mean gap (`tpot`, Splitwise's TBT)."""
    ok = [record for record in records if record.is_ok]
    return {key: [value for record in ok for value in request_values(record, key)] for key in LATENCY_KEYS}


def span_s(records: list[RequestRecord]) -> float:
    """From the first arrival to the last answer, summed over repeats: the time the cell's tokens took."""
    total = 0.0
    for repeat in {record.repeat for record in records}:
        runs = [record for record in records if record.repeat == repeat]
        ends = [record.arrival_s + record.e2e_s for record in runs if record.is_ok]
        total += max(ends) - min(record.arrival_s for record in runs) if ends else 0.0
    return total


def decision_summary(records: list[RequestRecord]) -> dict[str, Any]:
    """The cell's mix of the scheduler's paths (shares of its answered requests), and how far its TTFT predictions
    were off: the median of |measured / predicted - 1|, with the TTFT measured from the send (the router's
    prediction starts at its decision, moments after the send). Empty where the server said nothing of either."""
    row: dict[str, Any] = {f"share_{path}": "" for path in PATHS}
    if any(record.path for record in records):
        for path in PATHS:
            row[f"share_{path}"] = round(sum(record.path == path for record in records) / len(records), 4)
    errors = [abs(record.ttft_send_s / record.predicted_ttft_s - 1) for record in records
              if record.predicted_ttft_s and record.ttft_send_s is not None]
    row["ttft_prediction_error_p50"] = round(float(np.median(errors)), 4) if errors else ""
    row["num_ttft_predictions"] = len(errors)
    return row


def summary_row(system: str, records: list[RequestRecord], duration_s: float, fit: ReferenceFit | None = None,
                generator: list[GeneratorStats] | None = None) -> dict[str, Any]:
    """One system's line of summary.csv for one cell; `fit` (the reference) adds the slowdowns and the SLO verdict."""
    ok = [record for record in records if record.is_ok]
    row: dict[str, Any] = {"system": system, "num_requests": len(records), "num_errors": len(records) - len(ok),
                           "duration_s": round(duration_s, 3),
                           "throughput_req_s": round(len(ok) / duration_s, 4) if duration_s > 0 else 0.0,
                           "throughput_tok_s": round(sum(r.output_tokens for r in ok) / duration_s, 2)
                           if duration_s > 0 else 0.0,
                           # Little's law: how loaded the cell really was (1 = one request at a time on average)
                           "mean_in_flight": round(sum(r.e2e_s for r in ok if r.e2e_s is not None) / duration_s, 3)
                           if duration_s > 0 else 0.0}
    for metric, values in latency_samples(records).items():
        for q in PERCENTILES:
            row[f"{metric}_p{q}_ms"] = round(float(np.percentile(values, q)) * 1e3, 2) if values else ""
    row.update(decision_summary(ok))
    lag = send_lag_summary(records)
    row.update(lag)
    row["is_generator_late"] = lag["send_lag_p99_ms"] > MAX_SEND_LAG_P99_S * 1e3
    if generator:
        row["generator_cpu_s"] = round(sum(stats.cpu_s for stats in generator), 2)
        row["generator_nice"] = max(stats.nice for stats in generator)
        groups = [stats.autogroup_nice for stats in generator if stats.autogroup_nice is not None]
        row["generator_autogroup_nice"] = max(groups) if groups else ""
        waits = [stats.run_queue_wait_s for stats in generator if stats.run_queue_wait_s is not None]
        row["generator_run_queue_wait_s"] = round(sum(waits), 3) if waits else ""
        stalls = [stats for stats in generator if stats.loop_stall_s is not None]
        row["generator_loop_stall_s"] = round(sum(stats.loop_stall_s for stats in stalls), 3) if stalls else ""
        row["generator_loop_stall_max_ms"] = max(stats.loop_stall_max_ms for stats in stalls) if stalls else ""
        steals = [stats.steal_s for stats in generator if stats.steal_s is not None]
        if steals:
            # The share of the machine's CPU the hypervisor took while the cell ran: stalls no priority avoids.
            row["host_steal_share"] = round(sum(steals) / (sum(stats.wall_s for stats in generator)
                                                           * (os.cpu_count() or 1)), 4)
    if fit is not None:
        samples = [request_sample(r) for r in records]
        percentiles = slowdown_percentiles(slowdowns(samples, fit))
        for metric, by_q in percentiles.items():
            for q, value in by_q.items():
                row[f"slowdown_{metric}_p{q}"] = round(value, 3)
        row["slo_margin"] = round(slo_margin(percentiles), 3)
        row["meets_slos"] = row["slo_margin"] <= 1
        row["slo_attainment"] = round(attainment(samples, fit), 4)
    return row


def write_summary_csv(rows: list[dict[str, Any]], path: Path) -> None:
    fields = list(dict.fromkeys(key for row in rows for key in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
