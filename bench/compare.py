"""The comparison: every system, one after another on this host, through the same cells, judged by one reference.

    python -m bench.compare                         # the default: collocated, splitserve-predictive, Ray Serve LLM PD
    python -m bench.compare --light-rates conv=0.15 code=0.1   # adds a lighter end: ~2 h instead of 64 min
    python -m bench.compare --systems all           # adds the rest; cells already measured at this commit are kept
    python -m bench.compare --systems policies      # every scheduling policy as its own row
    python -m bench.compare --systems collocated splitserve-nixl --traces code --rates code=0.2,0.4,0.6,0.8,1.0
    python -m bench.compare --running mine=http://127.0.0.1:8000 --systems collocated   # add a running server
    python -m bench.compare --report-only           # rebuild summary, report and figures from the raw files

1. The plan (bench/workloads.py) expands into cells: per trace an uncontended cell and a rate sweep, then the
   anchors. Every prompt is built once, with the served model's tokenizer, so each system sees the same prompts
   (unique per request: no prefix cache can help).
2. For each system (bench/systems.py): the cells still to measure at this commit (`--repeats` runs of each) are
   run after one start and a warm-up, through the load generator's own process (bench/load_generator.py); each
   cell's requests are written to raw/<system>/ as soon as it ends, so a stopped run resumes cell by cell. A system
   that fails to start is reported and the run goes on; it stops, with everything it started, before the next.
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
import hashlib
import json
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import plots, report
from bench.load_generator import CellRunner, GeneratorStats, PromptBuilder, RequestRecord, filler_document
from bench.load_generator import run_closed_loop
from bench.provenance import provenance
from bench.result_files import (
    read_requests_csv,
    request_sample,
    span_s,
    summary_row,
    write_requests_csv,
    write_summary_csv,
)
from bench.slo import Goodput, Reference, attainment_goodput, fit_reference, goodput
from bench.systems import BASELINE, DEFAULT_SYSTEMS, POLICY_COMPARISON, SPLIT_BASELINE, SYSTEMS, app_config
from bench.traces import TraceRequest
from bench.workloads import TRACE_FILES, Plan, Workload

DEFAULT_OUT = Path(__file__).parent / "results" / "compare"
PROMPT_IDS_PER_CELL = 10_000
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


def cell_digest(cell: Workload) -> str:
    """What a cell sends (kind, concurrency, every request's arrival and sizes), in 16 hex digits."""
    sent = cell.model_dump_json(include={"kind", "rate_per_s", "concurrency", "requests"})
    return hashlib.sha256(sent.encode()).hexdigest()[:16]


class RawCells:
    """raw/<system>/<cell>.r<repeat>.csv and .json: one cell's requests and how they were measured.

    A cell is done when its files were measured at this commit and sent what the plan's cell of that name sends
    (its digest): a plan changed under the same name (a rate's scaling, `--min-requests`) is measured again, not
    resumed. Files written before digests were recorded are taken by name.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, system: str, cell: str, repeat: int, suffix: str) -> Path:
        return self.root / system / f"{plots.file_name(cell)}.r{repeat}{suffix}"

    def meta(self, system: str, cell: str, repeat: int) -> dict[str, Any] | None:
        path = self._path(system, cell, repeat, ".json")
        return json.loads(path.read_text()) if path.exists() else None

    def is_done(self, system: str, cell: Workload, repeat: int, commit: str) -> bool:
        meta = self.meta(system, cell.name, repeat)
        return meta is not None and meta["commit"] == commit and self.is_same_cell(meta, cell)

    @staticmethod
    def is_same_cell(meta: dict[str, Any], cell: Workload) -> bool:
        return meta.get("cell_digest") in (None, cell_digest(cell))

    def save(self, system: str, cell: Workload, repeat: int, records: list[RequestRecord], stats: GeneratorStats,
             commit: str) -> None:
        csv_path = self._path(system, cell.name, repeat, ".csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_requests_csv(records, csv_path)
        self._path(system, cell.name, repeat, ".json").write_text(json.dumps(
            {"system": system, "cell": cell.name, "repeat": repeat, "commit": commit, "cell_digest": cell_digest(cell),
             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "generator": stats.__dict__}, indent=1))

    def load(self, system: str, cell: str, repeat: int) -> tuple[list[RequestRecord], GeneratorStats]:
        meta = json.loads(self._path(system, cell, repeat, ".json").read_text())
        return read_requests_csv(self._path(system, cell, repeat, ".csv")), GeneratorStats(**meta["generator"])


def cell_prompts(cells: list[Workload], model_path: str) -> dict[str, list[str]]:
    builder = PromptBuilder(model_path, filler_document())
    return {cell.name: [builder.build(index * PROMPT_IDS_PER_CELL + request.request_id, request.prompt_tokens)
                        for request in cell.requests]
            for index, cell in enumerate([WARM_UP, *cells])}


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


def _measure(run: SystemRun, start: Any, todo: list[tuple[Workload, int]], prompts: dict[str, list[str]],
             model: str, logs_dir: Path, raw: RawCells, commit: str) -> None:
    began = time.perf_counter()
    try:
        with start(logs_dir) as base_url, CellRunner() as runner:
            run.startup_s = time.perf_counter() - began
            print(f"{run.name}: up at {base_url} after {run.startup_s:.0f} s; {len(todo)} cells to run", flush=True)
            asyncio.run(run_closed_loop(base_url=base_url, model=model, requests=list(WARM_UP.requests),
                                        prompts=prompts[WARM_UP.name], concurrency=1, is_progress_shown=False))
            for index, (cell, repeat) in enumerate(todo):
                print(f"{run.name}: cell {index + 1}/{len(todo)}", flush=True)
                records, stats = _run_cell(runner, base_url, model, cell, prompts[cell.name], repeat)
                raw.save(run.name, cell, repeat, records, stats, commit)
    except Exception as exc:  # one system failing must not lose the others' results
        run.error = f"{type(exc).__name__}: {exc}"[:2000]
        print(f"{run.name}: FAILED: {run.error}", flush=True)


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


def _parse_rates(entries: list[str] | None, traces: tuple[str, ...], *, is_light: bool = False
                 ) -> dict[str, tuple[float, ...]]:
    """`conv=0.5,1.5 code=1` -> rates per trace name; traces not named keep the default rates; `none` clears all."""
    names = [trace if trace in TRACE_FILES else Path(trace).stem for trace in traces]
    defaults, own = (Plan().light_rates_per_s, ()) if is_light else (Plan().rates_per_s, (0.5, 1.0, 1.5, 2.0, 2.5))
    rates = {name: defaults.get(name, own) for name in names}
    for entry in entries or []:
        if entry == "none":
            rates = {name: () for name in names}
            continue
        name, _, values = entry.partition("=")
        if name not in rates:
            option = "--light-rates" if is_light else "--rates"
            raise SystemExit(f"{option} names {name!r}, which is not among the traces {names}")
        rates[name] = tuple(float(value) for value in values.split(",") if value)
    return rates


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
    parser.add_argument("--arrivals", choices=["trace", "poisson"], default="trace",
                        help="replay the trace's own arrival times at each rate, or draw Poisson arrivals")
    parser.add_argument("--rates", nargs="+", metavar="TRACE=R1,R2",
                        help="open-loop mean rates, requests/s, per trace (its name, or its file's stem)")
    parser.add_argument("--light-rates", nargs="+", metavar="TRACE=R",
                        help="a lighter end for the sweep, kept apart because ≥ 50 requests at it take longest "
                             "(none by default; conv=0.15 code=0.1 turns the default run's 64 minutes into about 2 hours)")
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
    plan = Plan(traces=traces, arrivals=args.arrivals, rates_per_s=_parse_rates(args.rates, traces),
                light_rates_per_s=_parse_rates(args.light_rates, traces, is_light=True),
                min_duration_s=args.min_duration_s, min_requests=args.min_requests,
                num_uncontended=args.num_uncontended, anchor_concurrencies=tuple(args.anchor_concurrencies),
                num_anchor_requests_per_user=args.anchor_requests_per_user)
    cells = plan.workloads()
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
    if args.report_only:
        commit = _commit_of(raw, list(systems), cells, args.repeats)
    prompts = None if args.report_only else cell_prompts(cells, config.model.path)
    runs = []
    done_metas: list[dict[str, Any]] = []  # every raw cell this report reads
    for index, (name, (description, start, system_config)) in enumerate(systems.items()):
        run = SystemRun(name=name, description=description, config=system_config)
        todo = [(cell, repeat) for repeat in range(args.repeats) for cell in cells
                if not raw.is_done(name, cell, repeat, commit)]
        for cell, repeat in todo:
            if (meta := raw.meta(name, cell.name, repeat)) is not None and meta["commit"] == commit:
                print(f"{name}/{cell.name}: measured at this commit with other requests; measuring it again")
        if todo and not args.report_only:
            print(f"[{index + 1}/{len(systems)}] {name}: {description}", flush=True)
            _measure(run, start, todo, prompts, config.model.served_name, logs_dir, raw, commit)
        for cell in cells:
            for repeat in range(args.repeats):
                if raw.is_done(name, cell, repeat, commit):
                    done_metas.append(raw.meta(name, cell.name, repeat))
                    records, stats = raw.load(name, cell.name, repeat)
                    run.records.setdefault(cell.name, []).extend(records)
                    run.generator.setdefault(cell.name, []).append(stats)
        runs.append(run)
        write_requests_csv([record for records in run.records.values() for record in records],
                           args.out / f"requests_{name}.csv")

    finished = sorted(meta["finished_at"] for meta in done_metas)
    reference = _reference(runs, cells, commit, args)
    if reference is not None:
        (args.out / "reference.json").write_text(reference.model_dump_json(indent=1))
    rows = summarize(runs, cells, reference)
    write_summary_csv(rows, args.out / "summary.csv")
    meta = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)),
            "wall_s": round(time.time() - began, 1), **origin, "measured_commit": commit,
            "cells_finished_between": [finished[0], finished[-1]] if finished else None,
            "are_cells_digested": bool(done_metas) and all("cell_digest" in meta for meta in done_metas),
            "model": config.model.served_name, "baseline": BASELINE, "repeats": args.repeats,
            "request_timeout_s": REQUEST_TIMEOUT_S, "is_report_only": args.report_only,
            "plan": json.loads(plan.model_dump_json(exclude={"traces_dir"})),
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


def _commit_of(raw: RawCells, systems: list[str], cells: list[Workload], repeats: int) -> str:
    """The one commit the raw files of a report measured; a report never mixes commits, nor other plans' cells."""
    metas = {(system, cell.name, repeat): (meta, cell) for system in systems for cell in cells
             for repeat in range(repeats) if (meta := raw.meta(system, cell.name, repeat)) is not None}
    found = {meta["commit"] for meta, _ in metas.values()}
    if len(found) != 1:
        raise SystemExit(f"--report-only needs raw files of one commit; found {sorted(found) or 'none'}")
    other = [f"{system}/{name}" for (system, name, _), (meta, cell) in metas.items()
             if not raw.is_same_cell(meta, cell)]
    if other:
        raise SystemExit(f"--report-only: these raw cells sent other requests than this plan's cells of the same "
                         f"name (pass the options they were run with): {', '.join(other)}")
    return found.pop()


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
