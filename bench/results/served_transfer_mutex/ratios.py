"""nixl against the plain vLLM engine (collocated), one request at a time: ratios of medians (nixl / collocated)
with 95% bootstrap intervals (bench.bootstrap.ratio_interval), per start and pooled over the three starts of each
(the first run's report.md, round1, round2)."""

import csv
from pathlib import Path

from bench.bootstrap import ratio_interval

HERE = Path(__file__).parent
RUNS = {"first": HERE, "round1": HERE / "round1", "round2": HERE / "round2"}


def column(folder: Path, system: str, name: str) -> list[float]:
    return [float(row[name]) for row in csv.DictReader(open(folder / "requests.csv")) if row["system"] == system]


for label, folders in [*((name, [folder]) for name, folder in RUNS.items()), ("pooled", list(RUNS.values()))]:
    print(label)
    for name in ("ttft_s", "second_token_s", "e2e_s"):
        nixl = [v for folder in folders for v in column(folder, "nixl", name)]
        collocated = [v for folder in folders for v in column(folder, "collocated", name)]
        interval = ratio_interval(nixl, collocated)
        print(f"  {name}: {interval.ratio:.2f}x [{interval.low:.2f}-{interval.high:.2f}] "
              f"(n={len(nixl)}/{len(collocated)})")
