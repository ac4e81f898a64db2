"""bench/slo.py: Splitwise's SLOs against one reference, checked against numbers worked out by hand."""

from __future__ import annotations

import math

import pytest

from bench.slo import (
    Goodput,
    LinearFit,
    RequestSample,
    attainment,
    attainment_goodput,
    fit_reference,
    goodput,
    slo_margin,
    slowdown_percentiles,
    slowdowns,
)


def _sample(prompt: int, output: int, ttft: float, tpot: float) -> RequestSample:
    return RequestSample(prompt_tokens=prompt, output_tokens=output, ttft_s=ttft,
                         tpot_s=tpot if output > 1 else None, e2e_s=ttft + (output - 1) * tpot)


def _reference():
    # 30 uncontended requests of the reference: TTFT = 100 ms + 1 ms per prompt token, 50 ms between tokens
    # whatever the context: exactly what the fit must find.
    samples = [_sample(100 + 20 * i, 10 + i, 0.1 + 0.001 * (100 + 20 * i), 0.05) for i in range(30)]
    return fit_reference(samples)


def test_the_reference_fit_recovers_a_known_relation():
    fit = _reference()
    assert fit.num_requests == 30
    assert (fit.ttft.intercept_s, fit.ttft.slope_s) == pytest.approx((0.1, 0.001))
    assert (fit.tpot.intercept_s, fit.tpot.slope_s) == pytest.approx((0.05, 0.0), abs=1e-9)
    assert fit.ttft.median_abs_error == pytest.approx(0.0, abs=1e-9)
    # A 400-token prompt with 11 output tokens: 0.5 s to the first token, then 10 gaps of 50 ms.
    assert fit.ttft_s(400) == pytest.approx(0.5)
    assert fit.e2e_s(400, 11) == pytest.approx(1.0)
    # Below the smallest request it saw, the fit does not extrapolate toward zero: it stops at the fastest one.
    assert fit.ttft_s(1) == pytest.approx(0.2)


def test_a_reference_needs_thirty_requests_and_a_negative_slope_is_noise():
    with pytest.raises(ValueError, match="at least 30"):
        fit_reference([_sample(100, 10, 0.2, 0.05)] * 29)
    flat = LinearFit.fit([1, 2, 3], [0.3, 0.2, 0.1])
    assert (flat.slope_s, flat.intercept_s) == (0.0, pytest.approx(0.2))


def test_slowdowns_and_the_nine_bounds_worked_by_hand():
    fit = _reference()
    # Ten requests of 400 prompt tokens and 11 output tokens: reference TTFT 0.5 s, TBT 0.05 s, E2E 1.0 s.
    # TTFT 2× the reference for nine of them and 5× for one; TBT 1.2× for all; E2E = TTFT + 10 gaps.
    loaded = [_sample(400, 11, 1.0, 0.06)] * 9 + [_sample(400, 11, 2.5, 0.06)]
    found = slowdowns(loaded, fit)
    assert found["ttft"] == pytest.approx([2.0] * 9 + [5.0])
    assert found["tbt"] == pytest.approx([1.2] * 10)
    assert found["e2e"] == pytest.approx([1.6] * 9 + [3.1])  # (1.0 + 0.6) / 1.0 and (2.5 + 0.6) / 1.0
    percentiles = slowdown_percentiles(found)
    assert percentiles["ttft"] == pytest.approx({50: 2.0, 90: 2.0, 99: 5.0})
    assert percentiles["e2e"] == pytest.approx({50: 1.6, 90: 1.6, 99: 3.1})
    # The worst of the nine against its bound: E2E P50 1.6 against 1.25 -> 1.28: the SLOs are missed.
    assert slo_margin(percentiles) == pytest.approx(1.6 / 1.25)

    # Half as slow everywhere meets all nine: the worst is TTFT P99 2.5 / 6, E2E P50 0.8 / 1.25, TBT P50 0.6 / 1.25.
    fast = [_sample(400, 11, 0.5, 0.03)] * 9 + [_sample(400, 11, 1.25, 0.03)]
    assert slo_margin(slowdown_percentiles(slowdowns(fast, fit))) == pytest.approx(max(0.8 / 1.25, 2.5 / 6, 0.6 / 1.25))


