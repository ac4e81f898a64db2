"""bench/bootstrap.py: a ratio of medians with its bootstrap interval; a difference counts only when the interval
excludes 1."""

from __future__ import annotations

import subprocess
import sys

from bench.bootstrap import ratio_interval
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
    assert "| nixl | ttft_s | 8 |" in result.stdout
