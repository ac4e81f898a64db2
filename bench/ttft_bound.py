"""The least TTFT a cell allows, from the reference's own prompt rate: why a TTFT target can or cannot be reached.

1. Each request of an open-loop cell (its scheduled arrival and prompt tokens, from a comparison's
   requests_<system>.csv) needs `slope × prompt tokens` of prompt compute, the slope of reference.json's TTFT fit
   (one engine, uncontended). The fit's intercept, which prompts packed into one step share, is left out, so every
   figure here is a lower bound.
2. With k engines that compute prompts and nothing else (no decode step beside them, no transfer, prompts packed
   perfectly), the earliest each prompt can finish is a first-come-first-served queue over k servers, each prompt
   going to the one free first. Its TTFT is that finish less its arrival.
3. k = 1 is every prompt on one prefill engine (any policy that never computes a prompt on decode, on this two-core
   split); k = 2 is both cores computing prompts (collocated, or the split with decode taking prompts too). Their
   ratio is what a split-only policy pays at least, against the best that two cores allow.
4. A closed-loop cell (the anchors: N users, each sending its next request when the last one ends) has no arrivals
   to queue; its bound is on output tokens/s. Each request needs `slope × prompt tokens` of prompt compute and
   (output tokens - 1) decode steps of at least the reference's single-stream gap. One engine computing every
   prompt (split-only, one prefill engine) serves at most 1 / (prompt compute) requests a second, and no user
   faster than one request per (prompt compute + decode steps); two engines running whole requests (collocated)
   each spend at least (their users' prompts' compute + one request's decode steps) per round of their users.
   The share of prompts a split policy must compute on its decode engine to reach the two-engine bound is what
   closing the gap costs the streams there.
Usage: python -m bench.ttft_bound bench/results/<run>   (writes bound.md there and prints it)
"""

from __future__ import annotations

import argparse
import csv
import heapq
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.result_files import read_requests_csv
from bench.slo import Reference


def finish_times(arrivals_s: list[float], work_s: list[float], num_servers: int) -> list[float]:
    """FCFS over `num_servers` identical servers: when each job finishes, in the order given (sorted by arrival)."""
    free_at = [0.0] * num_servers
    heapq.heapify(free_at)
    finished = []
    for arrival, work in zip(arrivals_s, work_s, strict=True):
        start = max(arrival, heapq.heappop(free_at))
        heapq.heappush(free_at, start + work)
        finished.append(start + work)
    return finished


def cell_bounds(arrivals_s: list[float], prompt_tokens: list[int], slope_s: float) -> dict[int, tuple[float, float]]:
    """Per number of prompt engines (1, 2): the least TTFT p50 and p90, seconds."""
    order = sorted(range(len(arrivals_s)), key=arrivals_s.__getitem__)
    arrivals = [arrivals_s[i] for i in order]
    work = [slope_s * prompt_tokens[i] for i in order]
    bounds = {}
    for num_servers in (1, 2):
        ttfts = [end - start for end, start in zip(finish_times(arrivals, work, num_servers), arrivals, strict=True)]
        bounds[num_servers] = (float(np.percentile(ttfts, 50)), float(np.percentile(ttfts, 90)))
    return bounds


def open_cells(results: Path) -> dict[str, tuple[list[float], list[int]]]:
    """Each cell's requests, first repeat (every system sends the same ones: the first system's file is enough)."""
    cells: dict[str, tuple[list[float], list[int]]] = defaultdict(lambda: ([], []))
    for record in read_requests_csv(sorted(results.glob("requests_*.csv"))[0]):
        if record.repeat == 0:
            cells[record.workload][0].append(record.arrival_s)
            cells[record.workload][1].append(record.prompt_tokens)
    return dict(cells)


def summary_rows(results: Path) -> list[dict[str, str]]:
    with (results / "summary.csv").open() as handle:
        return list(csv.DictReader(handle))


