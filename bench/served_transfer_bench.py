"""What the KV hand-over costs a request in the served app: Splitwise's two figures, measured here.

For prompts of about 1,000 tokens, streamed through the openai client, either one request at a time (no queueing,
the default) or under load (`--rate`: open-loop Poisson arrivals at that many requests a second):
- transfer share of E2E: the transfer time a request waits for, from the engines' own connector stats (prefill's
  step blocked on sending + decode waiting for and loading the KV), over its end-to-end latency. One at a time,
  per request (the median of the shares); under load, requests overlap, so each transfer's own time comes from
  decode's engine (its p50 and p90 are reported) and the share is the mean transfer over the mean E2E;
- TTFT and second-token latency against a collocated vLLM engine with the same settings, measured in the same run,
  each as a ratio of medians with a 95% bootstrap interval;
- the hand-over as the router sees it (splitserve's `Server-Timing`: prefill's answer -> decode's first chunk, so
  the transfer plus decode's first step), p50 and p90.

Systems, one after another on this host: `collocated` (one vLLM engine, no disaggregation: the baseline, on
prefill's core), `serve_path` and `serve_path_decode_core` (splitserve in collocated mode, one engine on prefill's
core or on decode's), `object_store` (layer-by-layer overlap, KV loaded inside decode's step),
`object_store_no_overlap` (KV handed over after the forward pass), `object_store_in_background` (decode loads in
the background and computes a step later), `nixl` (its default: in step), `nixl_in_step` (the same, named) and
`nixl_in_background`.
In splitserve the router streams decode's tokens, so the transfer lands before the first token: expect
it in TTFT, not between the first and the second token.

    python -m bench.served_transfer_bench [--num-requests 8] [--prompt-tokens 1000] [--rate R] [--systems ...]
                                          [--out bench/results/served_transfer]

Writes, under --out: requests.csv (every measured request), transfers.csv (each KV load's own seconds, as decode's
engine timed it), summary.csv (per system), report.md (the command, then the summary as a table) and steps/<system>/
(every splitserve engine's step trace, deployments/step_trace.py; `python -m bench.second_token_steps` reads them).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench.load_generator import PromptBuilder, filler_document, run_trace
from bench.traces import TraceRequest
from bench import processes
from bench.bootstrap import ratio_interval
from bench.processes import PROJECT_ROOT
from bench.result_files import measured_commit
from bench.systems import app_config, serve_config

# Ray 2.60 starts clusters with token auth; its clients read the mode when Ray is first imported.
os.environ["RAY_AUTH_MODE"] = "token"

# Each splitserve system: its updates to serve_config.yaml's args. `serve_path` is splitserve in collocated mode
# with one engine on the baseline's core: the router and Serve's streaming hops without a hand-over, so that
# collocated -> serve_path -> a PD system splits a PD system's gap into what Serve's path costs and what the split does.
SYSTEMS: dict[str, dict[str, Any] | None] = {
    "collocated": None,
    "serve_path": {"mode": "collocated", "collocated": {"num_replicas": 1, "cpu_binding": ["0"]}},
    # The same on decode's core (core 1; the plain engine and `serve_path` compute on prefill's core 0): whether a
    # PD system's second token, made by decode on core 1, pays for the split or for the core it runs on.
    "serve_path_decode_core": {"mode": "collocated", "collocated": {"num_replicas": 1, "cpu_binding": ["1"]}},
    "object_store": {"transfer": {"backend": "object_store", "is_layer_by_layer": True}},
    "object_store_no_overlap": {"transfer": {"backend": "object_store", "is_layer_by_layer": False}},
    # Every load in the background, the request scheduled the step after (transfer.is_load_in_step: false), as
    # vLLM's NIXL connector loads: what loading inside the step buys.
    "object_store_in_background": {"transfer": {"backend": "object_store", "is_load_in_step": False}},
    "nixl": {"transfer": {"backend": "nixl"}},
    # NIXL as vLLM's connector loads: every KV in the background, the request computed a step later.
    "nixl_in_background": {"transfer": {"backend": "nixl", "is_load_in_step": False}},
    # NIXL loading each split (after the first from its prefill engine) inside decode's step.
    "nixl_in_step": {"transfer": {"backend": "nixl", "is_load_in_step": True}},
    # The same with each engine's processes pinned to its own core (EngineRoleConfig.pin_engine_processes): whether
    # the other role's idle EngineCore, spinning after its step, is what slows decode's step.
    "nixl_pinned": {"transfer": {"backend": "nixl"}, "prefill": {"pin_engine_processes": True},
                    "decode": {"pin_engine_processes": True}},
    # NIXL with its progress thread waking every 20 ms instead of 5 (transfer.nixl_progress_interval_us): whether
    # the thread's passes over a used agent are what slow decode's step after real transfers.
    "nixl_progress_20ms": {"transfer": {"backend": "nixl", "nixl_progress_interval_us": 20000}},
    # NIXL with no progress thread (transfers move when the engines poll): decode's worker has one core, and the
    # thread's passes preempt the model thread in the middle of an in-step READ (bench/results/nixl_load_syscalls).
    "nixl_no_progress_thread": {"transfer": {"backend": "nixl", "nixl_progress_interval_us": None}},
    # NIXL with UCX's default spinlock on the worker (the default is its mutex, transfer.nixl_ucx_lock): the progress
    # thread spins out its time slice on decode's one core while the model thread holds the worker mid-READ.
    "nixl_ucx_spin": {"transfer": {"backend": "nixl", "nixl_ucx_lock": "spin"}},
    # NIXL with 512-token KV blocks (model.block_size; vLLM's CPU default is 128): a READ posts one descriptor per
    # block of a layer's K or V, and the kernel's copy between two processes (UCX's cma) pays per descriptor.
    "nixl_block512": {"model": {"block_size": 512}, "transfer": {"backend": "nixl"}},
}
NUM_WARM_UP_REQUESTS = 2
NUM_OUTPUT_TOKENS = 16


def _serve_config(update: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    # Every request takes the split path, the one whose transfer this measures (the default policy would run
    # one-at-a-time prompts on the idle decode engine).
    config = serve_config(**{"scheduling": {"policy": "always_split"}, **update})
    return config, app_config(config)


def _prompts(model_path: str, num_tokens: int, count: int) -> list[str]:
    """Prompts of about `num_tokens` tokens, each with its own first words, so no prefix cache can help."""
    builder = PromptBuilder(model_path, filler_document())
    return [builder.build(index, num_tokens) for index in range(count)]


def _arrivals(num_requests: int, rate_per_s: float | None, seed: int = 0) -> list[float]:
    """Each request's send time after the first: Poisson at `rate_per_s`; None: one at a time (each after the last)."""
    if rate_per_s is None:
        return []
    rng = random.Random(seed)
    times, now = [], 0.0
    for _ in range(num_requests):
        times.append(now)
        now += rng.expovariate(rate_per_s)
    return times


