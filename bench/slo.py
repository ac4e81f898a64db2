"""Latency percentiles, Splitwise's SLOs, and goodput.

Splitwise sets SLOs relative to the same system's uncontended run (one request at a time):
P50/P90/P99 of TTFT within 2×/3×/6× of it, and of TBT and E2E within 1.25×/1.5×/5×.
1. `slo_bounds(uncontended)` turns an uncontended run's latencies into those bounds.
2. `meets_slos(run, bounds)`: whether a loaded run keeps all nine percentiles within their bounds.
3. `slo_attainment(run, bounds)`: the share of requests within the P90 bounds of what a request controls: its
   TTFT, and its time per output token (the mean of its gaps, which tokens bunched in delivery do not distort).
   E2E is not checked per request: it grows with the request's own output length, so a long answer would fail
   a bound taken from a mix of shorter ones; E2E percentiles are still part of `meets_slos`.
4. `goodput(attainment_by_rate)`: the highest request rate at which attainment is at least 90%.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict

PERCENTILES = (50, 90, 99)
SLO_FACTORS = {
    "ttft": {50: 2.0, 90: 3.0, 99: 6.0},
    "tbt": {50: 1.25, 90: 1.5, 99: 5.0},
    "e2e": {50: 1.25, 90: 1.5, 99: 5.0},
}
GOODPUT_ATTAINMENT = 0.9


class RequestLatency(BaseModel):
    """One request as the load generator saw it; `tbt_s` holds every gap between consecutive output tokens."""

    model_config = ConfigDict(frozen=True)

    ttft_s: float
    tbt_s: tuple[float, ...]
    e2e_s: float


def percentile(values: list[float] | tuple[float, ...], q: float) -> float:
    if not values:
        raise ValueError("no values to take a percentile of")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def latency_samples(run: list[RequestLatency]) -> dict[str, list[float]]:
    """Every TTFT, TPOT (a request's mean gap) and E2E, one per request, and every inter-token gap."""
    return {"ttft": [r.ttft_s for r in run], "tbt": [gap for r in run for gap in r.tbt_s],
            "tpot": [float(np.mean(r.tbt_s)) for r in run if r.tbt_s], "e2e": [r.e2e_s for r in run]}


def latency_percentiles(run: list[RequestLatency]) -> dict[str, dict[int, float]]:
    return {metric: {q: percentile(values, q) for q in PERCENTILES}
            for metric, values in latency_samples(run).items() if values}


def slo_bounds(uncontended: list[RequestLatency]) -> dict[str, dict[int, float]]:
    measured = latency_percentiles(uncontended)
    return {metric: {q: SLO_FACTORS[metric][q] * measured[metric][q] for q in PERCENTILES}
            for metric in SLO_FACTORS if metric in measured}


def meets_slos(run: list[RequestLatency], bounds: dict[str, dict[int, float]]) -> bool:
    measured = latency_percentiles(run)
    return all(measured[metric][q] <= bounds[metric][q] for metric in bounds if metric in measured
               for q in PERCENTILES)


def slo_attainment(run: list[RequestLatency], bounds: dict[str, dict[int, float]]) -> float:
    if not run:
        return 0.0

    def attains(request: RequestLatency) -> bool:
        tpot_ok = not request.tbt_s or float(np.mean(request.tbt_s)) <= bounds["tbt"][90]
        return request.ttft_s <= bounds["ttft"][90] and tpot_ok

    return sum(attains(request) for request in run) / len(run)


def goodput(attainment_by_rate: dict[float, float], threshold: float = GOODPUT_ATTAINMENT) -> float | None:
    """The highest rate whose attainment reaches `threshold`; None if no rate does."""
    passing = [rate for rate, attainment in attainment_by_rate.items() if attainment >= threshold]
    return max(passing) if passing else None
