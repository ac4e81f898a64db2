"""Splitwise's SLOs, against one reference for every system, and goodput from a rate sweep.

Splitwise holds every design to the same yardstick: a request's **slowdown** is its latency divided by what the
reference (here the collocated baseline, uncontended, one request at a time) takes for a request of its size.
1. `fit_reference(samples)` fits that reference from ≥ 30 uncontended requests of one trace: TTFT linear in the
   prompt's tokens, the mean time between tokens (Splitwise's TBT, `tpot`) linear in the mean context while
   decoding, and E2E as TTFT plus the remaining tokens at that pace. Predictions never go below the fastest
   reference request seen, so a tiny request is not judged against an extrapolated near-zero time.
2. `slowdowns(records, fit)`: every request's TTFT, TBT and E2E slowdown. A failed request (an error, a 503, a
   timeout) is a miss: its slowdowns are infinite.
3. `slowdown_percentiles`: P50/P90/P99 of each, as the empirical quantile (numpy's "inverted_cdf": the smallest
   slowdown that at least q% of requests are within), so "P90 within 3×" means "at least 90% of requests within
   3×", and an infinite slowdown is counted, never interpolated into a NaN.
4. `slo_margin`: the largest of the nine percentiles divided by its bound (TTFT 2×/3×/6×, TBT and E2E
   1.25×/1.5×/5×). A cell meets the SLOs, all nine at once, when its margin is at most 1.
5. `goodput(margin_by_rate)`: the highest rate at which the SLOs still hold, interpolated between the last rate
   that meets them and the first that does not (linear in the margin); "at least" the top rate if every rate
   meets them, none if the lowest already fails.
6. `attainment(samples, fit)`: DistServe's view beside Splitwise's, the share of requests that are within the P90
   bounds on TTFT, TBT and E2E at once; `attainment_goodput` is the highest rate at which at least 90% are. All nine
   bounds at once include the P99s, which on a host where a prompt takes seconds to prefill one request stuck
   behind a long prompt decides; the share still separates systems there, and a failed request is a miss in both.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

PERCENTILES = (50, 90, 99)
SLO_FACTORS: dict[str, dict[int, float]] = {
    "ttft": {50: 2.0, 90: 3.0, 99: 6.0},
    "tbt": {50: 1.25, 90: 1.5, 99: 5.0},
    "e2e": {50: 1.25, 90: 1.5, 99: 5.0},
}
MIN_REFERENCE_REQUESTS = 30
ATTAINMENT_QUANTILE = 90  # a request attains the SLOs when it is within the P90 bounds on all three
ATTAINMENT_TARGET = 0.9  # and a rate is served well when at least this share of its requests do


class RequestSample(BaseModel):
    """One finished request: its size and latencies (TTFT and E2E from its scheduled arrival)."""

    model_config = ConfigDict(frozen=True)

    prompt_tokens: int = Field(ge=1)
    output_tokens: int = Field(ge=1)
    ttft_s: float
    tpot_s: float | None  # mean time between tokens; None for a one-token answer
    e2e_s: float


class LinearFit(BaseModel):
    """`max(floor, intercept + slope × x)`, fitted by least squares."""

    model_config = ConfigDict(frozen=True)

    intercept_s: float
    slope_s: float = Field(ge=0)
    floor_s: float = Field(gt=0)
    median_abs_error: float  # of the fit on its own samples, relative: how well it explains them

    def __call__(self, x: float) -> float:
        return max(self.floor_s, self.intercept_s + self.slope_s * x)

    @classmethod
    def fit(cls, xs: Sequence[float], ys: Sequence[float]) -> LinearFit:
        x, y = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
        if len(set(xs)) >= 2:
            slope, intercept = np.polyfit(x, y, 1)
        else:
            slope, intercept = 0.0, float(np.mean(y))
        if slope < 0:  # noise on a flat relation: a latency does not fall as requests grow
            slope, intercept = 0.0, float(np.mean(y))
        fitted = cls(intercept_s=float(intercept), slope_s=float(slope), floor_s=float(np.min(y)),
                     median_abs_error=0.0)
        errors = [abs(fitted(xi) - yi) / yi for xi, yi in zip(x, y, strict=True)]
        return fitted.model_copy(update={"median_abs_error": float(np.median(errors))})


class ReferenceFit(BaseModel):
    """What the reference takes, uncontended, for a request of a given size."""

    model_config = ConfigDict(frozen=True)

    num_requests: int
    ttft: LinearFit  # against prompt tokens
    tpot: LinearFit  # against the mean context while decoding: prompt + output / 2

    def ttft_s(self, prompt_tokens: int) -> float:
        return self.ttft(prompt_tokens)

    def tpot_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.tpot(prompt_tokens + output_tokens / 2)

    def e2e_s(self, prompt_tokens: int, output_tokens: int) -> float:
        return self.ttft_s(prompt_tokens) + (output_tokens - 1) * self.tpot_s(prompt_tokens, output_tokens)


class Reference(BaseModel):
    """The one reference of a comparison: which system and commit it was measured on, and its fit per trace
    ("all": every uncontended request pooled, for cells of a trace with none of its own, such as the anchors)."""

    model_config = ConfigDict(frozen=True)

    system: str
    commit: str
    fits: dict[str, ReferenceFit]

    def for_trace(self, trace: str) -> ReferenceFit:
        return self.fits.get(trace) or self.fits["all"]


def fit_reference(samples: Sequence[RequestSample], *, min_requests: int = MIN_REFERENCE_REQUESTS) -> ReferenceFit:
    if len(samples) < min_requests:
        raise ValueError(f"a reference needs at least {min_requests} uncontended requests; got {len(samples)}")
    with_gaps = [sample for sample in samples if sample.tpot_s is not None]
    return ReferenceFit(
        num_requests=len(samples),
        ttft=LinearFit.fit([s.prompt_tokens for s in samples], [s.ttft_s for s in samples]),
        tpot=LinearFit.fit([s.prompt_tokens + s.output_tokens / 2 for s in with_gaps], [s.tpot_s for s in with_gaps]))


def slowdowns(samples: Sequence[RequestSample | None], fit: ReferenceFit) -> dict[str, list[float]]:
    """Each request's slowdowns; None stands for a failed request, a miss on all three."""
    result: dict[str, list[float]] = {"ttft": [], "tbt": [], "e2e": []}
    for sample in samples:
        if sample is None:
            for values in result.values():
                values.append(math.inf)
            continue
        result["ttft"].append(sample.ttft_s / fit.ttft_s(sample.prompt_tokens))
        if sample.tpot_s is not None:  # a one-token answer has no time between tokens
            result["tbt"].append(sample.tpot_s / fit.tpot_s(sample.prompt_tokens, sample.output_tokens))
        result["e2e"].append(sample.e2e_s / fit.e2e_s(sample.prompt_tokens, sample.output_tokens))
    return result