def _row(record: Any) -> dict[str, float]:
    if not record.is_ok:
        raise RuntimeError(f"a benchmark request failed: {record.error}")
    row = {"prompt_tokens": record.prompt_tokens, "ttft_s": record.ttft_s, "second_token_s": record.tbt_s[0],
           "e2e_s": record.e2e_s}
    if record.first_chunk_s is not None:
        row["first_chunk_s"] = record.first_chunk_s
    return row


def _timed_requests(base_url: str, model: str, prompts: list[str], arrivals: list[float]) -> list[dict[str, float]]:
    """One request at a time (no `arrivals`), or all of them open-loop at their arrival times."""
    def trace(times: list[float]) -> list[TraceRequest]:
        return [TraceRequest(request_id=index, arrival_s=at, prompt_tokens=1, output_tokens=NUM_OUTPUT_TOKENS)
                for index, at in enumerate(times)]

    if not arrivals:
        return [_row(record) for prompt in prompts
                for record in asyncio.run(run_trace(base_url=base_url, model=model, requests=trace([0.0]),
                                                    prompts=[prompt], is_progress_shown=False))]
    records = asyncio.run(run_trace(base_url=base_url, model=model, requests=trace(arrivals), prompts=prompts,
                                    description="requests under load"))
    return [_row(record) for record in records]


