"""The comparison: every system, one after another on this host, through the same cells, judged by one reference.

    python -m bench.compare                         # the default: collocated, splitserve-predictive, Ray Serve LLM PD
    python -m bench.compare --loads conv=0.25,0.5,1,2,3,4.5    # the sweep in the reference's requests in flight
    python -m bench.compare --systems all           # adds the rest; cells already measured at this commit are kept
    python -m bench.compare --systems policies      # every scheduling policy as its own row
    python -m bench.compare --systems collocated splitserve-nixl --traces code --rates code=0.2,0.4,0.6,0.8,1.0
    python -m bench.compare --running mine=http://127.0.0.1:8000 --systems collocated   # add a running server
    python -m bench.compare --report-only           # rebuild summary, report and figures from the raw files

1. The plan (bench/workloads.py) expands into cells: per trace an uncontended cell and a rate sweep, then the
   anchors. The sweep is set in loads (the reference's requests in flight), so its rates come from this host:
   the baseline runs first, and its uncontended cells give the unit rate per trace (`SweepRates`; `--reference`
   or explicit `--rates` skip this). Every prompt is built with the served model's tokenizer, so each system sees
   the same prompts (unique per request and per repeat: no prefix cache can help).
2. For each system (bench/systems.py): the cells still to measure at this commit (`--repeats` runs of each) are
   run after a start and a warm-up, a fresh start for each repeat (so the intervals hold the spread between
   starts), through the load generator's own process (bench/load_generator.py); each
   cell's requests are written to raw/<system>/ as soon as it ends, so a stopped run resumes cell by cell (the
   baseline's raw uncontended cells give the same rates again). A system that fails to start is reported and the
   run goes on; it stops, with everything it started, before the next.
3. The one SLO reference (bench/slo.py) is fitted to the baseline's uncontended cells (or read with
   `--reference`); every request of every system gets its slowdowns against it, and goodput comes from each
   trace's rate sweep.
4. Results under --out: requests_<system>.csv (every request, every token gap), summary.csv (a row per system and
   cell), reference.json, run.json (the commit, versions, host, each system's full config, the plan), the figures
   and report.md, whose every ratio carries a paired bootstrap interval (bench/report.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bench import plots, report
from bench.host_probe import host_probe
from bench.load_generator import CellRunner, GeneratorStats, PromptBuilder, RequestRecord, filler_document
from bench.load_generator import run_closed_loop
from bench.provenance import provenance
from bench.raw_cells import RawCells, cells_to_run, measured_commit
from bench.result_files import (
    request_sample,
    span_s,
    summary_row,
    write_requests_csv,
    write_summary_csv,
)
from bench.slo import Goodput, Reference, attainment_goodput, fit_reference, goodput
from bench.sweep_rates import SweepRates
from bench.systems import BASELINE, DEFAULT_SYSTEMS, POLICY_COMPARISON, SPLIT_BASELINE, SYSTEMS, app_config
from bench.traces import TraceRequest
from bench.workloads import DEFAULT_ARRIVALS, DEFAULT_LOADS, Arrivals, Plan, Workload

DEFAULT_OUT = Path(__file__).parent / "results" / "compare"
PROMPT_IDS_PER_CELL = 10_000
PROMPT_IDS_PER_REPEAT = 10_000_000  # room for 1,000 cells' blocks per repeat
# Two short requests after a system starts, not recorded: first-request costs (imports, graph capture) are not
# what any cell measures.
WARM_UP = Workload(name="warm-up", trace="warm-up", kind="closed", concurrency=1,
                   requests=tuple(TraceRequest(request_id=index, arrival_s=0.0, prompt_tokens=128, output_tokens=8)
                                  for index in range(2)))
# A request still running this long after it was due is a miss; it also bounds how long a saturated cell drains.
REQUEST_TIMEOUT_S = 90.0


@dataclass
class SystemRun:
    name: str
    description: str
    config: dict[str, Any] = field(default_factory=dict)
    startup_s: float | None = None
    error: str | None = None
    records: dict[str, list[RequestRecord]] = field(default_factory=dict)  # cell name -> records, repeats pooled
    generator: dict[str, list[GeneratorStats]] = field(default_factory=dict)  # cell name -> one per repeat
    # summary.csv's probe column (report.HOST_PROBES) -> cell name -> one reading per repeat, where probed
    host_probes: dict[str, dict[str, list[float]]] = field(default_factory=dict)


def _prompt_order(cells: list[Workload]) -> list[Workload]:
    """A cell's block of prompt ids is its place in this order: the cells that need no rate (the warm-up, the
    uncontended cells, the anchors), then the open-loop ones. The baseline's uncontended cells so get the same
    prompts before the sweep's rates are known as after."""
    return [WARM_UP, *(cell for cell in cells if cell.kind != "open"), *(cell for cell in cells if cell.kind == "open")]


