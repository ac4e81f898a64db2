"""Simulate a splitserve cluster on a trace (bench/sim): the live policy's decisions, a profiled performance model.

    python -m bench.simulate --config bench/sim/configs/host_1p1d.yaml --trace conv --rate 0.6
    python -m bench.simulate --config my_cluster.yaml --trace my_trace.csv            # the trace's own times
    python -m bench.simulate --config host.yaml --cell "conv@0.6/s"                   # a bench.compare cell
    python -m bench.simulate --config host.yaml --requests bench/results/compare/requests_collocated.csv \\
        --workload "conv@0.6/s"                                                       # a measured run's requests

1. The requests: a trace (SplitwiseSim's CSV, an Azure trace, or `conv`/`code`, the vendored Azure traces) at its
   own times or replayed at `--rate` for `--duration` seconds, with bench.compare's token scaling; or one of
   bench.compare's cells, the very requests it sends; or the requests of a measured run (arrival times and token
   counts as the server counted them).
2. The simulation (bench/sim/simulator.py), with a progress bar over the arrivals.
3. Under --out: requests.csv (bench.compare's per-request schema), summary.csv (its summary row, with SLO
   slowdowns against `--reference`, a reference.json of bench.compare), splitwise_summary.csv (SplitwiseSim's
   summary columns) and run.json (the config, the commit, machines' utilisation, how long it took).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.load_generator import RequestRecord
from bench.provenance import provenance
from bench.result_files import read_requests_csv, span_s, summary_row, write_requests_csv, write_summary_csv
from bench.sim.config import SimConfig
from bench.sim.simulator import SimResult, Simulator
from bench.slo import Reference
from bench.traces import Scaling, TraceRequest, read_trace, scale_trace, scaling_for_rate
from bench.workloads import DEFAULT_TOKEN_SCALING, TRACE_FILES, TRACES_DIR, open_cell

DEFAULT_OUT = Path(__file__).parent / "results" / "sim" / "run"
# SplitwiseSim's summary: each per-request metric with these statistics, named `<metric>_<statistic>`.
SPLITWISE_STATISTICS = ("mean", "std", "min", "max", "median", "p50", "p90", "p95", "p99", "p999")


def trace_requests(trace: str, *, rate_per_s: float | None, duration_s: float, is_scaled: bool = True,
                   window: int = 0, num_windows: int = 1) -> list[TraceRequest]:
    """A trace by name (conv, code) or path, at its own times, or replayed at `rate_per_s` for `duration_s`; a
    named trace's token counts scaled as bench.compare scales them for this host unless `is_scaled` is False.
    Replayed, `window` of `num_windows` picks which stretch of the trace: window 0 starts at its first request,
    the last one ends at its last, the others are spread evenly between (the trace's own bursts differ by window)."""
    requests = read_trace(TRACES_DIR / TRACE_FILES[trace] if trace in TRACE_FILES else Path(trace))
    tokens = DEFAULT_TOKEN_SCALING.get(trace) if is_scaled else None
    token_fields = tokens.model_dump() if tokens is not None else {}
    if rate_per_s is None:
        return scale_trace(requests, Scaling(**token_fields)) if token_fields else requests
    start_s = 0.0
    if window:
        arrivals = sorted(request.arrival_s for request in requests)
        num_spare = max(0, len(arrivals) - max(1, round(rate_per_s * duration_s)) - 1)
        start_s = arrivals[window * num_spare // max(1, num_windows - 1)]
    return scale_trace(requests, scaling_for_rate(requests, rate_per_s=rate_per_s, duration_s=duration_s,
                                                  start_s=start_s, **token_fields))


def cell_requests(name: str) -> list[TraceRequest]:
    try:
        return list(open_cell(name).requests)
    except ValueError as exc:
        raise SystemExit(f"--cell: {exc}") from exc


def measured_requests(path: Path, workload: str) -> list[TraceRequest]:
    """A measured run's requests of one cell: its arrival times and the token counts the server reported."""
    records = [record for record in read_requests_csv(path) if record.workload == workload and record.repeat == 0]
    if not records:
        raise SystemExit(f"{path} has no requests of workload {workload!r}")
    return [TraceRequest(request_id=record.request_id, arrival_s=record.arrival_s,
                         prompt_tokens=max(1, record.prompt_tokens), output_tokens=max(1, record.output_tokens))
            for record in records]


def splitwise_summary(records: list[RequestRecord], result: SimResult) -> dict[str, Any]:
    """SplitwiseSim's summary.csv columns, for the metrics that mean the same here: response, queue (arrival to
    the prompt's first computed chunk), TTFT and TBT times (its TBT: (response - TTFT) / output tokens), sizes."""
    done = [record for record in records if record.is_ok]
    starts = {request.request_id: request.prompt_start_s for request in result.requests}
    metrics = {
        "response_times": [record.e2e_s for record in done],
        "queue_times": [starts[record.request_id] - record.arrival_s for record in done
                        if starts.get(record.request_id) is not None],
        "ttft_times": [record.ttft_s for record in done],
        "tbt_times": [(record.e2e_s - record.ttft_s) / record.output_tokens for record in done],
        "prompt_sizes": [record.prompt_tokens for record in done],
        "token_sizes": [record.output_tokens for record in done],
    }
    row: dict[str, Any] = {"application_id": 0}
    for metric, values in metrics.items():
        array = np.asarray(values, dtype=float)
        for statistic in SPLITWISE_STATISTICS:
            if not len(array):
                value = ""
            elif statistic in ("median", "p50"):
                value = float(np.median(array))
            elif statistic.startswith("p"):
                value = float(np.percentile(array, 99.9 if statistic == "p999" else float(statistic[1:])))
            else:
                value = float(getattr(np, statistic)(array))
            row[f"{metric}_{statistic}"] = value
    return row


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a simulation YAML (bench/sim/config.py)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", help="conv, code, or a SplitwiseSim / Azure trace CSV")
    source.add_argument("--cell", help="a bench.compare open-loop cell, <trace>@<rate>/s, e.g. 'conv@0.6/s'")
    source.add_argument("--requests", type=Path, help="a measured run's requests_<system>.csv (with --workload)")
    parser.add_argument("--workload", help="the cell of --requests to replay")
    parser.add_argument("--rate", type=float, help="replay --trace at this mean rate, requests/s")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of arrivals at --rate")
    parser.add_argument("--no-token-scaling", action="store_true",
                        help="conv and code with their own token counts (bench.compare scales them for this host)")
    parser.add_argument("--reference", type=Path, help="bench.compare's reference.json: SLO slowdowns against it")
    parser.add_argument("--name", default="splitsim", help="the system name in summary.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.requests is not None and not args.workload:
        parser.error("--requests needs --workload (which cell of the run to replay)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    config = SimConfig.from_yaml(args.config)
    if args.trace is not None:
        requests = trace_requests(args.trace, rate_per_s=args.rate, duration_s=args.duration,
                                  is_scaled=not args.no_token_scaling)
    elif args.cell is not None:
        requests = cell_requests(args.cell)
    else:
        requests = measured_requests(args.requests, args.workload)
    began = time.time()
    result = Simulator(config).run(requests, is_progress_shown=True)
    records = result.records
    args.out.mkdir(parents=True, exist_ok=True)
    write_requests_csv(records, args.out / "requests.csv")
    reference = Reference.model_validate_json(args.reference.read_text()) if args.reference else None
    trace = args.trace or (args.cell or args.workload or "").split("@")[0].removeprefix("uncontended-")
    fit = reference.for_trace(trace) if reference is not None else None
    write_summary_csv([summary_row(args.name, records, span_s(records), fit)], args.out / "summary.csv")
    write_summary_csv([splitwise_summary(records, result)], args.out / "splitwise_summary.csv")
    meta = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)), **provenance(),
            "config": json.loads(config.model_dump_json()), "perf_model": json.loads(result.model.model_dump_json()),
            "num_requests": len(records), "num_events": result.num_events, "wall_s": round(result.wall_s, 3),
            "simulated_s": round(result.simulated_s, 3), "decisions": dict(result.decisions),
            "machines": [{"engine_id": machine.engine_id, "role": machine.role,
                          "utilisation": round(machine.stats.busy_s / result.simulated_s, 4)
                          if result.simulated_s else 0.0,
                          "num_iterations": machine.stats.num_iterations,
                          "num_preemptions": machine.stats.num_preemptions,
                          "peak_kv_tokens": machine.stats.peak_kv_tokens} for machine in result.machines]}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2))
    done = [record for record in records if record.is_ok]
    print(f"{len(done)} of {len(records)} requests done in {result.simulated_s:.1f} simulated s "
          f"({result.num_events} events, {result.wall_s:.2f} s); paths {dict(result.decisions)}")
    if done:
        for name, values in (("TTFT", [r.ttft_s for r in done]), ("E2E", [r.e2e_s for r in done])):
            p50, p90 = np.percentile(values, [50, 90]) * 1e3
            print(f"  {name} p50 {p50:.0f} ms, p90 {p90:.0f} ms")
    print(f"results in {args.out}")


if __name__ == "__main__":
    main()