def _warmed_up_rows(base_url: str, model: str, prompts: list[str], arrivals: list[float]) -> list[dict[str, float]]:
    """The warm-up requests one at a time, then the measured ones (one at a time, or at their `arrivals`)."""
    return (_timed_requests(base_url, model, prompts[:NUM_WARM_UP_REQUESTS], [])
            + _timed_requests(base_url, model, prompts[NUM_WARM_UP_REQUESTS:], arrivals))


def _run_collocated(config_args: Any, prompts: list[str], arrivals: list[float],
                    logs: Path) -> tuple[list[dict[str, float]], list[float]]:
    with processes.vllm_api_server(config_args, log_path=logs / "served-bench-collocated.log") as base_url:
        return _warmed_up_rows(base_url, config_args.model.served_name, prompts, arrivals), []


def _run_splitserve(name: str, update: dict[str, Any], prompts: list[str], arrivals: list[float],
                    logs: Path) -> tuple[list[dict[str, float]], list[float]]:
    import ray

    from bench import engines

    serve_config, config_args = _serve_config(update)
    model = config_args.model.served_name
    with processes.serve_run(serve_config, name=f"served-bench-{name}", logs_dir=logs) as served:
        ray.init(address=served.ray_address, namespace="serve", logging_level="ERROR", log_to_driver=False)
        try:
            if not config_args.is_disaggregated:  # Serve's path alone: no hand-over to count
                return _warmed_up_rows(served.base_url, model, prompts, arrivals), []

            def measured(batch: list[str], times: list[float]) -> list[dict[str, float]]:
                """The batch's rows; one at a time, each with its own transfer from the engines' counters."""
                if times:
                    return _timed_requests(served.base_url, model, batch, times)
                rows = []
                for prompt in batch:
                    before = engines.counters("prefill"), engines.counters("decode")
                    (row,) = _timed_requests(served.base_url, model, [prompt], [])
                    prefill = engines.delta(engines.counters("prefill"), before[0])
                    decode = engines.delta(engines.counters("decode"), before[1])
                    row["transfer_s"] = prefill["kv_send_wait_seconds"] + decode["kv_load_seconds"]
                    row["num_kv_bytes"] = decode["num_kv_bytes_transferred"]
                    row["num_prompt_tokens_recomputed"] = decode["num_prompt_tokens_computed"]
                    rows.append(row)
                return rows

            rows = measured(prompts[:NUM_WARM_UP_REQUESTS], [])
            before = engines.counters("prefill"), engines.counters("decode")
            rows += measured(prompts[NUM_WARM_UP_REQUESTS:], arrivals)
            decode_after = engines.counters("decode")
            num_loads = decode_after.num_kv_transfers - before[1].num_kv_transfers
            transfers = engines.recent_transfer_seconds("decode")[-num_loads:] if num_loads else []
            if arrivals:  # under load: the run's totals, spread evenly over its requests
                prefill = engines.delta(engines.counters("prefill"), before[0])
                decode = engines.delta(decode_after, before[1])
                for row in rows[NUM_WARM_UP_REQUESTS:]:
                    row["transfer_s"] = (prefill["kv_send_wait_seconds"] + decode["kv_load_seconds"]) / len(arrivals)
                    row["num_kv_bytes"] = decode["num_kv_bytes_transferred"] / len(arrivals)
                    row["num_prompt_tokens_recomputed"] = decode["num_prompt_tokens_computed"] / len(arrivals)
            return rows, transfers
        finally:
            engines.disconnect_driver()