class Prompts:
    """Every cell's prompts, unique per request and per repeat, built a cell at a time when it is first run, each
    cell's block of ids from its place among the cells known by then, each repeat's blocks apart from the others.
    A repeat that re-sent its first run's prompts was served from the engines' prefix caches: in the marginal-guard
    probe (a3a61ec) collocated's second run of uncontended code had TTFT p50 349 ms against 993 ms in its first."""

    def __init__(self, model_path: str, known_cells: Callable[[], list[Workload]]) -> None:
        self.builder = PromptBuilder(model_path, filler_document())
        self.known_cells = known_cells
        self.by_cell: dict[tuple[str, int], list[str]] = {}

    def of(self, cell: Workload, repeat: int = 0) -> list[str]:
        if (cell.name, repeat) not in self.by_cell:
            index = [known.name for known in _prompt_order(self.known_cells())].index(cell.name)
            first_id = repeat * PROMPT_IDS_PER_REPEAT + index * PROMPT_IDS_PER_CELL
            self.by_cell[cell.name, repeat] = [self.builder.build(first_id + request.request_id,
                                                                  request.prompt_tokens) for request in cell.requests]
        return self.by_cell[cell.name, repeat]


def cell_prompts(cells: list[Workload], model_path: str) -> dict[str, list[str]]:
    prompts = Prompts(model_path, lambda: cells)
    return {cell.name: prompts.of(cell) for cell in _prompt_order(cells)}


def _run_cell(runner: CellRunner, base_url: str, model: str, cell: Workload, prompts: list[str],
              repeat: int) -> tuple[list[RequestRecord], GeneratorStats]:
    common = dict(base_url=base_url, model=model, requests=list(cell.requests), prompts=prompts,
                  request_timeout_s=REQUEST_TIMEOUT_S, description=f"  {cell.name} (run {repeat + 1})")
    if cell.kind == "open":
        records, stats = runner.run("open", max_duration_s=cell.requests[-1].arrival_s + 1, **common)
    else:
        records, stats = runner.run("closed", concurrency=cell.concurrency or 1, **common)
    for record in records:
        record.workload, record.repeat = cell.name, repeat
    return records, stats


def _measure(run: SystemRun, start: Any, batches: Iterator[list[tuple[Workload, int]]],
             prompts: Callable[[Workload, int], list[str]], model: str, logs_dir: Path, raw: RawCells,
             commit: str) -> None:
    """Run the system's cells, batch after batch (the baseline's first batch, its uncontended cells, sets the sweep's
    rates that the next batch holds), on a fresh start of the system for each repeat: where a start's processes land
    on the cores moves every latency of that start alike (one decode path, one request at a time: 47, 49 and 55 ms
    per token in three starts of the same code, engine_wait_probe, the sweep_asleep run and a probe), so repeats
    within one start would give intervals that hide the spread between starts."""
    try:
        with contextlib.ExitStack() as started, CellRunner() as runner:
            base_url, started_repeat = "", None
            for todo in batches:
                for index, (cell, repeat) in enumerate(todo):
                    if repeat != started_repeat:
                        started.close()  # the previous start's processes stop before the next start's begin
                        repeat_logs = logs_dir if repeat == 0 else logs_dir / f"repeat-{repeat}"
                        base_url = _start(run, start, started, repeat_logs, prompts, model)
                        started_repeat = repeat
                    print(f"{run.name}: cell {index + 1}/{len(todo)}", flush=True)
                    probe = host_probe()  # the host's speed now, the engines idle between cells
                    records, stats = _run_cell(runner, base_url, model, cell, prompts(cell, repeat), repeat)
                    raw.save(run.name, cell, repeat, records, stats, commit, probe=probe)
    except Exception as exc:  # one system failing must not lose the others' results
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"{run.name}: FAILED: {run.error}", flush=True)


