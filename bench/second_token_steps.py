"""The decode step that makes a request's second token, against the engine's steady step, from the step traces of
`bench.served_transfer_bench` runs (their steps/<system>/ folders), one row per run and system.

    python -m bench.second_token_steps RUN_DIR [RUN_DIR ...] [--out bench/results/served_transfer_steps]

1. Per system of each run: the engine's steady decode step (every step between two decode-only steps) and, per
   request, the step that made its second token (from the step that finished its prompt, or on decode its load,
   to the next), the warm-up requests left out.
2. Their medians and the ratio of the second-token step's median to the steady step's, with a 95% bootstrap
   interval: above 1 where the first step after a prompt or a load costs more than a steady one.
Writes second_token_steps.csv and second_token_steps.md under --out.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

import numpy as np

from bench.bootstrap import ratio_interval
from bench.served_transfer_bench import NUM_WARM_UP_REQUESTS, generation_step_seconds, second_token_step_seconds

ROLES = ("decode", "collocated")  # the engine that streams: decode in a split app, the one engine in collocated


def rows_of(run: Path) -> list[dict]:
    rows = []
    for system_dir in sorted(path for path in (run / "steps").glob("*") if path.is_dir()):
        traces = sorted(trace for role in ROLES for trace in system_dir.glob(f"{role}-*.steps.tsv"))
        steady = [seconds for trace in traces for seconds in generation_step_seconds(trace)]
        second = [seconds for trace in traces for seconds in second_token_step_seconds(trace)][NUM_WARM_UP_REQUESTS:]
        if not steady or not second:
            continue
        ratio = ratio_interval(second, steady)
        rows.append({"run": run.name, "system": system_dir.name, "num_requests": len(second),
                     "steady_step_p50_ms": round(float(np.median(steady)) * 1e3, 1),
                     "second_token_step_p50_ms": round(float(np.median(second)) * 1e3, 1),
                     "ratio": round(ratio.ratio, 3), "ratio_95": f"{ratio.low:.3f}-{ratio.high:.3f}"})
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", type=Path, nargs="+", help="bench.served_transfer_bench output folders")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "served_transfer_steps")
    args = parser.parse_args(argv)
    rows = [row for run in args.runs for row in rows_of(run)]
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["run", "system", "num_requests", "steady_step_p50_ms", "second_token_step_p50_ms", "ratio", "ratio_95"]
    with open(args.out / "second_token_steps.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    table = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    table += ["| " + " | ".join(str(row[field]) for field in fields) + " |" for row in rows]
    command = " ".join(["python -m bench.second_token_steps", *(str(run) for run in args.runs)])
    (args.out / "second_token_steps.md").write_text("\n".join(
        ["# The step that makes the second token", "", f"`{command}`: per run and system, the streaming engine's "
         "steady decode step and the step that made each measured request's second token (medians), and their "
         "ratio with a 95% bootstrap interval.", "", *table]) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
