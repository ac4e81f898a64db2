"""Soak: mixed traffic with periodic faults for a bounded time; reports what was served, what failed and how, and
whether memory came back. Not part of the test suite (it runs for half an hour); see the README.

1. A standalone vLLM engine answers, once and greedily, the exactness prompts and every prompt of the stream pool
   (`POOL_SIZE` prompts sized from a real trace, the Azure conversation trace vendored in bench/data/azure_traces,
   drawn with `--seed`): the answers the app must give all along.
2. The app starts from serve_config.yaml (with `--backend`, if given) on a Ray head of its own; memory snapshot:
   each role's process tree RSS (replica, EngineCore, workers), the engines' KV usage, the KV store's contents.
3. For `--minutes`: Poisson arrivals at `--rate` of a mix: greedy streams from the pool (each one's text, token ids
   and usage compared with the standalone engine's answer to that prompt; a difference is `wrong_tokens`),
   exactness chat requests (compared token for token), streams the client abandons (not compared), and bad
   requests. Every `--fault-every-s` one fault from the cycle (decode engine killed, prefill replica killed, decode
   replica killed, KV store killed where there is one) and the time until Serve has a new engine answering.
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
from typing import Any, NamedTuple

from bench import processes

processes.use_ray_token_auth()  # before Ray is imported: Ray reads RAY_AUTH_MODE once, at import

import httpx  # noqa: E402
import psutil  # noqa: E402
import yaml  # noqa: E402

from bench import replicas  # noqa: E402  (bench.engines, seconds to import, where used: the pure pieces load fast)
from bench.load_generator import PromptBuilder, filler_document
from bench.traces import Scaling, poisson_trace, read_trace, scale_trace
from bench.workloads import DEFAULT_TOKEN_SCALING, TRACE_FILES, TRACES_DIR

logger = logging.getLogger("soak")

REQUEST_BOUND_S = 120  # a request that takes longer counts as hung
# The streams' prompts: a fixed pool, each prompt's greedy answer computed once by the standalone engine. 64 prompts
# of the conversation trace's sizes (15.5k prompt and 2.4k output tokens in all for seed 0) took 57 s there, on one
# core of the 2-core host. A prompt sent again may hit the engines' prefix caches.
POOL_SIZE = 64
REFERENCE_CONCURRENCY = 16  # requests in flight at once while the standalone engine computes the pool's answers
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
    outcome: str  # ok, wrong_output (exact), wrong_tokens (stream), overloaded, clean_error, stream_error_event,
    #               bad_request, unexpected_status, hung, transport_error, abandoned
    status: int | None
    seconds: float
    detail: str = ""
    checked: bool = False  # a stream whose tokens were compared with its reference (all, or as far as it got)


class Answer(NamedTuple):
    """How one request ended, as a kind's sender sees it."""

    outcome: str
    status: int | None
    detail: str = ""
    checked: bool = False


@dataclass(frozen=True)
class StreamReply:
    """What one SSE stream of /v1/completions said, read from its `data: ` lines."""

    text: str
    token_ids: list[int] | None  # None: no chunk carried token ids
    prompt_tokens: int | None  # from the usage chunk; None: there was none
    completion_tokens: int | None
    is_done: bool  # its last event is `data: [DONE]`
    error: str | None  # the first error event, as sent


@dataclass(frozen=True)
class StreamReference:
    """One pool prompt and the standalone engine's greedy answer to it."""

    prompt: str
    max_tokens: int
    text: str
    token_ids: list[int]
    prompt_tokens: int


def stream_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    """A pool stream, as the soak sends it to the app and to the standalone engine alike."""
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True, "stream_options": {"include_usage": True}}