def _start(run: SystemRun, start: Any, started: contextlib.ExitStack, logs_dir: Path,
           prompts: Callable[[Workload, int], list[str]], model: str) -> str:
    """Start the system (held by `started`) and warm it up; the first start's time is the system's start-up."""
    logs_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    base_url = started.enter_context(start(logs_dir))
    startup_s = time.perf_counter() - began
    run.startup_s = startup_s if run.startup_s is None else run.startup_s
    print(f"{run.name}: up at {base_url} after {startup_s:.0f} s", flush=True)
    asyncio.run(run_closed_loop(base_url=base_url, model=model, requests=list(WARM_UP.requests),
                                prompts=prompts(WARM_UP, 0), concurrency=1, is_progress_shown=False))
    return base_url


def fit_reference_from(run: SystemRun, cells: list[Workload], commit: str, *, min_requests: int = 30) -> Reference:
    """The baseline's uncontended cells, one fit per trace and one over all of them (for the anchors)."""
    samples: dict[str, list] = {}
    for cell in cells:
        if cell.kind == "uncontended":
            found = [sample for record in run.records.get(cell.name, [])
                     if (sample := request_sample(record)) is not None]
            samples[cell.trace] = found
            samples.setdefault("all", []).extend(found)
    return Reference(system=run.name, commit=commit,
                     fits={trace: fit_reference(found, min_requests=min_requests) for trace, found in samples.items()})


def summarize(runs: list[SystemRun], cells: list[Workload], reference: Reference | None) -> list[dict[str, Any]]:
    """summary.csv: one row per system and cell, slowdowns against the one reference; goodput per trace."""
    rows = []
    for run in runs:
        system_rows = []
        for cell in cells:
            records = run.records.get(cell.name)
            if not records:
                continue
            fit = reference.for_trace(cell.trace) if reference is not None else None
            row = {"workload": cell.name, "trace": cell.trace, "kind": cell.kind, "rate_per_s": cell.rate_per_s,
                   "concurrency": cell.concurrency, "num_repeats": len({record.repeat for record in records}),
                   **summary_row(run.name, records, span_s(records), fit, run.generator.get(cell.name))}
            for column, by_cell in run.host_probes.items():
                if probes := by_cell.get(cell.name):
                    row[column] = round(float(np.median(probes)), 2)
            system_rows.append(row)
        for trace in dict.fromkeys(cell.trace for cell in cells if cell.kind == "open"):
            sweep = {row["rate_per_s"]: row["slo_margin"] for row in system_rows
                     if row["trace"] == trace and row["kind"] == "open" and "slo_margin" in row}
            shares = {row["rate_per_s"]: row["slo_attainment"] for row in system_rows
                      if row["trace"] == trace and row["kind"] == "open" and "slo_attainment" in row}
            found: Goodput | None = goodput(sweep) if sweep else None
            found_share: Goodput | None = attainment_goodput(shares) if shares else None
            for row in system_rows:
                if row["trace"] != trace or row["kind"] != "open":
                    continue
                for prefix, found_here in (("", found), ("attainment_", found_share)):
                    if found_here is not None:
                        rate = found_here.rate_per_s
                        row[f"{prefix}goodput_req_s"] = "" if rate is None else round(rate, 3)
                        row[f"{prefix}goodput_kind"] = found_here.kind
        rows += [{"system": row.pop("system"), **row} for row in system_rows]
    return rows