def test_a_failed_request_is_a_miss():
    fit = _reference()
    served = [_sample(400, 11, 0.5, 0.05)] * 98
    assert slo_margin(slowdown_percentiles(slowdowns(served, fit))) == pytest.approx(1 / 1.25)
    # One failure in 100 leaves 99% within: P99 holds. Two do not.
    one_failed = slowdown_percentiles(slowdowns([*served, _sample(400, 11, 0.5, 0.05), None], fit))
    assert one_failed["ttft"][99] == pytest.approx(1.0)
    two_failed = slowdown_percentiles(slowdowns([*served, None, None], fit))
    assert two_failed["ttft"][50] == pytest.approx(1.0) and math.isinf(two_failed["ttft"][99])
    assert math.isinf(slo_margin(two_failed))
    assert math.isinf(slo_margin(slowdown_percentiles(slowdowns([None], fit))))


def test_goodput_is_interpolated_where_the_margin_crosses_one():
    # Meets at 0.5 and 1.0 (margin 0.9), misses at 1.5 (margin 1.3): the crossing is a quarter of the way.
    assert goodput({0.5: 0.6, 1.0: 0.9, 1.5: 1.3, 2.0: 3.0}) == Goodput(rate_per_s=1.125, kind="interpolated")
    assert goodput({1.0: 0.9, 0.5: 0.6}) == Goodput(rate_per_s=1.0, kind="at_least")
    assert goodput({0.5: 1.01, 1.0: 2.0}) == Goodput(rate_per_s=None, kind="below_lowest")
    # Failures at the next rate: no slope to interpolate along; the last rate that met them.
    assert goodput({0.5: 0.5, 1.0: math.inf}) == Goodput(rate_per_s=0.5, kind="interpolated")
    assert str(goodput({0.5: 0.6, 1.0: 0.9})) == "≥ 1" and str(goodput({0.5: 2.0})) == "below the lowest rate"


def test_attainment_counts_requests_within_all_three_p90_bounds_worked_by_hand():
    fit = _reference()
    # Against a reference of TTFT 0.5 s, TBT 0.05 s, E2E 1.0 s (400 prompt, 11 output tokens), bounds 3×, 1.5×, 1.5×:
    within = _sample(400, 11, 0.9, 0.06)  # TTFT 1.8×, TBT 1.2×, E2E 1.5× exactly: within all three
    slow_first = _sample(400, 11, 1.6, 0.06)  # TTFT 3.2×: out
    slow_gaps = _sample(400, 11, 0.5, 0.08)  # TBT 1.6×: out (E2E 1.3× is within)
    slow_whole = _sample(400, 11, 1.4, 0.011)  # TTFT 2.8×, TBT 0.22×, E2E 1.51×: out on E2E alone
    one_token = RequestSample(prompt_tokens=400, output_tokens=1, ttft_s=1.0, tpot_s=None, e2e_s=1.0)  # no gaps
    samples = [within, within, slow_first, slow_gaps, slow_whole, one_token, None, within, within, within]
    # The one-token answer has no gaps to judge, but its E2E is its TTFT, 2× a reference E2E of 0.5 s: out.
    assert fit.e2e_s(400, 1) == pytest.approx(0.5)
    assert attainment(samples, fit) == pytest.approx(5 / 10)  # the failed request (None) counts as a miss
    assert attainment([], fit) == 0.0


def test_attainment_goodput_is_interpolated_where_the_share_crosses_ninety_percent():
    # 95% at 0.5/s, 85% at 1.0/s: 90% is crossed halfway.
    found = attainment_goodput({0.5: 0.95, 1.0: 0.85})
    assert (found.rate_per_s, found.kind) == (pytest.approx(0.75), "interpolated")
    assert attainment_goodput({0.5: 0.99, 1.0: 0.9}) == Goodput(rate_per_s=1.0, kind="at_least")
    assert attainment_goodput({0.5: 0.89, 1.0: 0.5}) == Goodput(rate_per_s=None, kind="below_lowest")
