"""Request traces: read (SplitwiseSim's CSV, Azure's LLM inference traces), scale to this host, synthesize.

1. `read_trace(path)` turns either format into `TraceRequest`s with arrival times relative to the first request.
2. `scale_trace(requests, Scaling(...))` fits a production trace to a small host: a time window, a rate factor
   (arrivals stretched or compressed), and token counts scaled and clipped. The `Scaling` is recorded with
   every result, so a figure always says what traffic it saw.
   `scaling_for_rate(...)` picks the window and rate factor that replay a trace's own arrival pattern at a
   chosen mean rate for a chosen time.
3. `poisson_trace(...)` makes open-loop arrivals at a fixed rate with token sizes sampled from a real trace.
4. `write_splitwise_csv` writes SplitwiseSim's format, so traces round-trip between the two tools.
"""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

SPLITWISE_FIELDS = ["request_id", "request_type", "application_id", "arrival_timestamp", "batch_size",
                    "prompt_size", "token_size"]
AZURE_FIELDS = ["TIMESTAMP", "ContextTokens", "GeneratedTokens"]
LLM_INFERENCE_REQUEST_TYPE = 2  # SplitwiseSim's type for generative LLM inference


class TraceRequest(BaseModel):
    model_config = ConfigDict(frozen=True)

    request_id: int
    arrival_s: float = Field(ge=0)  # seconds after the trace's first request
    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)


class Scaling(BaseModel):
    """How a trace was fitted to this host; every field is applied in the order listed."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    start_s: float = Field(0.0, ge=0)  # window of the source trace, in its own seconds
    duration_s: float | None = Field(None, gt=0)
    rate_factor: float = Field(1.0, gt=0)  # 0.1: a tenth of the source's request rate (arrivals 10× apart)
    prompt_scale: float = Field(1.0, gt=0)
    max_prompt_tokens: int | None = Field(None, ge=1)
    output_scale: float = Field(1.0, gt=0)
    max_output_tokens: int | None = Field(None, ge=1)
    max_requests: int | None = Field(None, ge=1)


def read_trace(path: Path) -> list[TraceRequest]:
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        fields = reader.fieldnames or []
        rows = list(reader)
    if set(SPLITWISE_FIELDS) <= set(fields):
        arrivals = [float(row["arrival_timestamp"]) for row in rows]
        sizes = [(int(row["prompt_size"]), int(row["token_size"])) for row in rows]
        ids = [int(row["request_id"]) for row in rows]
    elif set(AZURE_FIELDS) <= set(fields):
        # Azure writes 7 fractional digits; datetime takes 6.
        arrivals = [datetime.fromisoformat(row["TIMESTAMP"][:26]).timestamp() for row in rows]
        sizes = [(int(row["ContextTokens"]), int(row["GeneratedTokens"])) for row in rows]
        ids = list(range(len(rows)))
    else:
        raise ValueError(f"{path}: neither a SplitwiseSim trace ({', '.join(SPLITWISE_FIELDS)}) nor an Azure "
                         f"LLM inference trace ({', '.join(AZURE_FIELDS)}); columns are {fields}")
    if not rows:
        return []
    first = min(arrivals)
    requests = [TraceRequest(request_id=request_id, arrival_s=arrival - first, prompt_tokens=max(1, prompt),
                             output_tokens=max(1, output))
                for request_id, arrival, (prompt, output) in zip(ids, arrivals, sizes, strict=True)]
    return sorted(requests, key=lambda request: request.arrival_s)


def _scaled(count: int, scale: float, limit: int | None) -> int:
    value = max(1, round(count * scale))
    return min(value, limit) if limit is not None else value


def scale_trace(requests: list[TraceRequest], scaling: Scaling) -> list[TraceRequest]:
    end = scaling.start_s + scaling.duration_s if scaling.duration_s is not None else float("inf")
    window = [request for request in requests if scaling.start_s <= request.arrival_s < end]
    scaled = [
        TraceRequest(
            request_id=index,
            arrival_s=(request.arrival_s - scaling.start_s) / scaling.rate_factor,
            prompt_tokens=_scaled(request.prompt_tokens, scaling.prompt_scale, scaling.max_prompt_tokens),
            output_tokens=_scaled(request.output_tokens, scaling.output_scale, scaling.max_output_tokens),
        )
        for index, request in enumerate(window)
    ]
    return scaled[:scaling.max_requests] if scaling.max_requests is not None else scaled


def scaling_for_rate(requests: list[TraceRequest], *, rate_per_s: float, duration_s: float, start_s: float = 0.0,
                     **token_scaling: Any) -> Scaling:
    """The Scaling that replays `requests` from `start_s` at a mean of `rate_per_s` for `duration_s` seconds:
    the source window holding rate × duration requests, stretched or compressed to `duration_s`. Bursts and lulls
    of the real trace are kept; only the time axis changes. `token_scaling`: Scaling's token fields."""
    if rate_per_s <= 0 or duration_s <= 0:
        raise ValueError("a rate and a duration must be positive")
    num_requests = max(1, round(rate_per_s * duration_s))
    after = [request.arrival_s for request in requests if request.arrival_s >= start_s]
    if len(after) < num_requests:
        raise ValueError(f"the trace has {len(after)} requests after {start_s} s; {num_requests} are needed")
    if len(after) > num_requests:
        source_span = after[num_requests] - start_s  # the window ends where the next request would arrive
    else:
        source_span = (after[-1] - start_s) * num_requests / max(1, num_requests - 1) or 1.0
    return Scaling(start_s=start_s, duration_s=source_span, rate_factor=source_span / duration_s, **token_scaling)


def poisson_trace(*, rate_per_s: float, num_requests: int, sizes_from: list[TraceRequest],
                  seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals at `rate_per_s`; (prompt, output) pairs drawn together from `sizes_from`."""
    if rate_per_s <= 0 or num_requests < 1 or not sizes_from:
        raise ValueError("a Poisson trace needs a positive rate, at least one request and sizes to draw from")
    # Gaps and sizes from two streams of one seed: the first requests and their order of gaps are the same whatever
    # `num_requests` is, and at another rate only the time axis changes, so a sweep's cells send the same draws.
    gap_stream, size_stream = (np.random.default_rng(child) for child in np.random.SeedSequence(seed).spawn(2))
    # A Poisson process given its count: the requests fill [0, n / rate) and the next would arrive at its end, as in
    # a replayed window (`scaling_for_rate`), so the offered rate is the rate asked, not a draw's 10% off it.
    cumulative = np.cumsum(gap_stream.exponential(1.0, num_requests + 1))
    arrivals = (cumulative[:-1] - cumulative[0]) / (cumulative[-1] - cumulative[0]) * num_requests / rate_per_s
    picks = size_stream.integers(0, len(sizes_from), num_requests)
    return [TraceRequest(request_id=index, arrival_s=float(arrival),
                         prompt_tokens=sizes_from[pick].prompt_tokens, output_tokens=sizes_from[pick].output_tokens)
            for index, (arrival, pick) in enumerate(zip(arrivals, picks, strict=True))]


def write_splitwise_csv(requests: list[TraceRequest], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=SPLITWISE_FIELDS)
        writer.writeheader()
        for request in requests:
            writer.writerow({"request_id": request.request_id, "request_type": LLM_INFERENCE_REQUEST_TYPE,
                             "application_id": 0, "arrival_timestamp": f"{request.arrival_s:.6f}",
                             "batch_size": 1, "prompt_size": request.prompt_tokens,
                             "token_size": request.output_tokens})