def _parse_per_trace(entries: list[str] | None, traces: tuple[str, ...], option: str = "--rates"
                     ) -> dict[str, tuple[float, ...]]:
    """`conv=0.5,1.5 code=1` -> values per trace name, for the traces named only; `none` gives every trace none."""
    names = Plan(traces=traces).trace_names()
    values_by_trace: dict[str, tuple[float, ...]] = {}
    for entry in entries or []:
        if entry == "none":
            values_by_trace = {name: () for name in names}
            continue
        name, _, values = entry.partition("=")
        if name not in names:
            raise SystemExit(f"{option} names {name!r}, which is not among the traces {names}")
        values_by_trace[name] = tuple(float(value) for value in values.split(",") if value)
    return values_by_trace


def _parse_arrivals(entries: list[str] | None, traces: tuple[str, ...]) -> dict[str, Arrivals]:
    """`poisson` (every trace) or `code=trace` (one) over the defaults."""
    names = Plan(traces=traces).trace_names()
    arrivals: dict[str, Arrivals] = dict(DEFAULT_ARRIVALS)
    for entry in entries or []:
        name, _, kind = entry.rpartition("=")
        if kind not in ("trace", "poisson"):
            raise SystemExit(f"--arrivals takes trace or poisson, for every trace or as TRACE=KIND; got {entry!r}")
        if name and name not in names:
            raise SystemExit(f"--arrivals names {name!r}, which is not among the traces {names}")
        arrivals.update({trace: kind for trace in ([name] if name else names)})
    return arrivals