def report(results: Path) -> str:
    reference = Reference.model_validate_json((results / "reference.json").read_text())
    rows = [row for row in summary_rows(results) if row["kind"] == "open"]  # closed cells have no arrivals to queue
    measured = {(row["workload"], row["system"]): (float(row["ttft_p50_ms"]) / 1e3, float(row["ttft_p90_ms"]) / 1e3)
                for row in rows if row["ttft_p50_ms"]}
    trace_of = {row["workload"]: row["trace"] for row in rows}
    systems = sorted({system for _, system in measured})
    lines = [
        f"# Least TTFT each cell allows ({results.name})", "",
        "From `python -m bench.ttft_bound` (bench/ttft_bound.py): prompts computed at the reference's uncontended "
        "rate (reference.json's TTFT slope, without its intercept), first come first served, on one or two engines "
        "that do nothing else. Lower bounds, seconds; measured TTFT beside them.", "",
        "| cell | prompt tokens/s | reference s/token | 1 engine p50 / p90 | 2 engines p50 / p90 | 1 / 2 at p50 | "
        + " | ".join(f"{system} p50 / p90" for system in systems) + " |",
        "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in systems) + " |",
    ]
    requests = open_cells(results)
    for cell in sorted(trace_of):
        arrivals, tokens = requests[cell]
        slope = reference.for_trace(trace_of[cell]).ttft.slope_s
        bounds = cell_bounds(arrivals, tokens, slope)
        span = max(arrivals) - min(arrivals)
        ratio = bounds[1][0] / bounds[2][0] if bounds[2][0] > 0 else float("inf")
        cells = [f"{measured[(cell, s)][0]:.2f} / {measured[(cell, s)][1]:.2f}" if (cell, s) in measured else "–"
                 for s in systems]
        demand = f"{sum(tokens) / span:.0f}" if span > 0 else "all at once"
        lines.append(f"| {cell} | {demand} | {slope * 1e3:.2f} ms | {bounds[1][0]:.2f} / "
                     f"{bounds[1][1]:.2f} | {bounds[2][0]:.2f} / {bounds[2][1]:.2f} | {ratio:.1f}× | "
                     + " | ".join(cells) + " |")
    lines += closed_report(results, reference)
    return "\n".join(lines) + "\n"


def closed_loop_bounds(num_users: int, prompt_s: float, decode_s: float) -> dict[str, float]:
    """Requests a second at most, for `num_users` closed-loop users whose requests need `prompt_s` of prompt compute
    and `decode_s` of decode steps each: split-only on one prefill engine, and two engines running whole
    requests; and the least share of prompts a split policy must move to its decode engine to match the latter."""
    split = min(1 / prompt_s, num_users / (prompt_s + decode_s))
    # The users spread as evenly as they go over the two engines; an engine with k of them serves k requests
    # per (k prompts' compute + one request's decode steps) at most.
    shares = [users for users in (num_users - num_users // 2, num_users // 2) if users]
    whole = sum(users / (users * prompt_s + decode_s) for users in shares)
    return {"split_req_s": split, "two_engines_req_s": whole,
            "decode_share_for_parity": max(0.0, 1 - 1 / (whole * prompt_s))}


def closed_report(results: Path, reference: Reference) -> list[str]:
    rows = [row for row in summary_rows(results) if row["kind"] == "closed"]
    if not rows:
        return []
    sizes: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for record in read_requests_csv(sorted(results.glob("requests_*.csv"))[0]):
        if record.repeat == 0 and record.workload in {row["workload"] for row in rows}:
            sizes[record.workload].append((record.prompt_tokens, record.output_tokens))
    systems = sorted({row["system"] for row in rows})
    measured = {(row["workload"], row["system"]): float(row["throughput_tok_s"]) for row in rows
                if row["throughput_tok_s"]}
    lines = ["", "## Closed-loop cells: output tokens/s at most", "",
             "Each request's prompt at the reference's TTFT slope, its decode steps at the reference's single-stream "
             "gap (lower bounds on both, so these are upper bounds on throughput); measured output tokens/s beside "
             "them.", "",
             "| cell | users | prompt / output tokens | split-only (1 prefill engine) tok/s | two engines, whole "
             "requests, tok/s | split / two | prompts decode must compute for parity | "
             + " | ".join(systems) + " |", "| --- | --- | --- | --- | --- | --- | --- | "
             + " | ".join("---" for _ in systems) + " |"]
    for row in sorted({row["workload"]: row for row in rows}.values(), key=lambda row: row["workload"]):
        cell, users = row["workload"], int(row["concurrency"])
        prompt = float(np.mean([p for p, _ in sizes[cell]]))
        output = float(np.mean([o for _, o in sizes[cell]]))
        fit = reference.for_trace(row["trace"])
        prompt_s = fit.ttft.slope_s * prompt
        decode_s = (output - 1) * fit.tpot_s(int(prompt), int(output))
        bound = closed_loop_bounds(users, prompt_s, decode_s)
        lines.append(f"| {cell} | {users} | {prompt:.0f} / {output:.0f} | {bound['split_req_s'] * output:.1f} | "
                     f"{bound['two_engines_req_s'] * output:.1f} | "
                     f"{bound['split_req_s'] / bound['two_engines_req_s']:.2f}× | "
                     f"{bound['decode_share_for_parity']:.0%} | "
                     + " | ".join(f"{measured[(cell, s)]:.1f}" if (cell, s) in measured else "–" for s in systems)
                     + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path, help="a bench.compare output folder")
    args = parser.parse_args(argv)
    text = report(args.results)
    (args.results / "bound.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
