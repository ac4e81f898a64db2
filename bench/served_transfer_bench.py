"""What the KV hand-over costs a request in the served app: Splitwise's two figures, measured here.

For prompts of about 1,000 tokens, one request at a time (no queueing), streamed through the openai client:
- transfer share of E2E: the transfer time a request waits for, from the engines' own connector stats (prefill's
  step blocked on sending + decode waiting for and loading the KV), over its end-to-end latency;
- TTFT and second-token latency against a collocated vLLM engine with the same settings, measured in the same run.

Systems, one after another on this host: `collocated` (one vLLM engine, no disaggregation: the baseline),
`object_store` (layer-by-layer overlap), `object_store_no_overlap` (KV handed over after the forward pass) and
`nixl`. In splitserve the router streams decode's tokens, so the transfer lands before the first token: expect
it in TTFT, not between the first and the second token.

    python -m bench.served_transfer_bench [--num-requests 8] [--prompt-tokens 1000] [--systems ...] [--out DIR]

Writes served_transfer_requests.csv (every request) and served_transfer.{csv,md} (medians per system).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import yaml
from tqdm import tqdm

from tests.e2e import processes
from tests.e2e.processes import PROJECT_ROOT, VENV_BIN

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
STARTUP_TIMEOUT_S = 420


def _serve_config(transfer: dict[str, Any], http_port: int, workdir: Path) -> tuple[Path, Any]:
    from serve_app.config import AppConfig

    config = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())
    config["http_options"]["port"] = http_port
    config["applications"][0]["args"]["transfer"].update(transfer)
    path = workdir / "serve_config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, AppConfig.model_validate(config["applications"][0]["args"])


def _prompts(model_path: str, num_tokens: int, count: int) -> list[str]:
    """Prompts of about `num_tokens` tokens, each with its own first words, so no prefix cache can help."""
    from transformers import AutoTokenizer

    from tests.e2e.workload import long_document

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    body = tokenizer.encode(long_document() * (1 + num_tokens // 1000), add_special_tokens=False)
    return [f"Record {index}. " + tokenizer.decode(body[:num_tokens - 6]) for index in range(count)]


def _timed_request(base_url: str, model: str, prompt: str) -> dict[str, float]:
    import openai

    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0, timeout=300)
    started = time.perf_counter()
    token_times, prompt_tokens = [], 0
    stream = client.completions.create(model=model, prompt=prompt, max_tokens=NUM_OUTPUT_TOKENS, temperature=0,
                                       stream=True, stream_options={"include_usage": True},
                                       extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
        if chunk.choices and chunk.choices[0].text:
            token_times.append(time.perf_counter())
    finished = time.perf_counter()
    return {"prompt_tokens": prompt_tokens, "ttft_s": token_times[0] - started,
            "second_token_s": token_times[1] - token_times[0], "e2e_s": finished - started}


def _run_collocated(config_args: Any, prompts: list[str], workdir: Path, logs: Path) -> list[dict[str, float]]:
    from deployments.engine import vllm_cli_args

    port = processes.free_port()
    log_path = logs / "served-bench-collocated.log"
    server = processes.start(
        [str(VENV_BIN / "python"), "-m", "vllm.entrypoints.openai.api_server",
         *vllm_cli_args(config_args.model, config_args.prefill, None), "--host", "127.0.0.1", "--port", str(port)],
        log_path, env={"VLLM_CPU_OMP_THREADS_BIND": config_args.prefill.cpu_binding_for(0),
                       "VLLM_CPU_KVCACHE_SPACE": str(config_args.prefill.kv_cache_gib), "HF_HUB_OFFLINE": "1"})
    try:
        processes.wait_until(lambda: httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200,
                             timeout_s=STARTUP_TIMEOUT_S, what="collocated vLLM", proc=server, log_path=log_path)
        return [_timed_request(f"http://127.0.0.1:{port}", config_args.model.served_name, prompt)
                for prompt in prompts]
    finally:
        processes.stop(server)


def _run_splitserve(name: str, transfer: dict[str, Any], prompts: list[str], workdir: Path,
                    logs: Path) -> list[dict[str, float]]:
    import ray

    from tests.e2e import engines

    http_port, ray_port = processes.free_port(), processes.free_port()
    config_path, config_args = _serve_config(transfer, http_port, workdir)
    ray_log, serve_log = logs / f"served-bench-{name}-ray.log", logs / f"served-bench-{name}-serve.log"
    environment = {"HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    head = processes.start([str(VENV_BIN / "ray"), "start", "--head", "--block", f"--port={ray_port}",
                            "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
                            f"--temp-dir={workdir / 'ray'}"], ray_log, env=environment)
    serve_proc, children = None, []
    base_url = f"http://127.0.0.1:{http_port}"
    try:
        processes.wait_until(lambda: (workdir / "ray" / "session_latest").exists(), timeout_s=120,
                             what="ray head", proc=head, log_path=ray_log)
        serve_proc = processes.start([str(VENV_BIN / "serve"), "run", str(config_path), "--address",
                                      f"127.0.0.1:{ray_port}"], serve_log, env=environment)
        processes.wait_until(lambda: httpx.get(f"{base_url}/health", timeout=15).json().get("status") == "ok",
                             timeout_s=STARTUP_TIMEOUT_S, what=f"splitserve ({name})", proc=serve_proc,
                             log_path=serve_log, interval_s=3)
        children = processes.descendants(head)
        ray.init(address=f"127.0.0.1:{ray_port}", namespace="serve", logging_level="ERROR", log_to_driver=False)
        rows = []
        for prompt in prompts:
            before = engines.counters("prefill"), engines.counters("decode")
            row = _timed_request(base_url, config_args.model.served_name, prompt)
            prefill = engines.delta(engines.counters("prefill"), before[0])
            decode = engines.delta(engines.counters("decode"), before[1])
            row["transfer_s"] = prefill["kv_send_wait_seconds"] + decode["kv_load_seconds"]
            row["num_kv_bytes"] = decode["num_kv_bytes_transferred"]
            row["num_prompt_tokens_recomputed"] = decode["num_prompt_tokens_computed"]
            rows.append(row)
        return rows
    finally:
        ray.shutdown()
        if serve_proc is not None:
            processes.stop(serve_proc, first_signal=signal.SIGINT, grace_s=90)
        processes.stop(head, first_signal=signal.SIGTERM, grace_s=60, known_children=children)


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
            if baseline:
                entry[f"{key[:-2]}_vs_collocated"] = round(median(system, key) / median(baseline, key), 3)
        if "transfer_s" in rows[0]:
            entry["transfer_ms"] = round(median(system, "transfer_s") * 1e3, 1)
            entry["transfer_share_of_e2e"] = round(
                statistics.median(row["transfer_s"] / row["e2e_s"] for row in rows), 4)
            entry["kv_mb"] = round(median(system, "num_kv_bytes") / 1e6, 1)
        summary.append(entry)
    return summary


def _measure_one_system(system: str, prompts: list[str], rows_path: Path) -> None:
    """One system, in a process of its own: Serve's client state does not survive moving between clusters."""
    _, config_args = _serve_config({}, 0, Path(tempfile.mkdtemp(prefix="ssb-")))
    logs = PROJECT_ROOT / ".cache" / "bench-logs"
    logs.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix="ssb-"))  # short: Ray's socket paths must fit 107 bytes
    if SYSTEMS[system] is None:
        rows = _run_collocated(config_args, prompts, workdir, logs)
    else:
        rows = _run_splitserve(system, SYSTEMS[system], prompts, workdir, logs)
    rows_path.write_text(json.dumps(rows[NUM_WARM_UP_REQUESTS:]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-requests", type=int, default=8)
    parser.add_argument("--prompt-tokens", type=int, default=1000)
    parser.add_argument("--systems", nargs="+", choices=list(SYSTEMS), default=list(SYSTEMS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--one-system", choices=list(SYSTEMS), help=argparse.SUPPRESS)
    parser.add_argument("--prompts-json", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--rows-json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one_system:
        _measure_one_system(args.one_system, json.loads(args.prompts_json.read_text()), args.rows_json)
        return

    _, config_args = _serve_config({}, 0, Path(tempfile.mkdtemp(prefix="ssb-")))
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
    with open(args.out / "served_transfer_requests.csv", "w", newline="") as handle:
        fields = ["system", "prompt_tokens", "ttft_s", "second_token_s", "e2e_s", "transfer_s", "num_kv_bytes",
                  "num_prompt_tokens_recomputed"]
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        for system, rows in rows_by_system.items():
            writer.writerows({"system": system, **row} for row in rows)
    summary = _summary(rows_by_system)
    fields = list(dict.fromkeys(key for entry in summary for key in entry))
    with open(args.out / "served_transfer.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(summary)
    table = ["| " + " | ".join(fields) + " |", "|" + " --- |" * len(fields)]
    table += ["| " + " | ".join(str(entry.get(field, "")) for field in fields) + " |" for entry in summary]
    (args.out / "served_transfer.md").write_text("\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
