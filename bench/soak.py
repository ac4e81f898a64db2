"""Soak: mixed traffic with periodic faults for a bounded time; reports what was served, what failed and how, and
whether memory came back. Not part of the test suite (it runs for half an hour); see the README.

1. A standalone vLLM engine answers the exactness prompts once (greedy): the answers the app must give all along.
2. The app starts from serve_config.yaml (with `--backend`, if given) on a Ray head of its own; memory snapshot:
   each role's process tree RSS (replica, EngineCore, workers), the engines' KV usage, the KV store's contents.
3. For `--minutes`: Poisson arrivals at `--rate` of a mix: streams sized from a real trace (the Azure conversation
   trace vendored in bench/data/azure_traces), exactness requests (compared token for token), streams the client
   abandons, and bad requests. Every `--fault-every-s` one fault from the cycle (decode engine killed, prefill
   replica killed, decode replica killed, KV store killed where there is one) and the time until Serve has a new
   engine answering.
4. Arrivals stop; in-flight requests finish; the engines go idle; a second snapshot. The report (JSON and
   Markdown) and the per-request CSV go to `--out`.

    python -m bench.soak --minutes 30 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import csv
import json
import logging
import os
import platform
import random
import sys
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench import processes

processes.use_ray_token_auth()  # before Ray is imported: Ray reads RAY_AUTH_MODE once, at import

import httpx  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from bench import engines, replicas  # noqa: E402
from bench.load_generator import PromptBuilder, filler_document
from bench.traces import Scaling, poisson_trace, read_trace, scale_trace
from bench.workloads import DEFAULT_TOKEN_SCALING, TRACE_FILES, TRACES_DIR

logger = logging.getLogger("soak")

REQUEST_BOUND_S = 120  # a request that takes longer counts as hung
# What one arrival is, and how often: mostly trace-sized streams, the rest exercises exactness, leaving and bad input.
MIX = {"stream": 0.7, "exact": 0.1, "abandon": 0.1, "bad": 0.1}
EXACT_PROMPTS = {
    "capital": {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 24},
    "planets": {"messages": [{"role": "user", "content": "Name the three largest planets."}], "max_tokens": 32},
    "document": {"messages": [{"role": "user", "content": filler_document(first_year=1500)}], "max_tokens": 16},
}
BAD_BODIES = [
    {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -1},
    {"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"},
    {"messages": "not a list"},
    {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
    {"messages": [{"role": "user", "content": "hi"}], "kv_transfer_params": {"do_remote_prefill": True}},
]
FAULTS = ["decode_engine", "prefill_replica", "decode_replica", "kv_store"]


@dataclass
class Outcome:
    index: int
    kind: str  # stream, exact, abandon, bad
    sent_s: float  # after the soak's start
    outcome: str  # ok, wrong_output, overloaded, clean_error, stream_error_event, bad_request, unexpected_status,
    #               hung, transport_error, abandoned
    status: int | None
    seconds: float
    detail: str = ""


class Soak:
    def __init__(self, model: str, goldens: dict[str, list[int]], prompts: list[tuple[str, int]], seed: int):
        self._model = model
        self._goldens, self._prompts = goldens, prompts
        self._rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()

    async def one(self, client: httpx.AsyncClient, index: int) -> None:
        kind = self._rng.choices(list(MIX), weights=list(MIX.values()))[0]
        sent = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_BOUND_S):
                outcome, status, detail = await getattr(self, f"_{kind}")(client, index)
        except TimeoutError:
            outcome, status, detail = "hung", None, f"no end after {REQUEST_BOUND_S} s"
        except httpx.HTTPError as exc:
            outcome, status, detail = "transport_error", None, f"{type(exc).__name__}: {exc}"[:200]
        self.outcomes.append(Outcome(index=index, kind=kind, sent_s=round(sent - self.started, 3), outcome=outcome,
                                     status=status, seconds=round(time.monotonic() - sent, 3), detail=detail))

    async def _stream(self, client: httpx.AsyncClient, index: int) -> tuple[str, int | None, str]:
        prompt, max_tokens = self._prompts[index % len(self._prompts)]
        body = {"model": self._model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return _refused(response.status_code, response.headers, await response.aread())
            events = [line async for line in response.aiter_lines() if line.startswith("data: ")]
        if events[-1:] != ["data: [DONE]"]:
            return "unexpected_status", 200, "stream ended without [DONE]"
        if len(events) >= 2 and '"error"' in events[-2]:
            return "stream_error_event", 200, events[-2][:200]
        return "ok", 200, ""

    async def _exact(self, client: httpx.AsyncClient, index: int) -> tuple[str, int | None, str]:
        name = list(EXACT_PROMPTS)[index % len(EXACT_PROMPTS)]
        body = {"model": self._model, "temperature": 0, "return_token_ids": True, **EXACT_PROMPTS[name]}
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return _refused(response.status_code, response.headers, response.content)
        token_ids = response.json()["choices"][0]["token_ids"]
        if token_ids != self._goldens[name]:
            return "wrong_output", 200, f"{name}: {token_ids} != {self._goldens[name]}"
        return "ok", 200, name

    async def _abandon(self, client: httpx.AsyncClient, index: int) -> tuple[str, int | None, str]:
        body = {"model": self._model, "prompt": "Count from one to one hundred:", "max_tokens": 300,
                "temperature": 0, "stream": True, "ignore_eos": True}
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return _refused(response.status_code, response.headers, await response.aread())
            num_events = 0
            async for line in response.aiter_lines():
                num_events += line.startswith("data: ")
                if num_events == 3:
                    break  # the client leaves: closing the response drops the connection
        return "abandoned", 200, ""

    async def _bad(self, client: httpx.AsyncClient, index: int) -> tuple[str, int | None, str]:
        body = {"model": self._model, **BAD_BODIES[index % len(BAD_BODIES)]}
        response = await client.post("/v1/chat/completions", json=body)
        is_openai_error = 400 <= response.status_code < 500 and "error" in _json(response.content)
        return ("bad_request" if is_openai_error else "unexpected_status"), response.status_code, \
            response.text[:200]


def _json(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _refused(status: int, headers: httpx.Headers, content: bytes) -> tuple[str, int, str]:
    """A request the app did not serve: overload (429/503 with Retry-After), a clean 5xx error, or something else."""
    error = _json(content).get("error")
    if status in (429, 503) and "retry-after" in headers:
        return "overloaded", status, ""
    if status >= 500 and isinstance(error, dict) and error.get("message"):
        return "clean_error", status, error["message"][:200]
    return "unexpected_status", status, content[:200].decode(errors="replace")


async def drive(soak: Soak, *, base_url: str, headers: dict[str, str], rate_per_s: float, duration_s: float,
                seed: int) -> None:
    """Open-loop Poisson arrivals for `duration_s`, then waits for every request sent."""
    rng = random.Random(seed)
    tasks: set[asyncio.Task] = set()
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=REQUEST_BOUND_S + 10,
                                 limits=httpx.Limits(max_connections=200)) as client:
        index, next_at = 0, 0.0
        while next_at < duration_s:
            await asyncio.sleep(max(0.0, soak.started + next_at - time.monotonic()))
            task = asyncio.create_task(soak.one(client, index))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            index += 1
            next_at += rng.expovariate(rate_per_s)
        await asyncio.gather(*tasks)


def _tree_rss_mib(proc: psutil.Process) -> float:
    total = 0
    for member in [proc, *proc.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return round(total / 2**20, 1)


def memory_snapshot(backend: str) -> dict[str, Any]:
    """Each role's replica process tree RSS, the engines' KV usage, and the KV store's holdings."""
    snapshot: dict[str, Any] = {"at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for role in ("prefill", "decode"):
        counters = engines.counters(role)
        snapshot[role] = {"rss_mib": _tree_rss_mib(replicas.replica_process(role)),
                          "kv_cache_usage": counters.kv_cache_usage,
                          "num_running_requests": counters.num_running_requests,
                          "num_waiting_requests": counters.num_waiting_requests}
    snapshot["router"] = {"rss_mib": _tree_rss_mib(replicas.router_process())}
    if backend == "object_store":
        store = engines.store_counters()
        snapshot["kv_store"] = {"num_open": store.num_open, "num_bytes_in_use": store.num_bytes_in_use,
                                "num_expired": store.num_expired}
    return snapshot


def inject_faults(app: processes.ServedApp, backend: str, *, started: float, every_s: float, until: float,
                  log: list[dict[str, Any]], stop: threading.Event) -> None:
    """Every `every_s` one fault of the cycle, then the time until the role answers from a new engine. A killed
    KV store is restarted by Ray in place (the replica and its engine live on), so it has no recovery time."""
    import ray
    from ray import serve

    cycle = [fault for fault in FAULTS if fault != "kv_store" or backend == "object_store"]
    number = 0
    while not stop.wait(every_s) and time.monotonic() + 60 < until:
        fault = cycle[number % len(cycle)]
        role = "prefill" if fault in ("prefill_replica", "kv_store") else "decode"
        entry: dict[str, Any] = {"fault": fault, "at_s": round(time.monotonic() - started, 1)}
        try:
            if fault == "kv_store":
                prefill = serve.get_deployment_handle("PrefillServer", app_name=engines.APP_NAME)
                store_name = prefill.role.remote().result(timeout_s=30).kv_store
                ray.kill(ray.get_actor(store_name, namespace="serve"), no_restart=False)
            else:
                old_engine_id = replicas.engine_id(app.base_url, role)
                victim = (replicas.engine_core_process(role) if fault == "decode_engine"
                          else replicas.replica_process(role))
                fault_at = time.monotonic()
                victim.kill()
                replicas.wait_for_replacement(app.base_url, role, old_engine_id, timeout_s=300)
                entry["recovered_after_s"] = round(time.monotonic() - fault_at, 1)
        except Exception as exc:  # a fault that could not be injected, or a role that did not come back
            entry["error"] = f"{type(exc).__name__}: {exc}"[:300]
        logger.info("fault %d: %s", number + 1, entry)
        log.append(entry)
        number += 1


def goldens(config: Any, logs_dir: Path) -> dict[str, list[int]]:
    """The exactness prompts' greedy token ids from one standalone vLLM engine (no KV connector)."""
    with processes.vllm_api_server(config, log_path=logs_dir / "soak-reference-engine.log") as base_url:
        answers = {}
        for name, body in EXACT_PROMPTS.items():
            response = httpx.post(f"{base_url}/v1/chat/completions", timeout=300,
                                  json={"model": config.model.served_name, "temperature": 0,
                                        "return_token_ids": True, **body})
            response.raise_for_status()
            answers[name] = response.json()["choices"][0]["token_ids"]
        return answers


def trace_prompts(config: Any, num_prompts: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs sized like the Azure conversation trace, scaled to this host as `bench.compare`
    scales it."""
    source = read_trace(TRACES_DIR / TRACE_FILES["conv"])
    sizes = scale_trace(source, Scaling(**DEFAULT_TOKEN_SCALING["conv"].model_dump()))
    picks = poisson_trace(rate_per_s=1.0, num_requests=num_prompts, sizes_from=sizes, seed=seed)
    builder = PromptBuilder(config.model.path, filler_document())
    return [(builder.build(request.request_id, request.prompt_tokens), request.output_tokens) for request in picks]


def report_markdown(report: dict[str, Any]) -> str:
    lines = [f"# Soak: {report['minutes']} minutes, {report['backend']}, {report['rate_per_s']} requests/s",
             "", f"{report['started_at']} on {report['host']}; command: `{report['command']}`", "",
             f"- requests sent: {report['num_requests']}; served (ok): {report['outcomes'].get('ok', 0)}; "
             f"wrong outputs: {report['outcomes'].get('wrong_output', 0)}; hung: {report['outcomes'].get('hung', 0)}",
             f"- idle with no KV held after the run: {report['is_idle_at_end']}", "",
             "| kind | outcome | count |", "| --- | --- | --- |"]
    lines += [f"| {kind} | {outcome} | {count} |" for (kind, outcome), count in
              sorted(collections.Counter((o["kind"], o["outcome"]) for o in report["requests"]).items())]
    lines += ["", "| fault | at (s) | new engine answering after (s) | error |", "| --- | --- | --- | --- |"]
    lines += [f"| {f['fault']} | {f['at_s']} | {f.get('recovered_after_s', '')} | {f.get('error', '')} |"
              for f in report["faults"]]
    lines += ["", "| memory | start | end |", "| --- | --- | --- |"]
    start, end = report["memory_start"], report["memory_end"]
    for part in ("prefill", "decode", "router", "kv_store"):
        for key in start.get(part, {}):
            lines.append(f"| {part} {key} | {start[part][key]} | {end.get(part, {}).get(key, '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    from serve_app.config import AppConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=0.5, help="mean arrivals per second (Poisson)")
    parser.add_argument("--fault-every-s", type=float, default=240.0)
    parser.add_argument("--backend", choices=["auto", "nixl", "object_store"], default=None,
                        help="transfer.backend (default: serve_config.yaml's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=processes.PROJECT_ROOT / "bench" / "results" / "soak")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    args.out.mkdir(parents=True, exist_ok=True)
    logs_dir = processes.PROJECT_ROOT / ".cache" / "soak-logs"  # the app's logs: large, kept out of the results
    logs_dir.mkdir(parents=True, exist_ok=True)

    serve_config = yaml.safe_load((processes.PROJECT_ROOT / "serve_config.yaml").read_text())
    app_args = serve_config["applications"][0]["args"]
    if args.backend:
        app_args["transfer"]["backend"] = args.backend
    config = AppConfig.model_validate(app_args)
    duration_s = args.minutes * 60
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    logger.info("1. reference answers from a standalone engine")
    golden = goldens(config, logs_dir)
    prompts = trace_prompts(config, num_prompts=200, seed=args.seed)
    api_key = os.environ.get(config.router.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    logger.info("2. starting the app")
    with processes.serve_run(serve_config, name="soak", logs_dir=logs_dir) as app:
        import ray

        ray.init(address=app.ray_address, namespace="serve", logging_level="ERROR", log_to_driver=False)
        try:
            backend = httpx.get(f"{app.base_url}/health", timeout=15).json()["roles"]["prefill"]["transfer_backend"]
            warmup = Soak(config.model.served_name, golden, prompts, args.seed)
            asyncio.run(drive(warmup, base_url=app.base_url, headers=headers, rate_per_s=1.0, duration_s=10,
                              seed=args.seed + 1))
            memory_start = memory_snapshot(backend)
            logger.info("memory at start: %s", memory_start)

            logger.info("3. %.0f minutes of traffic at %.2f/s, a fault every %.0f s", args.minutes, args.rate,
                        args.fault_every_s)
            soak = Soak(config.model.served_name, golden, prompts, args.seed)
            faults: list[dict[str, Any]] = []
            stop = threading.Event()
            injector = threading.Thread(target=inject_faults, args=(app, backend), daemon=True, kwargs={
                "started": soak.started, "every_s": args.fault_every_s, "until": soak.started + duration_s,
                "log": faults, "stop": stop})
            progress = threading.Thread(target=_show_progress, args=(soak, duration_s, stop), daemon=True)
            injector.start()
            progress.start()
            asyncio.run(drive(soak, base_url=app.base_url, headers=headers, rate_per_s=args.rate,
                              duration_s=duration_s, seed=args.seed))
            stop.set()
            injector.join(360)

            logger.info("4. draining")
            # Up to a KV lease and then some: a transfer that a fault left unclaimed is held until its lease ends.
            idle = engines.wait_idle(is_object_store=backend == "object_store",
                                     timeout_s=config.transfer.kv_lease_s + 120, poll_s=2)
            is_idle = idle.is_idle
            if not is_idle:
                logger.warning("not idle after draining: %s", "; ".join(idle.busy))
            memory_end = memory_snapshot(backend)
            logger.info("memory at end: %s", memory_end)
        finally:
            ray.shutdown()

    outcomes = collections.Counter(outcome.outcome for outcome in soak.outcomes)
    report = {
        "minutes": args.minutes, "rate_per_s": args.rate, "fault_every_s": args.fault_every_s, "backend": backend,
        "started_at": started_at, "host": platform.node(),
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "num_requests": len(soak.outcomes), "outcomes": dict(outcomes),
        "outcomes_by_kind": {kind: dict(collections.Counter(o.outcome for o in soak.outcomes if o.kind == kind))
                             for kind in MIX},
        "faults": faults, "is_idle_at_end": is_idle, "memory_start": memory_start, "memory_end": memory_end,
        "requests": [asdict(outcome) for outcome in sorted(soak.outcomes, key=lambda outcome: outcome.index)],
    }
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    (args.out / "report.md").write_text(report_markdown(report))
    with open(args.out / "requests.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(Outcome.__dataclass_fields__))
        writer.writeheader()
        writer.writerows(report["requests"])
    print(report_markdown(report))


def _show_progress(soak: Soak, duration_s: float, stop: threading.Event) -> None:
    """A line a minute: how far the soak is, and what its requests have come to so far."""
    while not stop.wait(60):
        elapsed = time.monotonic() - soak.started
        counts = collections.Counter(outcome.outcome for outcome in soak.outcomes)
        logger.info("%4.0f/%.0f s: %d answered %s", elapsed, duration_s, len(soak.outcomes), dict(counts))


if __name__ == "__main__":
    main()
