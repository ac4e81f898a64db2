"""bench/bootstrap.py: a ratio of medians with its bootstrap interval; a difference counts only when the interval
excludes 1."""

from __future__ import annotations

import re
import subprocess
import sys

from bench.bootstrap import RatioInterval, ratio_interval
from serve_app.config import PROJECT_ROOT


def test_a_clear_difference_is_separable_and_equal_samples_are_not():
    slow, fast = [2.0, 2.1, 1.9, 2.05, 1.95] * 4, [1.0, 1.1, 0.9, 1.05, 0.95] * 4
    clear = ratio_interval(slow, fast)
    assert abs(clear.ratio - 2.0) < 0.01 and clear.low > 1.5 and clear.is_separable
    same = ratio_interval(fast, list(reversed(fast)))
    assert same.ratio == 1.0 and same.low <= 1 <= same.high and not same.is_separable


def test_the_interval_is_reproducible():
    samples, baseline = [1.0, 1.3, 0.8, 1.2, 1.1], [1.0, 0.9, 1.05, 1.1, 0.95]
    assert ratio_interval(samples, baseline) == ratio_interval(samples, baseline)


def test_the_command_reads_a_committed_per_request_file():
    result = subprocess.run([sys.executable, "-m", "bench.bootstrap", "bench/results/served_transfer/requests.csv",
                             "--baseline", "collocated", "--columns", "ttft_s"], cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=120, check=True)
    # One row per system, with its number of requests (however many the committed run measured).
    assert re.search(r"^\| nixl \| ttft_s \| \d+ \| \d", result.stdout, re.MULTILINE), result.stdout


def test_a_paired_interval_covers_a_known_ratio_and_pairing_removes_the_requests_own_spread():
    import numpy as np

    from bench.bootstrap import paired_ratio_interval

    rng = np.random.default_rng(1)
    # Requests whose sizes spread latencies over 10×; the system is 1.2× the baseline on every request, ± 5% noise.
    sizes = rng.uniform(0.1, 1.0, 200)
    baseline = [[size * rng.lognormal(0, 0.05)] for size in sizes]
    system = [[1.2 * size * rng.lognormal(0, 0.05)] for size in sizes]
    found = paired_ratio_interval(system, baseline, 50)
    assert found.low < 1.2 < found.high and found.is_separable
    assert found.high - found.low < 0.15  # the same requests on both sides: most of the sizes' spread cancels
    unpaired = ratio_interval([v[0] for v in system], [v[0] for v in baseline])
    assert unpaired.high - unpaired.low > 2 * (found.high - found.low)
    # No difference: the interval holds 1.
    same = paired_ratio_interval(baseline, [[v[0] * rng.lognormal(0, 0.05)] for v in baseline], 90)
    assert same.low <= 1 <= same.high and not same.is_separable


def test_a_paired_interval_over_every_gap_of_the_drawn_requests():
    from bench.bootstrap import paired_ratio_interval

    baseline = [[0.05] * 10 for _ in range(20)]
    system = [[0.1] * 10 for _ in range(20)]
    assert paired_ratio_interval(system, baseline, 90) == RatioInterval(2.0, 2.0, 2.0)