def slowdown_percentiles(values_by_metric: dict[str, list[float]]) -> dict[str, dict[int, float]]:
    return {metric: {q: float(np.percentile(np.asarray(values), q, method="inverted_cdf")) for q in PERCENTILES}
            for metric, values in values_by_metric.items() if values}


def slo_margin(percentiles: dict[str, dict[int, float]]) -> float:
    """The worst of the nine percentiles over its bound: ≤ 1 meets every SLO; inf when nothing was served."""
    ratios = [percentiles[metric][q] / SLO_FACTORS[metric][q] for metric in SLO_FACTORS if metric in percentiles
              for q in PERCENTILES]
    return max(ratios) if ratios else math.inf


class Goodput(BaseModel):
    model_config = ConfigDict(frozen=True)

    rate_per_s: float | None  # None: the lowest rate measured already misses the SLOs
    kind: Literal["interpolated", "at_least", "below_lowest"]

    def __str__(self) -> str:
        if self.kind == "below_lowest":
            return "below the lowest rate"
        return f"≥ {self.rate_per_s:.3g}" if self.kind == "at_least" else f"{self.rate_per_s:.3g}"


def goodput(margin_by_rate: dict[float, float]) -> Goodput:
    rates = sorted(margin_by_rate)
    if not rates or margin_by_rate[rates[0]] > 1:
        return Goodput(rate_per_s=None, kind="below_lowest")
    for low, high in zip(rates, rates[1:]):
        low_margin, high_margin = margin_by_rate[low], margin_by_rate[high]
        if high_margin > 1:
            if math.isinf(high_margin):  # nothing to interpolate against: the last rate that held
                return Goodput(rate_per_s=low, kind="interpolated")
            share = (1 - low_margin) / (high_margin - low_margin)
            return Goodput(rate_per_s=low + share * (high - low), kind="interpolated")
    return Goodput(rate_per_s=rates[-1], kind="at_least")


def attainment(samples: Sequence[RequestSample | None], fit: ReferenceFit) -> float:
    """The share of requests within the P90 bounds on TTFT, TBT and E2E at once; None (failed) never is."""
    bounds = {metric: SLO_FACTORS[metric][ATTAINMENT_QUANTILE] for metric in SLO_FACTORS}
    num_met = 0
    for sample in samples:
        if sample is None:
            continue
        is_within_tbt = sample.tpot_s is None or (
            sample.tpot_s / fit.tpot_s(sample.prompt_tokens, sample.output_tokens) <= bounds["tbt"])
        num_met += (sample.ttft_s / fit.ttft_s(sample.prompt_tokens) <= bounds["ttft"] and is_within_tbt
                    and sample.e2e_s / fit.e2e_s(sample.prompt_tokens, sample.output_tokens) <= bounds["e2e"])
    return num_met / len(samples) if samples else 0.0


def attainment_goodput(attainment_by_rate: dict[float, float], *, target: float = ATTAINMENT_TARGET) -> Goodput:
    """The highest rate at which at least `target` of the requests attain the SLOs, interpolated linearly in the
    share between the last rate that does and the first that does not."""
    # As a margin that is at most 1 exactly when the share reaches the target (rounded: 1 + 0.9 - 0.9 is not 1.0).
    return goodput({rate: round(1 + target - share, 12) for rate, share in attainment_by_rate.items()})
