"""What a served engine call takes before its engine's output, beside the engine's own prompt step.

    python -m bench.call_overhead                      # collocated and splitserve-nixl, prompts of 64 and 256 tokens
    python -m bench.call_overhead --systems splitserve-nixl --sizes 64 --num-requests 8 --out /tmp/overhead

Why: a replica's call holds more than its engine's step (the OpenAI serving layer, the engine's frontend, the
queues between processes), and the simulator's profile times the engine alone. The router's phases (Server-Timing)
add the hops around the call; this tool finds the part inside it.
1. Each system starts with every engine's step trace on (deployments/step_trace.py: the wall time at which a step's
   outputs reached the replica, and which prompts finished in it) and its Serve logs kept.
2. Requests go one at a time, a second apart, so that every engine is idle when one arrives: prompts of each
   `--sizes` in turn, `--output-tokens` out, after one untimed request of each size.
3. Per request: the engine call's start, from its replica's `CALL <method> OK <ms>` log line (its time less its
   duration), to the step-trace line in which its prompt finished; and from that line to the call's end. Beside it,
   the median prompt step of that size in `--profile`'s steps.csv (bench.profile), and the router's phases.
4. calls.csv (every request) and report.md (medians with p10-p90 per system and size), with the commit measured.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import datetime
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_OUT = Path(__file__).parent / "results" / "call_overhead"
DEFAULT_PROFILE = Path(__file__).parent / "results" / "profile" / "steps.csv"
CALL_LINE = re.compile(r"^INFO (\S+ \S+) \S+ \S+ [0-9a-f-]{36} -- CALL (prefill|generate) OK ([\d.]+)ms")
FIELDS = ("system", "num_prompt_tokens", "call_start_s", "to_prompt_output_s", "output_to_call_end_s",
          "router_prefill_s", "router_first_chunk_s", "ttft_s")


def engine_calls(log_paths: list[Path], since_s: float) -> list[tuple[float, float]]:
    """(start, end) epoch seconds of every engine call the replicas logged from `since_s` on, in start order: a
    `CALL prefill` (a split's prefill) or `CALL generate` (a whole request on one engine) line, at its end."""
    calls = []
    for path in log_paths:
        for line in path.read_text(errors="replace").splitlines():
            found = CALL_LINE.match(line)
            if found is None:
                continue
            end = datetime.datetime.strptime(found.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
            start = end - float(found.group(3)) / 1e3
            if start >= since_s:
                calls.append((start, end))
    return sorted(calls)


def prompt_outputs(trace_paths: list[Path]) -> list[float]:
    """Wall times of the step-trace lines in which a prompt finished, every engine's, in order."""
    times = []
    for path in trace_paths:
        lines = path.read_text().splitlines()
        columns = lines[0].split("\t")
        wall, finished = columns.index("wall_s"), columns.index("num_prompts_finished")
        times += [float(cells[wall]) for cells in (line.split("\t") for line in lines[1:]) if int(cells[finished])]
    return sorted(times)


def match(calls: list[tuple[float, float]], outputs: list[float]) -> list[tuple[float, float] | None]:
    """Per call, (call start to its prompt's output, that output to the call's end): the first prompt output inside
    the call (one request at a time: there is one); None where the trace has none."""
    matched = []
    for start, end in calls:
        inside = next((at for at in outputs if start <= at <= end), None)
        matched.append(None if inside is None else (inside - start, end - inside))
    return matched


def profile_steps(path: Path) -> dict[int, float]:
    """bench.profile's measured single-prompt steps (its steps.csv at `path`): median seconds per prompt size."""
    from bench.profile import read_measurements

    if not path.exists():
        return {}
    sizes: dict[int, list[float]] = {}
    for step in read_measurements(path.parent)[0]:
        if step.kind == "prefill":
            sizes.setdefault(step.num_prompt_tokens, []).append(step.seconds)
    return {size: float(np.median(values)) for size, values in sizes.items()}


def measure(system: str, sizes: list[int], num_requests: int, output_tokens: int, work: Path) -> list[dict[str, Any]]:
    """2.-3. for one system: its rows (FIELDS)."""
    from bench import processes
    from bench.load_generator import PromptBuilder, filler_document, run_closed_loop
    from bench.systems import SYSTEMS, app_config
    from bench.traces import TraceRequest
    from deployments.step_trace import STEP_TRACE_DIR_ENV

    config = app_config()
    builder = PromptBuilder(config.model.path, filler_document())
    traces, logs = work / f"{system}-steps", work / f"{system}-logs"
    logs.mkdir(parents=True, exist_ok=True)
    os.environ[STEP_TRACE_DIR_ENV] = str(traces)
    processes.use_ray_token_auth()

    def one(base_url: str, request_id: int, size: int) -> Any:
        request = TraceRequest(request_id=request_id, arrival_s=0.0, prompt_tokens=size, output_tokens=output_tokens)
        return asyncio.run(run_closed_loop(base_url=base_url, model=config.model.served_name, requests=[request],
                                           prompts=[builder.build(request_id, size)], concurrency=1,
                                           description="", is_progress_shown=False))[0]

    records = []
    try:
        with SYSTEMS[system].start(logs) as base_url:
            for size in sizes:  # untimed: a size's first run pays one-time costs
                one(base_url, -size, size)
            since = time.time()
            for index in range(num_requests):
                size = sizes[index % len(sizes)]
                records.append((size, one(base_url, index, size)))
                print(f"{system}: {index + 1}/{num_requests}", end="\r", flush=True)
                time.sleep(1.0)  # every engine idle before the next
    finally:
        os.environ.pop(STEP_TRACE_DIR_ENV, None)
    calls = engine_calls(sorted(logs.glob("serve-logs-*/replica_*.log")), since)
    matched = match(calls, prompt_outputs(sorted(traces.glob("*.steps.tsv"))))
    if len(calls) != len(records):
        raise RuntimeError(f"{system}: {len(calls)} engine calls logged for {len(records)} requests")
    rows = []
    for (size, record), (start, _), parts in zip(records, calls, matched, strict=True):
        if not record.is_ok:
            raise RuntimeError(f"{system}: a request failed: {record.error}")
        rows.append({"system": system, "num_prompt_tokens": size, "call_start_s": start,
                     "to_prompt_output_s": None if parts is None else parts[0],
                     "output_to_call_end_s": None if parts is None else parts[1],
                     "router_prefill_s": record.prefill_s, "router_first_chunk_s": record.first_chunk_s,
                     "ttft_s": record.ttft_s})
    return rows


def report_lines(rows: list[dict[str, Any]], steps: dict[int, float], meta: dict[str, Any]) -> list[str]:
    def spread(values: list[float]) -> str:
        return (f"{np.median(values) * 1e3:.1f} [{np.percentile(values, 10) * 1e3:.1f}-"
                f"{np.percentile(values, 90) * 1e3:.1f}]") if values else "–"

    lines = ["# A served engine call before its engine's output", "", f"`{meta['command']}`",
             f"at commit {meta['commit']}{' (dirty tree)' if meta['is_dirty'] else ''}, {meta['started_at']}, on "
             f"{meta['host'].get('cpu', 'an unrecorded host')}; one request at a time, a second apart. Milliseconds, "
             "median [p10-p90]; the profile's step is the median of its measured single-prompt steps of that size "
             f"({meta['profile']}). Output to call end: a split's prefill call ends with its answer, a collocated "
             "call with the rest of its stream.", "",
             "| system | prompt tokens | n | call start to prompt output | profile's step | beyond it | "
             "output to call end | router: prefill | router: first chunk |", "|" + " --- |" * 9]
    for system in dict.fromkeys(row["system"] for row in rows):
        for size in sorted({row["num_prompt_tokens"] for row in rows if row["system"] == system}):
            mine = [row for row in rows if row["system"] == system and row["num_prompt_tokens"] == size]
            to_output = [row["to_prompt_output_s"] for row in mine if row["to_prompt_output_s"] is not None]
            step = steps.get(size)
            beyond = spread([value - step for value in to_output]) if step is not None else "–"
            lines.append(
                f"| {system} | {size} | {len(mine)} | {spread(to_output)} | "
                f"{'–' if step is None else f'{step * 1e3:.1f}'} | {beyond} | "
                f"{spread([row['output_to_call_end_s'] for row in mine if row['output_to_call_end_s'] is not None])}"
                f" | {spread([row['router_prefill_s'] for row in mine if row['router_prefill_s'] is not None])} | "
                f"{spread([row['router_first_chunk_s'] for row in mine if row['router_first_chunk_s'] is not None])}"
                " |")
    return lines + ["", "Every request is in [calls.csv](calls.csv)."]


def main(argv: list[str] | None = None) -> None:
    import sys
    import tempfile

    from bench.provenance import provenance

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--systems", nargs="+", default=["collocated", "splitserve-nixl"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 256], help="prompt tokens, taken in turn")
    parser.add_argument("--num-requests", type=int, default=24, help="timed requests per system")
    parser.add_argument("--output-tokens", type=int, default=4)
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE, help="bench.profile's steps.csv")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--report-only", action="store_true",
                        help="measure nothing: write report.md again from --out's calls.csv and run.json")
    args = parser.parse_args(argv)
    if args.report_only:
        meta = json.loads((args.out / "run.json").read_text())
        with open(args.out / "calls.csv", newline="") as handle:
            rows = [{key: value if key == "system" else int(value) if key == "num_prompt_tokens"
                     else float(value) if value else None for key, value in row.items()}
                    for row in csv.DictReader(handle)]
        lines = report_lines(rows, profile_steps(Path(meta["profile"])), meta)
        (args.out / "report.md").write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    command = " ".join(["python -m bench.call_overhead", *(sys.argv[1:] if argv is None else argv)])
    began, origin = time.strftime("%Y-%m-%d %H:%M:%S"), provenance()
    work = Path(tempfile.mkdtemp(prefix="call-overhead-"))
    rows = [row for system in args.systems
            for row in measure(system, args.sizes, args.num_requests, args.output_tokens, work)]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "calls.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(FIELDS))
        writer.writeheader()
        writer.writerows(rows)
    meta = {"command": command, "started_at": began, **origin, "profile": str(args.profile)}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2))
    lines = report_lines(rows, profile_steps(args.profile), meta)
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
