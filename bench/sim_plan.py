"""Plan a cluster: the cheapest pools that serve a trace at a rate within Splitwise's SLOs, and how far each design
scales (Splitwise's throughput-against-machines figure), from simulations that fan out as Ray tasks.

    python -m bench.sim_plan --config bench/sim/configs/host_1p1d.yaml --trace conv --rate 4
    python -m bench.sim_plan --config bench/sim/configs/a100_llama2_70b.yaml --trace conv --rate 40 \\
        --no-token-scaling --machines 4 8 16 32 --out bench/results/sim/plan_a100

1. The reference: what one collocated machine takes for a request of each size, one at a time, simulated with the
   same profile (`--reference` takes a measured reference.json instead), fitted as bench.compare fits its own.
2. The designs: collocated (every machine both phases), and for each policy (`--policies`) every P:D split of
   each machine count (`--machines`). A design meets the SLOs at a rate when the P50/P90/P99 slowdowns of TTFT,
   TBT and E2E are within Splitwise's nine bounds (bench/slo.py), failed requests counting as misses.
3. For the asked rate: the fewest machines (and its split) that meet them, per design. For the figure: each
   design's goodput (the highest rate it meets them at, by bisection) at each machine count, best split.
   `--windows K` replays K stretches of the trace (its bursts differ by stretch): a design meets the SLOs at a
   rate when it does in every window, and its goodput is the median of the windows' with their range.
4. Every simulation is one Ray task, on whatever cluster `ray.init` finds (a local one otherwise), with a progress
   bar; `--compiled` runs the driver and the local cluster's tasks from bench.sim_compile's compiled copy (run.json
   says which modules each ran compiled). plan.md, plan.csv and plan.png under --out.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench import processes
from bench.provenance import provenance
from bench.sim_compile import add_compiled_argument, compiled_modules, init_ray, run_compiled_instead
from bench.sim.config import SimConfig
from bench.slo import Reference, RequestSample, fit_reference, slo_margin, slowdown_percentiles, slowdowns

DEFAULT_OUT = Path(__file__).parent / "results" / "sim" / "plan"
COLLOCATED = "collocated"
NUM_UNCONTENDED = 40
BISECTION_STEPS = 6


def _sample(record: Any) -> RequestSample | None:
    if not record.is_ok or record.output_tokens < 1:
        return None
    return RequestSample(prompt_tokens=max(1, record.prompt_tokens), output_tokens=record.output_tokens,
                         ttft_s=record.ttft_s, tpot_s=record.tpot_s, e2e_s=record.e2e_s)


def design_config(base: SimConfig, design: str, num_machines: int, num_prefill: int) -> SimConfig:
    cluster = base.cluster
    if design == COLLOCATED:
        update = {"mode": "collocated", "num_prefill": 0, "num_decode": num_machines}
        return base.model_copy(update={"cluster": cluster.model_copy(update=update),
                                       "scheduling": base.scheduling.model_copy(update={"policy": "always_split"})})
    update = {"mode": "disaggregated", "num_prefill": num_prefill, "num_decode": num_machines - num_prefill}
    return base.model_copy(update={"cluster": cluster.model_copy(update=update),
                                   "scheduling": base.scheduling.model_copy(update={"policy": design})})


def simulate_margin(config_json: str, trace: str, rate: float, duration_s: float, is_scaled: bool,
                    reference_json: str, window: int = 0, num_windows: int = 1) -> dict[str, Any]:
    """One simulation: the design at the rate, on one window of the trace; its SLO margin (≤ 1 meets all nine
    bounds)."""
    from bench.sim.simulator import Simulator
    from bench.simulate import trace_requests

    config = SimConfig.model_validate_json(config_json)
    requests = trace_requests(trace, rate_per_s=rate, duration_s=duration_s, is_scaled=is_scaled, window=window,
                              num_windows=num_windows)
    result = Simulator(config).run(requests)
    fit = Reference.model_validate_json(reference_json).for_trace(trace)
    samples = [_sample(record) for record in result.records]
    margin = slo_margin(slowdown_percentiles(slowdowns(samples, fit)))
    return {"margin": margin, "num_done": sum(sample is not None for sample in samples), "wall_s": result.wall_s,
            "compiled_modules": compiled_modules()}


def simulated_reference(base: SimConfig, trace: str, is_scaled: bool) -> Reference:
    """One collocated machine, one request at a time, over requests of the trace's sizes."""
    from bench.sim.simulator import Simulator
    from bench.simulate import trace_requests

    sizes = sorted(trace_requests(trace, rate_per_s=None, duration_s=0, is_scaled=is_scaled),
                   key=lambda request: request.prompt_tokens)
    picks = [sizes[round(index * (len(sizes) - 1) / (NUM_UNCONTENDED - 1))] for index in range(NUM_UNCONTENDED)]
    config = design_config(base, COLLOCATED, 1, 0)
    records = []
    for index, request in enumerate(picks):  # one at a time: each alone in its own run
        alone = request.model_copy(update={"request_id": index, "arrival_s": 0.0})
        records += Simulator(config).run([alone]).records
    samples = [sample for record in records if (sample := _sample(record)) is not None]
    fit = fit_reference(samples, min_requests=NUM_UNCONTENDED // 2)
    return Reference(system="simulated collocated machine", commit=provenance()["commit"],
                     fits={trace: fit, "all": fit})


def main(argv: list[str] | None = None) -> None:
    # Before Ray is imported (it reads RAY_AUTH_MODE once, at import): the local cluster and this driver share one
    # token under Ray 2.60's token auth.
    processes.use_ray_token_auth()
    import ray

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="the machine kind and profile (bench/sim)")
    parser.add_argument("--trace", default="conv")
    parser.add_argument("--rate", type=float, required=True, help="the rate to plan for, requests/s")
    parser.add_argument("--duration", type=float, default=300.0, help="seconds of arrivals per simulation")
    parser.add_argument("--machines", type=int, nargs="+", default=[2, 3, 4, 6, 8])
    parser.add_argument("--policies", nargs="+", default=["predictive", "always_split", "token_jsq"])
    parser.add_argument("--reference", type=Path, help="a measured reference.json (default: simulated)")
    parser.add_argument("--no-token-scaling", action="store_true", help="the trace's own token counts")
    parser.add_argument("--windows", type=int, default=1,
                        help="stretches of the trace each design is simulated on (its bursts differ by stretch)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_compiled_argument(parser)
    args = parser.parse_args(argv)
    if args.compiled:
        run_compiled_instead("bench.sim_plan", argv)
    if args.windows < 1:
        parser.error(f"--windows must be at least 1, not {args.windows}")
    base = SimConfig.from_yaml(args.config).model_copy(update={"keeps_token_gaps": False})
    base = base.model_copy(update={"model": base.perf_model(), "profile": None})  # the tasks need no file
    is_scaled = not args.no_token_scaling
    reference = Reference.model_validate_json(args.reference.read_text()) if args.reference else \
        simulated_reference(base, args.trace, is_scaled)
    began = time.time()
    init_ray(ignore_reinit_error=True, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    remote = ray.remote(num_cpus=1)(simulate_margin)
    designs = [COLLOCATED, *args.policies]
    designs_points = [(design, machines, prefill) for design in designs for machines in args.machines
                      for prefill in ([0] if design == COLLOCATED else range(1, machines))]
    # Every design on every window: a point is (design, machines, prefill, window).
    points = [(*design_point, window) for design_point in designs_points for window in range(args.windows)]

    def run_all(rates: dict[tuple, float]) -> dict[tuple, dict[str, Any]]:
        futures = {point: remote.remote(design_config(base, *point[:3]).model_dump_json(), args.trace, rate,
                                        args.duration, is_scaled, reference.model_dump_json(), point[3],
                                        args.windows)
                   for point, rate in rates.items()}
        results = {}
        with tqdm(total=len(futures), desc="simulations", unit="sim", leave=False) as progress:
            pending = {future: point for point, future in futures.items()}
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                results[pending.pop(done[0])] = ray.get(done[0])
                progress.update()
        return results

    try:
        at_rate = run_all({point: args.rate for point in points})
        # Goodput per point by bisection between 0 and twice what its machines could be asked.
        low = {point: 0.0 for point in points}
        high = {point: 2.0 * args.rate * point[1] / min(args.machines) for point in points}
        for _ in tqdm(range(BISECTION_STEPS), desc="goodput bisection", unit="step"):
            middle = {point: (low[point] + high[point]) / 2 for point in points}
            for point, found in run_all(middle).items():
                (low if found["margin"] <= 1 else high)[point] = middle[point]
    finally:
        ray.shutdown()
    rows = [design_row(design_point, [at_rate[(*design_point, window)]["margin"] for window in range(args.windows)],
                       [low[(*design_point, window)] for window in range(args.windows)])
            for design_point in designs_points]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "plan.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = plan_lines(rows, args, reference, began)
    (args.out / "plan.md").write_text("\n".join(lines) + "\n")
    draw(rows, args.out / "plan.png", args.trace)
    task_modules = sorted({tuple(found["compiled_modules"]) for found in at_rate.values()})
    (args.out / "run.json").write_text(json.dumps({**provenance(), "argv": argv, "reference": json.loads(
        reference.model_dump_json()), "perf_model": json.loads(base.model.model_dump_json()),
        "compiled_modules": compiled_modules(), "tasks_compiled_modules": [list(found) for found in task_modules]},
        indent=2))
    print("\n".join(lines))


def design_row(design_point: tuple[str, int, int], margins: list[float], goodputs: list[float]) -> dict[str, Any]:
    """One design's row over its windows: it meets the SLOs at the rate when it does in every window; its margin
    and goodput are the windows' medians, the goodput's range beside it."""
    design, machines, prefill = design_point
    return {"design": design, "num_machines": machines, "num_prefill": prefill,
            "num_decode": machines - prefill if design != COLLOCATED else machines,
            "margin_at_rate": round(statistics.median(margins), 3),
            "meets_at_rate": all(margin <= 1 for margin in margins),
            "num_windows_meeting": sum(margin <= 1 for margin in margins), "num_windows": len(margins),
            "goodput_req_s": round(statistics.median(goodputs), 3),
            "goodput_min_req_s": round(min(goodputs), 3), "goodput_max_req_s": round(max(goodputs), 3),
            # Each window's, in window order: designs see the same windows, so two designs pair window by window.
            "goodput_by_window": ";".join(f"{goodput:.3f}" for goodput in goodputs)}


def plan_lines(rows: list[dict[str, Any]], args: argparse.Namespace, reference: Reference,
               began: float) -> list[str]:
    lines = ["# Planning", "", f"`python -m bench.sim_plan` for {args.trace} at {args.rate} requests/s "
             f"({args.duration:.0f} s of arrivals per simulation), profile of `{args.config}`; reference: "
             f"{reference.system}. {len(rows)} designs, {(time.time() - began) / 60:.1f} min.", "",
             "## The cheapest pools at the asked rate", "",
             "| design | fewest machines | prefill:decode | SLO margin |", "| --- | --- | --- | --- |"]
    for design in dict.fromkeys(row["design"] for row in rows):
        meeting = [row for row in rows if row["design"] == design and row["meets_at_rate"]]
        if not meeting:
            lines.append(f"| {design} | none of {sorted({r['num_machines'] for r in rows})} | – | – |")
            continue
        best = min(meeting, key=lambda row: (row["num_machines"], row["margin_at_rate"]))
        split = "both phases" if design == COLLOCATED else f"{best['num_prefill']}:{best['num_decode']}"
        lines.append(f"| {design} | {best['num_machines']} | {split} | {best['margin_at_rate']} |")
    lines += ["", "## Goodput against machines (best split)", "",
              "| design | " + " | ".join(str(m) for m in sorted({r["num_machines"] for r in rows})) + " |",
              "|" + " --- |" * (1 + len({r["num_machines"] for r in rows}))]
    for design in dict.fromkeys(row["design"] for row in rows):
        best = [best_split(rows, design, machines) for machines in sorted({r["num_machines"] for r in rows})]
        lines.append(f"| {design} | " + " | ".join(_goodput_cell(row) for row in best) + " |")
    num_windows = getattr(args, "windows", 1)
    if num_windows > 1:
        lines += ["", f"Each design ran on {num_windows} windows of the trace: it meets the SLOs at the asked rate "
                  "when it does in every window; goodput is the windows' median [their range], best split by "
                  "median."]
    lines += ["", "![plan](plan.png)", "", "Every design is in [plan.csv](plan.csv)."]
    return lines


def best_split(rows: list[dict[str, Any]], design: str, machines: int) -> dict[str, Any] | None:
    """The design's row with the highest (median) goodput at that machine count."""
    return max((row for row in rows if row["design"] == design and row["num_machines"] == machines),
               key=lambda row: row["goodput_req_s"], default=None)


def _goodput_cell(row: dict[str, Any] | None) -> str:
    if row is None:
        return "0"
    if row.get("num_windows", 1) > 1:
        return f"{row['goodput_req_s']:g} [{row['goodput_min_req_s']:g}-{row['goodput_max_req_s']:g}]"
    return f"{row['goodput_req_s']:g}"


def draw(rows: list[dict[str, Any]], path: Path, trace: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    machine_counts = sorted({row["num_machines"] for row in rows})
    for design in dict.fromkeys(row["design"] for row in rows):
        best = [best_split(rows, design, machines) for machines in machine_counts]
        medians = [row["goodput_req_s"] if row else 0.0 for row in best]
        lows = [median - (row.get("goodput_min_req_s", median) if row else 0.0) for median, row in zip(medians, best)]
        highs = [(row.get("goodput_max_req_s", median) if row else 0.0) - median for median, row in zip(medians, best)]
        axis.errorbar(machine_counts, medians, yerr=[lows, highs], marker="o", capsize=3, label=design)
    axis.set(xlabel="machines", ylabel="goodput, requests/s (all nine SLOs)", title=f"{trace}: goodput per design")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


if __name__ == "__main__":
    main()