def parse_stream(events: list[str]) -> StreamReply:
    """The `data: ` lines of one stream: text and token ids concatenated, the usage chunk's counts, the first error
    event, and whether it ended with `[DONE]`."""
    text: list[str] = []
    token_ids: list[int] = []
    has_token_ids, usage, error = False, None, None
    for event in events:
        payload = _json(event[len("data: "):].encode()) if event != "data: [DONE]" else {}
        if "error" in payload:
            error = error or event[:200]
            continue
        for choice in payload.get("choices") or []:
            text.append(choice.get("text") or "")
            if choice.get("token_ids") is not None:
                has_token_ids = True
                token_ids.extend(choice["token_ids"])
        if isinstance(payload.get("usage"), dict):
            usage = payload["usage"]
    return StreamReply(text="".join(text), token_ids=token_ids if has_token_ids else None,
                       prompt_tokens=usage.get("prompt_tokens") if usage else None,
                       completion_tokens=usage.get("completion_tokens") if usage else None,
                       is_done=events[-1:] == ["data: [DONE]"], error=error)


def check_reply(reply: StreamReply, reference: StreamReference) -> str | None:
    """Where a complete stream differs from the reference (None: it does not): token ids, text, usage."""
    if reply.token_ids is None:
        return "no token ids in the stream"
    if reply.token_ids != reference.token_ids:
        return f"token ids {_first_difference(reply.token_ids, reference.token_ids)}"
    if reply.text != reference.text:
        return f"text {_first_difference(reply.text, reference.text)}"
    if (reply.prompt_tokens, reply.completion_tokens) != (reference.prompt_tokens, len(reference.token_ids)):
        return (f"usage {reply.prompt_tokens} prompt + {reply.completion_tokens} completion tokens, expected "
                f"{reference.prompt_tokens} + {len(reference.token_ids)}")
    return None


def check_partial_reply(reply: StreamReply, reference: StreamReference) -> str | None:
    """Where a stream that failed mid-way differs from the reference: what it sent must begin the reference."""
    token_ids = reply.token_ids or []
    if token_ids != reference.token_ids[:len(token_ids)]:
        return f"token ids {_first_difference(token_ids, reference.token_ids[:len(token_ids)])}"
    if not reference.text.startswith(reply.text):
        return f"text {_first_difference(reply.text, reference.text[:len(reply.text)])}"
    return None


def _first_difference(got: list[int] | str, expected: list[int] | str) -> str:
    at = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    return (f"differ at {at} of {len(expected)} (got {len(got)}): {got[at:at + 8]!r} != "
            f"{expected[at:at + 8]!r}")[:200]


def classify_stream(reply: StreamReply, reference: StreamReference, name: str) -> Answer:
    """A stream that got a 200, always checked: `wrong_tokens` whenever what it sent differs from the reference (a
    stream that ended early, without `[DONE]` or with an error event, must have sent a beginning of it); else
    `unexpected_status` without `[DONE]`, `stream_error_event` with an error event, or `ok`."""
    is_whole = reply.is_done and reply.error is None
    difference = check_reply(reply, reference) if is_whole else check_partial_reply(reply, reference)
    if difference is not None:
        ending = "" if is_whole else (" (ended without [DONE])" if not reply.is_done else " (then an error event)")
        return Answer("wrong_tokens", 200, f"{name}{ending}: {difference}"[:300], checked=True)
    if not reply.is_done:
        return Answer("unexpected_status", 200, f"{name}: stream ended without [DONE]", checked=True)
    if reply.error is not None:
        return Answer("stream_error_event", 200, f"{name}: {reply.error}", checked=True)
    return Answer("ok", 200, name, checked=True)


async def read_events(response: httpx.Response) -> list[str]:
    return [line async for line in response.aiter_lines() if line.startswith("data: ")]


