"""One request at a time, per start (round1-round4) and pooled over the starts that ran both systems of a pair:
each system's TTFT, second token and E2E against the plain vLLM engine (collocated, on prefill's core 0), and nixl
against `serve_path_decode_core` (splitserve in collocated mode with one engine on decode's core 1: the same core,
the same Serve path, no split). Ratios of medians with 95% bootstrap intervals (bench.bootstrap.ratio_interval).
Last, nixl against the plain engine over six starts of each: the three here that ran the plain engine and
served_transfer_mutex's three (54dfded and 800b545, the same app code as 17119c9 but for two comments).
`python bench/results/served_transfer_decode_core/ratios.py > bench/results/served_transfer_decode_core/ratios.txt`"""

import csv
from pathlib import Path

from bench.bootstrap import ratio_interval

HERE = Path(__file__).parent
RUNS = {"round1": HERE / "round1", "round2": HERE / "round2", "round3": HERE / "round3", "round4": HERE / "round4"}
PAIRS = [("serve_path", "collocated"), ("serve_path_decode_core", "collocated"), ("nixl", "collocated"),
         ("nixl", "serve_path_decode_core")]


def column(folder: Path, system: str, name: str) -> list[float]:
    return [float(row[name]) for row in csv.DictReader(open(folder / "requests.csv")) if row["system"] == system]


def ratios(system: str, baseline: str, folders: list[Path], *, is_count_shown: bool = False) -> str:
    """TTFT, second token and E2E of `system` over `baseline`, pooled over the folders that ran both."""
    both = [folder for folder in folders  # round3 ran no serve_path, round4 only nixl and serve_path_decode_core
            if column(folder, system, "ttft_s") and column(folder, baseline, "ttft_s")]
    cells = []
    for name in ("ttft_s", "second_token_s", "e2e_s") if both else ():
        mine = [v for folder in both for v in column(folder, system, name)]
        theirs = [v for folder in both for v in column(folder, baseline, name)]
        interval = ratio_interval(mine, theirs)
        count = f" (n={len(mine)}/{len(theirs)})" if is_count_shown else ""
        cells.append(f"{name.removesuffix('_s')} {interval.ratio:.2f}x [{interval.low:.2f}-{interval.high:.2f}]{count}")
    return ", ".join(cells)


for label, folders in [*((name, [folder]) for name, folder in RUNS.items()), ("pooled", list(RUNS.values()))]:
    print(label)
    for system, baseline in PAIRS:
        if cells := ratios(system, baseline, folders):
            print(f"  {system} / {baseline}: {cells}")

MUTEX = HERE.parent / "served_transfer_mutex"
print("six starts of each (these three, served_transfer_mutex's three)")
six = [*RUNS.values(), MUTEX, MUTEX / "round1", MUTEX / "round2"]  # round4 ran no plain engine: left out
print("  nixl / collocated: " + ratios("nixl", "collocated", six, is_count_shown=True))