def _summary(rows_by_system: dict[str, list[dict[str, float]]],
             transfers_by_system: dict[str, list[float]] | None = None,
             is_loaded: bool = False,
             decode_steps_by_system: dict[str, list[float]] | None = None,
             second_token_steps_by_system: dict[str, list[float]] | None = None) -> list[dict[str, Any]]:
    def median(system: str, key: str) -> float:
        return statistics.median(row[key] for row in rows_by_system[system])

    baselines = [name for name in ("collocated", "serve_path") if name in rows_by_system]
    summary = []
    for system, rows in rows_by_system.items():
        entry: dict[str, Any] = {"system": system, "num_requests": len(rows),
                                 "prompt_tokens": int(median(system, "prompt_tokens"))}
        for key in ("ttft_s", "second_token_s", "e2e_s"):
            entry[f"{key[:-2]}_ms"] = round(median(system, key) * 1e3, 1)
        for baseline in baselines:  # the ratio of medians, with a 95% bootstrap interval over each side's requests
            for key in ("ttft_s", "second_token_s", "e2e_s"):
                if baseline == "serve_path" and system == "collocated":
                    continue
                ratio = ratio_interval([row[key] for row in rows], [row[key] for row in rows_by_system[baseline]])
                entry[f"{key[:-2]}_vs_{baseline}"] = round(ratio.ratio, 3)
                entry[f"{key[:-2]}_vs_{baseline}_95"] = f"{ratio.low:.3f}-{ratio.high:.3f}"
        if "first_chunk_s" in rows[0]:
            first_chunks = [row["first_chunk_s"] for row in rows]
            entry["first_chunk_p50_ms"] = round(_percentile(first_chunks, 50) * 1e3, 1)
            entry["first_chunk_p90_ms"] = round(_percentile(first_chunks, 90) * 1e3, 1)
        if "transfer_s" in rows[0]:
            entry["transfer_ms"] = round(median(system, "transfer_s") * 1e3, 1)
            if is_loaded:  # requests overlap: the mean transfer over the mean end-to-end latency
                entry["transfer_share_of_e2e"] = round(statistics.fmean(row["transfer_s"] for row in rows)
                                                       / statistics.fmean(row["e2e_s"] for row in rows), 4)
            else:
                entry["transfer_share_of_e2e"] = round(
                    statistics.median(row["transfer_s"] / row["e2e_s"] for row in rows), 4)
            entry["kv_mb"] = round(median(system, "num_kv_bytes") / 1e6, 1)
        decode_steps = (decode_steps_by_system or {}).get(system)
        if decode_steps:  # the engine's own decode step (its step trace), p50 and p90
            entry["engine_step_p50_ms"] = round(_percentile(decode_steps, 50) * 1e3, 1)
            entry["engine_step_p90_ms"] = round(_percentile(decode_steps, 90) * 1e3, 1)
        second_token_steps = (second_token_steps_by_system or {}).get(system)
        if second_token_steps:  # the engine's step that made each request's second token, p50
            entry["second_token_step_p50_ms"] = round(_percentile(second_token_steps, 50) * 1e3, 1)
        transfers = (transfers_by_system or {}).get(system)
        if transfers:
            entry["load_p50_ms"] = round(_percentile(transfers, 50) * 1e3, 1)
            entry["load_p90_ms"] = round(_percentile(transfers, 90) * 1e3, 1)
        summary.append(entry)
    return summary


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q))


def _trace_steps(trace: Path) -> list[tuple[float, int, int]]:
    """An engine's step trace (deployments/step_trace.py) as (wall seconds, prompts finished, tokens generated)."""
    from deployments.step_trace import COLUMNS as STEP_COLUMNS

    columns = {name: index for index, name in enumerate(STEP_COLUMNS)}
    return [(float(fields[columns["wall_s"]]), int(fields[columns["num_prompts_finished"]]),
             int(fields[columns["num_generation_tokens"]]))
            for line in trace.read_text().splitlines() if line and not line.startswith(STEP_COLUMNS[0])
            for fields in [line.split("\t")]]


