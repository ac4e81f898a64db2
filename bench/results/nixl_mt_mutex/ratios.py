"""nixl (UCX's mutex, the default) against nixl_ucx_spin over three rounds (three starts each, pooled): ratios of
medians (mutex / spin) with 95% bootstrap intervals (bench.bootstrap.ratio_interval), per round and pooled; or over
the folders named (`ratios.py load`: the run under load)."""

import csv
import sys
from pathlib import Path

from bench.bootstrap import ratio_interval

HERE = Path(__file__).parent


def column(path: Path, system: str, name: str) -> list[float]:
    return [float(row[name]) for row in csv.DictReader(open(path)) if row["system"] == system]


for rounds in ([sys.argv[1:]] if sys.argv[1:] else (["round1"], ["round2"], ["round3"], ["round1", "round2", "round3"])):
    print(" + ".join(rounds))
    for file, name in (("transfers.csv", "load_s"), ("requests.csv", "ttft_s"), ("requests.csv", "second_token_s"),
                       ("requests.csv", "e2e_s")):
        spin = [v for r in rounds for v in column(HERE / r / file, "nixl_ucx_spin", name)]
        mutex = [v for r in rounds for v in column(HERE / r / file, "nixl", name)]
        interval = ratio_interval(mutex, spin)
        print(f"  {name}: {interval.ratio:.2f}x [{interval.low:.2f}-{interval.high:.2f}] "
              f"(n={len(mutex)}/{len(spin)})")
