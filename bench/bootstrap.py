"""Request-level bootstrap intervals for ratios of medians, so that a benchmark's difference is only called one
when its interval excludes 1.

1. `ratio_interval(samples, baseline)`: the ratio of the two medians and its percentile-bootstrap interval, each
   side resampled with replacement (requests are the unit; seeded, so a rerun prints the same numbers).
2. `paired_ratio_interval(system, baseline, q)`: the same for two systems that served the same requests (a
   comparison's cell): one resample of the requests is applied to both sides, so the interval reflects the
   difference between the systems, not which requests happened to be drawn. A request carries one value (its TTFT)
   or many (its token gaps); the statistic is the q-th percentile of all values of the drawn requests.
3. `python -m bench.bootstrap FILE.csv --group system --baseline collocated --columns ttft_s e2e_s`: that ratio
   for every group and column of a per-request CSV (e.g. bench/results/served_transfer/requests.csv), marking
   the ones whose interval crosses 1 as not separable.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class RatioInterval:
    ratio: float
    low: float
    high: float

    @property
    def is_separable(self) -> bool:
        """Whether the interval excludes "no difference"."""
        return self.high < 1 or self.low > 1


def ratio_interval(samples: list[float], baseline: list[float], *, confidence: float = 0.95,
                   num_resamples: int = 10_000, seed: int = 0) -> RatioInterval:
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(samples, k=len(samples)))
                    / statistics.median(rng.choices(baseline, k=len(baseline))) for _ in range(num_resamples))
    tail = (1 - confidence) / 2
    low, high = ratios[int(tail * num_resamples)], ratios[min(num_resamples - 1, int((1 - tail) * num_resamples))]
    return RatioInterval(statistics.median(samples) / statistics.median(baseline), low, high)


def paired_ratio_interval(system: Sequence[Sequence[float]], baseline: Sequence[Sequence[float]], q: float, *,
                          confidence: float = 0.95, num_resamples: int = 2_000, seed: int = 0) -> RatioInterval:
    """`system[i]` and `baseline[i]` are the values of request i on each side (the same request)."""
    if len(system) != len(baseline) or not system:
        raise ValueError("paired samples need the same, non-zero number of requests on both sides")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(system), size=(num_resamples, len(system)))
    if all(len(values) == 1 for values in (*system, *baseline)):  # one value per request: vectorized
        ours, theirs = np.array([v[0] for v in system]), np.array([v[0] for v in baseline])
        ratios = np.percentile(ours[draws], q, axis=1) / np.percentile(theirs[draws], q, axis=1)
    else:
        ours_by_request = [np.asarray(v, dtype=float) for v in system]
        theirs_by_request = [np.asarray(v, dtype=float) for v in baseline]
        ratios = np.array([
            np.percentile(np.concatenate([ours_by_request[i] for i in draw]), q)
            / np.percentile(np.concatenate([theirs_by_request[i] for i in draw]), q) for draw in draws])
    tail = (1 - confidence) / 2
    low, high = np.quantile(ratios, [tail, 1 - tail])
    point = (np.percentile(np.concatenate([np.asarray(v, dtype=float) for v in system]), q)
             / np.percentile(np.concatenate([np.asarray(v, dtype=float) for v in baseline]), q))
    return RatioInterval(float(point), float(low), float(high))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("csv", type=Path)
    parser.add_argument("--group", default="system")
    parser.add_argument("--baseline", required=True)
    parser.add_argument("--columns", nargs="+", required=True)
    args = parser.parse_args()
    groups: dict[str, list[dict[str, str]]] = {}
    for row in csv.DictReader(args.csv.open()):
        groups.setdefault(row[args.group], []).append(row)
    print(f"| {args.group} | column | n | ratio of medians to {args.baseline} | 95% interval | separable |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, rows in groups.items():
        if name == args.baseline:
            continue
        for column in args.columns:
            samples = [float(row[column]) for row in rows if row[column]]
            baseline = [float(row[column]) for row in groups[args.baseline] if row[column]]
            if not samples or not baseline:
                continue
            interval = ratio_interval(samples, baseline)
            print(f"| {name} | {column} | {len(samples)} | {interval.ratio:.3f} | "
                  f"{interval.low:.3f}-{interval.high:.3f} | {'yes' if interval.is_separable else 'no'} |")


if __name__ == "__main__":
    main()
