"""Request-level bootstrap intervals for ratios of medians, so that a benchmark's difference is only called one
when its interval excludes 1.

1. `ratio_interval(samples, baseline)`: the ratio of the two medians and its percentile-bootstrap interval, each
   side resampled with replacement (requests are the unit; seeded, so a rerun prints the same numbers).
2. `python -m bench.bootstrap FILE.csv --group system --baseline collocated --columns ttft_s e2e_s`: that ratio
   for every group and column of a per-request CSV (e.g. bench/results/served_transfer/requests.csv), marking
   the ones whose interval crosses 1 as not separable.
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
from dataclasses import dataclass
from pathlib import Path


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