class Soak:
    def __init__(self, model: str, goldens: dict[str, list[int]], pool: list[StreamReference], seed: int):
        self._model = model
        self._goldens, self._pool = goldens, pool
        self._rng = random.Random(seed)
        self.outcomes: list[Outcome] = []
        self.started = time.monotonic()

    async def one(self, client: httpx.AsyncClient, index: int) -> None:
        kind = self._rng.choices(list(MIX), weights=list(MIX.values()))[0]
        sent = time.monotonic()
        try:
            async with asyncio.timeout(REQUEST_BOUND_S):
                answer = await getattr(self, f"_{kind}")(client, index)
        except TimeoutError:
            answer = Answer("hung", None, f"no end after {REQUEST_BOUND_S} s")
        except httpx.HTTPError as exc:
            answer = Answer("transport_error", None, f"{type(exc).__name__}: {exc}"[:200])
        self.outcomes.append(Outcome(index=index, kind=kind, sent_s=round(sent - self.started, 3),
                                     outcome=answer.outcome, status=answer.status,
                                     seconds=round(time.monotonic() - sent, 3), detail=answer.detail,
                                     checked=answer.checked))

    async def _stream(self, client: httpx.AsyncClient, index: int) -> Answer:
        number = index % len(self._pool)
        reference = self._pool[number]
        body = stream_body(self._model, reference.prompt, reference.max_tokens)
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                return _refused(response.status_code, response.headers, await response.aread())
            events = await read_events(response)
        return classify_stream(parse_stream(events), reference, f"pool {number}")

    async def _exact(self, client: httpx.AsyncClient, index: int) -> Answer:
        name = list(EXACT_PROMPTS)[index % len(EXACT_PROMPTS)]
        body = {"model": self._model, "temperature": 0, "return_token_ids": True, **EXACT_PROMPTS[name]}
        response = await client.post("/v1/chat/completions", json=body)
        if response.status_code != 200:
            return _refused(response.status_code, response.headers, response.content)
        token_ids = response.json()["choices"][0]["token_ids"]
        if token_ids != self._goldens[name]:
            return Answer("wrong_output", 200, f"{name}: {token_ids} != {self._goldens[name]}")
        return Answer("ok", 200, name)

    async def _abandon(self, client: httpx.AsyncClient, index: int) -> Answer:
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
        return Answer("abandoned", 200)

    async def _bad(self, client: httpx.AsyncClient, index: int) -> Answer:
        body = {"model": self._model, **BAD_BODIES[index % len(BAD_BODIES)]}
        response = await client.post("/v1/chat/completions", json=body)
        is_openai_error = 400 <= response.status_code < 500 and "error" in _json(response.content)
        return Answer("bad_request" if is_openai_error else "unexpected_status", response.status_code,
                      response.text[:200])


def _json(content: bytes) -> dict[str, Any]:
    try:
        value = json.loads(content)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _refused(status: int, headers: httpx.Headers, content: bytes) -> Answer:
    """A request the app did not serve: overload (429/503 with Retry-After), a clean 5xx error, or something else."""
    error = _json(content).get("error")
    if status in (429, 503) and "retry-after" in headers:
        return Answer("overloaded", status)
    if status >= 500 and isinstance(error, dict) and error.get("message"):
        return Answer("clean_error", status, error["message"][:200])
    return Answer("unexpected_status", status, content[:200].decode(errors="replace"))


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
    from bench import engines

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

    from bench import engines

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


def goldens(config: Any, logs_dir: Path, pool: list[tuple[str, int]]) -> tuple[dict[str, list[int]],
                                                                          list[StreamReference]]:
    """From one standalone vLLM engine (no KV connector): the exactness prompts' greedy token ids, and each pool
    prompt's greedy stream, asked for with the very body the soak sends the app."""
    with processes.vllm_api_server(config, log_path=logs_dir / "soak-reference-engine.log") as base_url:
        answers = {}
        for name, body in EXACT_PROMPTS.items():
            response = httpx.post(f"{base_url}/v1/chat/completions", timeout=300,
                                  json={"model": config.model.served_name, "temperature": 0,
                                        "return_token_ids": True, **body})
            response.raise_for_status()
            answers[name] = response.json()["choices"][0]["token_ids"]
        started = time.monotonic()
        references = asyncio.run(_stream_references_from(base_url, config.model.served_name, pool))
        logger.info("the pool's %d reference streams took %.1f s", len(references), time.monotonic() - started)
        return answers, references