def generation_step_seconds(trace: Path) -> list[float]:
    """From an engine's step trace: the time between each two consecutive steps that both generated tokens and
    finished no prompt, i.e. the engine's decode step as its frontend saw it."""
    seconds, previous = [], None
    for wall_s, num_prompts_finished, num_generated in _trace_steps(trace):
        if num_generated > 0 and num_prompts_finished == 0 and previous is not None:
            seconds.append(wall_s - previous)
        previous = wall_s if num_generated > 0 else None
    return seconds


def second_token_step_seconds(trace: Path) -> list[float]:
    """From an engine's step trace: per request, the step that makes its second token, i.e. the time from the step
    that finished its prompt (on decode, the load's first token) to the next step, when that one decodes and
    finishes no prompt. Against the engine's steady step it shows what the first steps after a prompt or a load
    cost beyond it."""
    steps = _trace_steps(trace)
    return [following[0] - step[0] for step, following in zip(steps, steps[1:])
            if step[1] > 0 and step[2] > 0 and following[2] > 0 and following[1] == 0]


def _measure_one_system(system: str, prompts: list[str], arrivals: list[float], rows_path: Path) -> None:
    """One system, in a process of its own: Serve's client state does not survive moving between clusters."""
    from deployments.step_trace import STEP_TRACE_DIR_ENV

    logs = PROJECT_ROOT / ".cache" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    steps: list[float] = []
    second_token_steps: list[float] = []
    if SYSTEMS[system] is None:
        rows, transfers = _run_collocated(_serve_config({})[1], prompts, arrivals, logs)
    else:
        # Every engine of the app writes its step trace here: the engine's own decode step, next to what the
        # client sees between tokens, tells the engine's compute from the path the tokens take.
        trace_dir = rows_path.parent / f"{system}-steps"
        os.environ[STEP_TRACE_DIR_ENV] = str(trace_dir)
        rows, transfers = _run_splitserve(system, SYSTEMS[system], prompts, arrivals, logs)
        role = "decode" if _serve_config(SYSTEMS[system])[1].is_disaggregated else "collocated"
        traces = sorted(trace_dir.glob(f"{role}-*.steps.tsv"))
        steps = [seconds for trace in traces for seconds in generation_step_seconds(trace)]
        # The warm-up requests' steps are in the traces too: only the measured requests' second tokens count.
        second_token_steps = [seconds for trace in traces
                              for seconds in second_token_step_seconds(trace)][NUM_WARM_UP_REQUESTS:]
    rows_path.write_text(json.dumps({"rows": rows[NUM_WARM_UP_REQUESTS:], "transfers": transfers,
                                     "decode_steps": steps, "second_token_steps": second_token_steps}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--rate", type=float, help="requests a second, open-loop Poisson (default: one at a time)")
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "served_transfer")
    parser.add_argument("--one-system", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--prompts-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    arrivals = _arrivals(args.num_requests, args.rate)
    if args.one_system:
        _measure_one_system(args.one_system, json.loads(args.prompts_json.read_text()), arrivals, args.rows_json)
        return

    _, config_args = _serve_config({})
    per_system = NUM_WARM_UP_REQUESTS + args.num_requests
    prompts = _prompts(config_args.model.path, args.prompt_tokens, len(args.systems) * per_system)
    scratch = Path(tempfile.mkdtemp(prefix="ssb-"))
    rows_by_system: dict[str, list[dict[str, float]]] = {}
    transfers_by_system: dict[str, list[float]] = {}
    decode_steps_by_system: dict[str, list[float]] = {}
    second_token_steps_by_system: dict[str, list[float]] = {}
    for index, system in enumerate(tqdm(args.systems, desc="served transfer bench", unit="system")):
        prompts_path, rows_path = scratch / f"{system}-prompts.json", scratch / f"{system}-rows.json"
        # Fresh prompts for every system: no prefix cache anywhere can help.
        prompts_path.write_text(json.dumps(prompts[index * per_system:(index + 1) * per_system]))
        rate = [] if args.rate is None else ["--rate", str(args.rate)]
        subprocess.run([sys.executable, "-m", "bench.served_transfer_bench", "--one-system", system,
                        "--num-requests", str(args.num_requests), *rate,
                        "--prompts-json", str(prompts_path), "--rows-json", str(rows_path)],
                       cwd=PROJECT_ROOT, check=True)
        measured = json.loads(rows_path.read_text())
        rows_by_system[system], transfers_by_system[system] = measured["rows"], measured["transfers"]
        decode_steps_by_system[system] = measured["decode_steps"]
        second_token_steps_by_system[system] = measured.get("second_token_steps", [])

    args.out.mkdir(parents=True, exist_ok=True)
    for system in args.systems:  # the engines' step traces, raw, beside what was computed from them
        for trace in sorted((scratch / f"{system}-steps").glob("*.steps.tsv")):
            (args.out / "steps" / system).mkdir(parents=True, exist_ok=True)
            shutil.copy(trace, args.out / "steps" / system / trace.name)
    with open(args.out / "requests.csv", "w", newline="") as handle:
        fields = ["system", "prompt_tokens", "ttft_s", "second_token_s", "e2e_s", "first_chunk_s", "transfer_s",
                  "num_kv_bytes", "num_prompt_tokens_recomputed"]
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        for system, rows in rows_by_system.items():
            writer.writerows({"system": system, **row} for row in rows)
    with open(args.out / "transfers.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["system", "load_s"])
        writer.writerows([system, seconds] for system, transfers in transfers_by_system.items() for seconds in transfers)
    summary = _summary(rows_by_system, transfers_by_system, is_loaded=args.rate is not None,
                       decode_steps_by_system=decode_steps_by_system,
                       second_token_steps_by_system=second_token_steps_by_system)
    fields = list(dict.fromkeys(key for entry in summary for key in entry))
    with open(args.out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(summary)
    table = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    table += ["| " + " | ".join(str(entry.get(field, "")) for field in fields) + " |" for entry in summary]
    command = " ".join(["python -m bench.served_transfer_bench", *sys.argv[1:]])
    load = ("sent one at a time" if args.rate is None else
            f"sent open-loop at {args.rate} requests/s (Poisson, seed 0; the transfer share is the mean transfer over "
            f"the mean E2E, load_p50/p90 each KV load's own time on decode's engine)")
    header = ["# What the KV transfer costs a request", "",
              f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {measured_commit()}, on this host: "
              f"per system, the medians of {args.num_requests} requests {load}, after {NUM_WARM_UP_REQUESTS} "
              f"warm-up requests one at a time; prompts of about {args.prompt_tokens} tokens, {NUM_OUTPUT_TOKENS} "
              f"streamed output tokens; each ratio (`_vs_collocated`: to the plain vLLM engine; `_vs_serve_path`: "
              f"to splitserve in collocated mode, one engine on the same core, i.e. Serve's path without a "
              f"hand-over) is of medians, with a 95% bootstrap interval (`_95`); one whose interval crosses 1 is "
              f"not separable. first_chunk: prefill's answer -> decode's first chunk, as the router timed it (the "
              f"hand-over plus decode's first step). engine_step: the decode engine's own time between two decode "
              f"steps, from its step trace (no trace for the plain engine); second_token_step: the engine's step "
              f"that made each request's second token (from the step that finished its prompt or load to the "
              f"next).", ""]
    (args.out / "report.md").write_text("\n".join(header + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