def carried_over(previous_path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """A report rebuilt from raw files (`--report-only`) keeps what only the measuring invocation knew, when the
    run.json it replaces measured the same commit: when it started, how long it took, each system's start-up."""
    try:
        previous = json.loads(previous_path.read_text())
    except (OSError, ValueError):
        return meta
    if previous.get("measured_commit") != meta["measured_commit"]:
        return meta
    startups = {system["name"]: system.get("startup_s") for system in previous.get("systems", [])}
    return meta | {"started_at": previous["started_at"], "wall_s": previous["wall_s"],
                   "systems": [system | {"startup_s": startups.get(system["name"], system["startup_s"])}
                               for system in meta["systems"]]}


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", choices=[*SYSTEMS, "all", "policies"],
                        default=list(DEFAULT_SYSTEMS))
    parser.add_argument("--running", nargs="*", default=[], metavar="NAME=URL",
                        help="also measure servers already running on this host (not started or stopped here)")
    parser.add_argument("--traces", nargs="+", default=["conv", "code"],
                        help="conv, code (the Azure traces in bench/data/azure_traces) or paths of SplitwiseSim / "
                             "Azure trace CSVs")
    parser.add_argument("--arrivals", nargs="+", metavar="[TRACE=]KIND",
                        help="trace: replay a trace's own arrival times at each rate; poisson: draw Poisson "
                             "arrivals with its sizes; for every trace, or per trace (code=trace); default "
                             + " ".join(f"{trace}={kind}" for trace, kind in DEFAULT_ARRIVALS.items()))
    parser.add_argument("--loads", nargs="+", metavar="TRACE=L1,L2",
                        help="the sweep per trace in loads, the reference's mean requests in flight (rate × its "
                             "mean uncontended E2E), set to rates from this host's reference; default "
                             + " ".join(f"{trace}={','.join(f'{load:g}' for load in loads)}"
                                        for trace, loads in DEFAULT_LOADS.items()))
    parser.add_argument("--rates", nargs="+", metavar="TRACE=R1,R2",
                        help="explicit open-loop mean rates, requests/s, per trace (its name, or its file's stem), "
                             "instead of its loads; `none`: no sweep")
    parser.add_argument("--light-rates", nargs="+", metavar="TRACE=R",
                        help="rates added to a trace's sweep, requests/s")
    parser.add_argument("--min-duration-s", type=float, default=Plan().min_duration_s)
    parser.add_argument("--min-requests", type=int, default=Plan().min_requests)
    parser.add_argument("--num-uncontended", type=int, default=Plan().num_uncontended)
    parser.add_argument("--anchor-concurrencies", type=int, nargs="*", default=list(Plan().anchor_concurrencies))
    parser.add_argument("--anchor-requests-per-user", type=int, default=Plan().num_anchor_requests_per_user)
    parser.add_argument("--repeats", type=int, default=1, help="runs of every cell, pooled (one commit)")
    parser.add_argument("--reference", type=Path, help="a reference.json to judge by, when the baseline is not run")
    parser.add_argument("--min-reference-requests", type=int, default=30,
                        help="uncontended requests the reference's fit needs per trace (lower only for smoke runs)")
    parser.add_argument("--report-only", action="store_true", help="measure nothing; rebuild from raw/")
    parser.add_argument("--second-baseline", default=SPLIT_BASELINE, metavar="SYSTEM",
                        help="report.md also holds every scheduled splitserve system against this one "
                             f"(default {SPLIT_BASELINE}: always_split)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if "all" in args.systems:
        args.systems = list(SYSTEMS)
    elif "policies" in args.systems:
        args.systems = list(dict.fromkeys([*POLICY_COMPARISON, *(name for name in args.systems
                                                                  if name != "policies")]))
    return args


def main(argv: list[str] | None = None) -> None:
    args = _arguments(argv)
    # Ctrl-C or a TERM stops the run through every system's `finally`, which stops what it started. Started in
    # the background, a process may inherit SIGINT ignored; the systems' processes inherit what is set here.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    traces = tuple(args.traces)
    plan = Plan(traces=traces, arrivals=_parse_arrivals(args.arrivals, traces),
                rates_per_s=_parse_per_trace(args.rates, traces),
                loads=DEFAULT_LOADS | _parse_per_trace(args.loads, traces, "--loads"),
                light_rates_per_s=_parse_per_trace(args.light_rates, traces, "--light-rates"),
                min_duration_s=args.min_duration_s, min_requests=args.min_requests,
                num_uncontended=args.num_uncontended, anchor_concurrencies=tuple(args.anchor_concurrencies),
                num_anchor_requests_per_user=args.anchor_requests_per_user)
    config = app_config()
    origin = provenance()
    raw = RawCells(args.out / "raw")
    commit = origin["commit"] + ("-dirty" if origin["is_dirty"] else "")
    logs_dir = Path(__file__).parents[1] / ".cache" / "bench-logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    began = time.time()

    systems = {name: (SYSTEMS[name].description, SYSTEMS[name].start, SYSTEMS[name].config())
               for name in args.systems}
    for entry in args.running:
        name, _, url = entry.partition("=")
        systems[name] = (f"already running at {url} (not started by the benchmark)",
                         lambda _logs, url=url: contextlib.nullcontext(url), {"base_url": url})
    sweep = SweepRates(plan, raw, args, baseline=BASELINE)
    if sweep.unit_rates is None:  # the sweep's rates come from the baseline's uncontended cells: it runs first
        if BASELINE not in systems:
            raise SystemExit(f"the sweep of {', '.join(plan.calibrated_traces())} is set in loads of the reference, "
                             f"which {BASELINE} measures: run it too, or pass --reference or --rates")
        systems = {BASELINE: systems[BASELINE]} | systems
    if args.report_only:
        commit = measured_commit(raw, list(systems), sweep.cells(), args.repeats)
        sweep.settle(commit)
        measured_commit(raw, list(systems), sweep.cells(), args.repeats)
    else:
        sweep.settle(commit, is_required=False)  # a resumed run whose baseline measured its uncontended cells
    prompts = Prompts(config.model.path, sweep.cells)
    runs = []
    done_metas: list[dict[str, Any]] = []  # every raw cell this report reads
    for index, (name, (description, start, system_config)) in enumerate(systems.items()):
        run = SystemRun(name=name, description=description, config=system_config)

        def batches(name: str = name) -> Iterator[list[tuple[Workload, int]]]:
            if sweep.unit_rates is None:  # the baseline: its uncontended cells, then the sweep at their rates
                uncontended = [cell for cell in sweep.cells() if cell.kind == "uncontended"]
                yield cells_to_run(raw, name, uncontended, args.repeats, commit)
                sweep.settle(commit)
            yield cells_to_run(raw, name, sweep.cells(), args.repeats, commit)

        if not args.report_only and (sweep.unit_rates is None
                                     or cells_to_run(raw, name, sweep.cells(), args.repeats, commit)):
            print(f"[{index + 1}/{len(systems)}] {name}: {description}", flush=True)
            _measure(run, start, batches(), prompts.of, config.model.served_name, logs_dir, raw, commit)
        if sweep.unit_rates is None:
            sweep.settle(commit)  # the baseline failed before its uncontended cells were all measured: says why
        for cell in sweep.cells():
            for repeat in range(args.repeats):
                if raw.is_done(name, cell, repeat, commit):
                    done_metas.append(cell_meta := raw.meta(name, cell.name, repeat))
                    records, stats = raw.load(name, cell.name, repeat)
                    run.records.setdefault(cell.name, []).extend(records)
                    run.generator.setdefault(cell.name, []).append(stats)
                    for column in report.HOST_PROBES:
                        if (probe_ms := cell_meta.get(column)) is not None:
                            run.host_probes.setdefault(column, {}).setdefault(cell.name, []).append(probe_ms)
        runs.append(run)
        write_requests_csv([record for records in run.records.values() for record in records],
                           args.out / f"requests_{name}.csv")

    cells = sweep.cells()
    finished = sorted(meta["finished_at"] for meta in done_metas)
    reference = _reference(runs, cells, commit, args)
    if reference is not None:
        (args.out / "reference.json").write_text(reference.model_dump_json(indent=1))
    rows = summarize(runs, cells, reference)
    write_summary_csv(rows, args.out / "summary.csv")
    meta = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)),
            "wall_s": round(time.time() - began, 1), **origin, "measured_commit": commit,
            "cells_finished_between": [finished[0], finished[-1]] if finished else None,
            "cells_measured_at": sorted({meta["commit"] for meta in done_metas}),
            "are_cells_digested": bool(done_metas) and all("cell_digest" in meta for meta in done_metas),
            "model": config.model.served_name, "baseline": BASELINE, "repeats": args.repeats,
            "request_timeout_s": REQUEST_TIMEOUT_S, "is_report_only": args.report_only,
            "plan": json.loads(plan.model_dump_json(exclude={"traces_dir"})),
            "unit_rates_per_s": sweep.unit_rates, "sweep_rates_per_s": plan.sweep_rates(sweep.unit_rates),
            "cells": [json.loads(cell.model_dump_json(exclude={"requests"})) | {"num_requests": len(cell.requests)}
                      for cell in cells],
            "systems": [{"name": run.name, "description": run.description, "startup_s": run.startup_s,
                         "error": run.error, "config": run.config} for run in runs]}
    if args.report_only:
        meta = carried_over(args.out / "run.json", meta)
    (args.out / "run.json").write_text(json.dumps(meta, indent=2))
    figures = plots.draw_all(runs, cells, rows, args.out)
    table = report.write(runs, cells, rows, meta, reference, figures, args.out / "report.md",
                         second_baseline=args.second_baseline)
    print(table)
    print(f"results in {args.out} ({meta['wall_s'] / 60:.1f} min)")


def _reference(runs: list[SystemRun], cells: list[Workload], commit: str, args: argparse.Namespace) -> Reference | None:
    if args.reference is not None:
        return Reference.model_validate_json(args.reference.read_text())
    baseline = next((run for run in runs if run.name == BASELINE), None)
    if baseline is None or not baseline.records:
        print(f"no SLO verdicts: {BASELINE} (the reference) was not run; pass --reference", flush=True)
        return None
    try:
        return fit_reference_from(baseline, cells, commit, min_requests=args.min_reference_requests)
    except ValueError as exc:
        print(f"no SLO verdicts: {exc}", flush=True)
        return None


if __name__ == "__main__":
    main()