async def _stream_references_from(base_url: str, model: str, pool: list[tuple[str, int]]) -> list[StreamReference]:
    async with httpx.AsyncClient(base_url=base_url, timeout=300) as client:
        return await stream_references(client, model, pool)


async def stream_references(client: httpx.AsyncClient, model: str, pool: list[tuple[str, int]],
                            concurrency: int = REFERENCE_CONCURRENCY) -> list[StreamReference]:
    """Each (prompt, max_tokens)'s greedy stream from a standalone engine, checked to be whole: `[DONE]`, no error
    event, `max_tokens` token ids (`ignore_eos`), usage."""
    slots = asyncio.Semaphore(concurrency)

    async def one(prompt: str, max_tokens: int) -> StreamReference:
        async with slots, client.stream("POST", "/v1/completions", json=stream_body(model, prompt, max_tokens)) \
                as response:
            if response.status_code != 200:
                raise RuntimeError(f"the reference engine answered {response.status_code}: "
                                   f"{(await response.aread())[:200]!r}")
            reply = parse_stream(await read_events(response))
        if not reply.is_done or reply.error or reply.token_ids is None or reply.prompt_tokens is None \
                or len(reply.token_ids) != max_tokens or reply.completion_tokens != max_tokens:
            raise RuntimeError(f"the reference engine's stream is not whole: {reply}"[:500])
        return StreamReference(prompt=prompt, max_tokens=max_tokens, text=reply.text, token_ids=reply.token_ids,
                               prompt_tokens=reply.prompt_tokens)

    return list(await asyncio.gather(*(one(prompt, max_tokens) for prompt, max_tokens in pool)))


def trace_prompts(config: Any, num_prompts: int, seed: int) -> list[tuple[str, int]]:
    """(prompt, max_tokens) pairs sized like the Azure conversation trace, scaled to this host as `bench.compare`
    scales it: the stream pool, the same for the same seed."""
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
             f"- streams checked against the standalone engine's answers (pool of {report['pool_size']} prompts): "
             f"{report['num_streams_checked']}; wrong tokens: {report['outcomes'].get('wrong_tokens', 0)}; "
             f"abandoned on purpose (not checked): {report['outcomes'].get('abandoned', 0)}",
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
    golden, pool = goldens(config, logs_dir, trace_prompts(config, num_prompts=POOL_SIZE, seed=args.seed))
    api_key = os.environ.get(config.router.api_key_env)
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    logger.info("2. starting the app")
    with processes.serve_run(serve_config, name="soak", logs_dir=logs_dir) as app:
        import ray

        ray.init(address=app.ray_address, namespace="serve", logging_level="ERROR", log_to_driver=False)
        from bench import engines

        try:
            backend = httpx.get(f"{app.base_url}/health", timeout=15).json()["roles"]["prefill"]["transfer_backend"]
            warmup = Soak(config.model.served_name, golden, pool, args.seed)
            asyncio.run(drive(warmup, base_url=app.base_url, headers=headers, rate_per_s=1.0, duration_s=10,
                              seed=args.seed + 1))
            logger.info("warm-up: %s", dict(collections.Counter(outcome.outcome for outcome in warmup.outcomes)))
            memory_start = memory_snapshot(backend)
            logger.info("memory at start: %s", memory_start)

            logger.info("3. %.0f minutes of traffic at %.2f/s, a fault every %.0f s", args.minutes, args.rate,
                        args.fault_every_s)
            soak = Soak(config.model.served_name, golden, pool, args.seed)
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
            engines.disconnect_driver()

    outcomes = collections.Counter(outcome.outcome for outcome in soak.outcomes)
    report = {
        "minutes": args.minutes, "rate_per_s": args.rate, "fault_every_s": args.fault_every_s, "backend": backend,
        "started_at": started_at, "host": platform.node(),
        "command": "python -m bench.soak " + " ".join(argv if argv is not None else sys.argv[1:]),
        "num_requests": len(soak.outcomes), "outcomes": dict(outcomes),
        "pool_size": len(pool), "num_streams_checked": sum(outcome.checked for outcome in soak.outcomes),
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
