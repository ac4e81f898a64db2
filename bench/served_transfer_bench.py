"""What the KV hand-over costs a request in the served app: Splitwise's two figures, measured here.

For prompts of about 1,000 tokens, one request at a time (no queueing), streamed through the openai client:
- transfer share of E2E: the transfer time a request waits for, from the engines' own connector stats (prefill's
  step blocked on sending + decode waiting for and loading the KV), over its end-to-end latency;
- TTFT and second-token latency against a collocated vLLM engine with the same settings, measured in the same run.

Systems, one after another on this host: `collocated` (one vLLM engine, no disaggregation: the baseline),
`object_store` (layer-by-layer overlap), `object_store_no_overlap` (KV handed over after the forward pass) and
`nixl`. In splitserve the router streams decode's tokens, so the transfer lands before the first token: expect
it in TTFT, not between the first and the second token.

    python -m bench.served_transfer_bench [--num-requests 8] [--prompt-tokens 1000] [--systems ...]
                                          [--out bench/results/served_transfer]

Writes, under --out: requests.csv (every measured request), summary.csv (medians per system) and report.md (the
command, then the summary as a table).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

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

SYSTEMS = {
    "collocated": None,
    "object_store": {"backend": "object_store", "is_layer_by_layer": True},
    "object_store_no_overlap": {"backend": "object_store", "is_layer_by_layer": False},
    "nixl": {"backend": "nixl"},
}
NUM_WARM_UP_REQUESTS = 2
NUM_OUTPUT_TOKENS = 16


def _serve_config(transfer: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    # Every request takes the split path, the one whose transfer this measures (the default policy would run
    # one-at-a-time prompts on the idle decode engine).
    config = serve_config(transfer=transfer, scheduling={"policy": "always_split"})
    return config, app_config(config)


def _prompts(model_path: str, num_tokens: int, count: int) -> list[str]:
    """Prompts of about `num_tokens` tokens, each with its own first words, so no prefix cache can help."""
    builder = PromptBuilder(model_path, filler_document())
    return [builder.build(index, num_tokens) for index in range(count)]


def _timed_request(base_url: str, model: str, prompt: str) -> dict[str, float]:
    request = TraceRequest(request_id=0, arrival_s=0.0, prompt_tokens=1, output_tokens=NUM_OUTPUT_TOKENS)
    (record,) = asyncio.run(run_trace(base_url=base_url, model=model, requests=[request], prompts=[prompt],
                                      is_progress_shown=False))
    if not record.is_ok:
        raise RuntimeError(f"a benchmark request failed: {record.error}")
    return {"prompt_tokens": record.prompt_tokens, "ttft_s": record.ttft_s, "second_token_s": record.tbt_s[0],
            "e2e_s": record.e2e_s}


def _run_collocated(config_args: Any, prompts: list[str], logs: Path) -> list[dict[str, float]]:
    with processes.vllm_api_server(config_args, log_path=logs / "served-bench-collocated.log") as base_url:
        return [_timed_request(base_url, config_args.model.served_name, prompt) for prompt in prompts]


def _run_splitserve(name: str, transfer: dict[str, Any], prompts: list[str], logs: Path) -> list[dict[str, float]]:
    import ray

    from bench import engines

    serve_config, config_args = _serve_config(transfer)
    with processes.serve_run(serve_config, name=f"served-bench-{name}", logs_dir=logs) as served:
        ray.init(address=served.ray_address, namespace="serve", logging_level="ERROR", log_to_driver=False)
        try:
            rows = []
            for prompt in prompts:
                before = engines.counters("prefill"), engines.counters("decode")
                row = _timed_request(served.base_url, config_args.model.served_name, prompt)
                prefill = engines.delta(engines.counters("prefill"), before[0])
                decode = engines.delta(engines.counters("decode"), before[1])
                row["transfer_s"] = prefill["kv_send_wait_seconds"] + decode["kv_load_seconds"]
                row["num_kv_bytes"] = decode["num_kv_bytes_transferred"]
                row["num_prompt_tokens_recomputed"] = decode["num_prompt_tokens_computed"]
                rows.append(row)
            return rows
        finally:
            ray.shutdown()


def _summary(rows_by_system: dict[str, list[dict[str, float]]]) -> list[dict[str, Any]]:
    def median(system: str, key: str) -> float:
        return statistics.median(row[key] for row in rows_by_system[system])

    baseline = "collocated" if "collocated" in rows_by_system else None
    summary = []
    for system, rows in rows_by_system.items():
        entry: dict[str, Any] = {"system": system, "num_requests": len(rows),
                                 "prompt_tokens": int(median(system, "prompt_tokens"))}
        for key in ("ttft_s", "second_token_s", "e2e_s"):
            entry[f"{key[:-2]}_ms"] = round(median(system, key) * 1e3, 1)
            if baseline:  # the ratio of medians, with a 95% bootstrap interval over the requests of each side
                ratio = ratio_interval([row[key] for row in rows], [row[key] for row in rows_by_system[baseline]])
                entry[f"{key[:-2]}_vs_collocated"] = round(ratio.ratio, 3)
                entry[f"{key[:-2]}_vs_collocated_95"] = f"{ratio.low:.3f}-{ratio.high:.3f}"
        if "transfer_s" in rows[0]:
            entry["transfer_ms"] = round(median(system, "transfer_s") * 1e3, 1)
            entry["transfer_share_of_e2e"] = round(
                statistics.median(row["transfer_s"] / row["e2e_s"] for row in rows), 4)
            entry["kv_mb"] = round(median(system, "num_kv_bytes") / 1e6, 1)
        summary.append(entry)
    return summary


def _measure_one_system(system: str, prompts: list[str], rows_path: Path) -> None:
    """One system, in a process of its own: Serve's client state does not survive moving between clusters."""
    logs = PROJECT_ROOT / ".cache" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    if SYSTEMS[system] is None:
        rows = _run_collocated(_serve_config({})[1], prompts, logs)
    else:
        rows = _run_splitserve(system, SYSTEMS[system], prompts, logs)
    rows_path.write_text(json.dumps(rows[NUM_WARM_UP_REQUESTS:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "served_transfer")
    parser.add_argument("--one-system", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--prompts-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_system:
        _measure_one_system(args.one_system, json.loads(args.prompts_json.read_text()), args.rows_json)
        return

    _, config_args = _serve_config({})
    per_system = NUM_WARM_UP_REQUESTS + args.num_requests
    prompts = _prompts(config_args.model.path, args.prompt_tokens, len(args.systems) * per_system)
    scratch = Path(tempfile.mkdtemp(prefix="ssb-"))
    rows_by_system: dict[str, list[dict[str, float]]] = {}
    for index, system in enumerate(tqdm(args.systems, desc="served transfer bench", unit="system")):
        prompts_path, rows_path = scratch / f"{system}-prompts.json", scratch / f"{system}-rows.json"
        # Fresh prompts for every system: no prefix cache anywhere can help.
        prompts_path.write_text(json.dumps(prompts[index * per_system:(index + 1) * per_system]))
        subprocess.run([sys.executable, "-m", "bench.served_transfer_bench", "--one-system", system,
                        "--prompts-json", str(prompts_path), "--rows-json", str(rows_path)],
                       cwd=PROJECT_ROOT, check=True)
        rows_by_system[system] = json.loads(rows_path.read_text())

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "requests.csv", "w", newline="") as handle:
        fields = ["system", "prompt_tokens", "ttft_s", "second_token_s", "e2e_s", "transfer_s", "num_kv_bytes",
                  "num_prompt_tokens_recomputed"]
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        for system, rows in rows_by_system.items():
            writer.writerows({"system": system, **row} for row in rows)
    summary = _summary(rows_by_system)
    fields = list(dict.fromkeys(key for entry in summary for key in entry))
    with open(args.out / "summary.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(summary)
    table = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    table += ["| " + " | ".join(str(entry.get(field, "")) for field in fields) + " |" for entry in summary]
    command = " ".join(["python -m bench.served_transfer_bench", *sys.argv[1:]])
    header = ["# What the KV transfer costs a request", "",
              f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {measured_commit()}, on this host: "
              f"per system, the medians of "
              f"{args.num_requests} requests sent one at a time (after {NUM_WARM_UP_REQUESTS} warm-up requests), "
              f"prompts of about {args.prompt_tokens} tokens, {NUM_OUTPUT_TOKENS} streamed output tokens; each "
              f"ratio to collocated is of medians, with a 95% bootstrap interval (`_95`); one whose interval "
              f"crosses 1 is not separable.", ""]
    (args.out / "report.md").write_text("\n".join(header + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
