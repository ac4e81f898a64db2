"""Open-loop load: send a trace's requests at their scheduled arrival times, streamed, and time every token from
the moment each request was due.

1. `PromptBuilder` makes a prompt of exactly the requested number of tokens with the served model's tokenizer;
   each prompt starts with its own request number, so no prefix cache serves one request from another's KV.
2. `run_trace` is open loop: one dispatcher sleeps until each request's arrival (in short steps: the kernel lets a
   long sleep end late) and starts it there, however many are still in flight. A request's clock starts at its
   **scheduled arrival**: TTFT and E2E are timed from it, so a late send counts against the latency a user would have seen (the send-time view is kept as `ttft_send_s` and
   `e2e_send_s`). Each record keeps its send lag; `GeneratorStats` keeps the generator's own CPU time.
3. Requests go through the official `openai` client with streaming. Servers may put several tokens in one chunk
   (Ray Serve LLM sends a chunk every 50 ms): the token ids each chunk carries (vLLM's `return_token_ids`) say how
   many, and a chunk of k tokens that came g seconds after the previous one counts as k gaps of g/k, so TBT means
   the same for every server. It stops sending at `max_duration_s` and gives up on a request `request_timeout_s`
   after it was due: a run is bounded in count and time.
4. `run_closed_loop` instead keeps a fixed number of requests in flight (the anchor and uncontended cells); a
   request is due the moment its user is free.
5. `CellRunner` runs cells in a process of its own, in a session of its own, at a raised scheduling priority (its
   own and its session's, see `_raise_priority`) where the OS allows it: on a small host the engines take every
   core, and a generator that waits for CPU sends late (seconds, measured on two cores). A real client runs on
   another machine; this is the nearest a one-host benchmark gets. Each cell also records why a send could be
   late: the loop's stalls (`LoopWatch`) beside its thread's run-queue wait (Linux's schedstat).
6. Where the server says how the time to first token split (splitserve's `Server-Timing` header: prefill, and
   decode's first chunk), that is recorded too, for the per-replica timeline.
7. Only loopback targets are accepted: a benchmark must not load someone else's server by mistake.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

import numpy as np
from tqdm import tqdm

from bench.traces import TraceRequest

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
# The generator's own process asks for this nice value (lower runs first); without the permission it stays at 0,
# and run.json says so.
GENERATOR_NICE = -10
# Linux lets a poll/epoll wait (asyncio's sleep) end late by 0.1% of its timeout, up to 100 ms (the kernel's
# `select_estimate_accuracy`; 0.5% for a niced process): measured here, a 30 s sleep ended 30.4 ms late, and in the
# code trace, whose arrivals have idle gaps of minutes at low rates, the request after each gap left 100 ms late.
# The dispatcher never sleeps longer than this at once, so the kernel's slack stays under half a millisecond.
MAX_SLEEP_S = 0.5
AUTOGROUP = Path("/proc/self/autogroup")
# A cell whose p99 send lag is above this is flagged: its latencies are not what the schedule asked for.
MAX_SEND_LAG_P99_S = 0.050
# The loop watch wakes this often; a wake-up later than LOOP_STALL_S counts as a stall of the generator's event loop.
LOOP_WATCH_PERIOD_S = 0.010
LOOP_STALL_S = 0.010


@dataclass
class RequestRecord:
    request_id: int
    arrival_s: float  # scheduled, relative to the cell's start
    prompt_tokens: int  # as the server counted them (0 if it never said)
    output_tokens: int
    start_s: float | None = None  # when it was actually sent, relative to the cell's start
    ttft_s: float | None = None  # first token, from the scheduled arrival
    tbt_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None  # last token, from the scheduled arrival
    error: str | None = None
    # From the server's Server-Timing header, where it sends one (splitserve does).
    prefill_s: float | None = None
    prefill_engine_id: str = ""
    first_chunk_s: float | None = None
    path: str = ""  # the scheduler's path for it (split, decode_local, prefill_local); empty where none is said
    predicted_ttft_s: float | None = None  # the scheduler's prediction, from its decision to the first token
    workload: str = ""  # which cell of a comparison it belongs to, set by the runner
    repeat: int = 0  # which run of the cell (`--repeats`)

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.ttft_s is not None

    @property
    def send_lag_s(self) -> float | None:
        return None if self.start_s is None else max(0.0, self.start_s - self.arrival_s)

    @property
    def ttft_send_s(self) -> float | None:
        """TTFT from the actual send: what a server-side view reports."""
        return None if self.ttft_s is None or self.send_lag_s is None else self.ttft_s - self.send_lag_s

    @property
    def e2e_send_s(self) -> float | None:
        return None if self.e2e_s is None or self.send_lag_s is None else self.e2e_s - self.send_lag_s

    @property
    def tpot_s(self) -> float | None:
        """Splitwise's TBT of a request: its mean time between tokens."""
        return float(np.mean(self.tbt_s)) if self.tbt_s else None


@dataclass(frozen=True)
class GeneratorStats:
    """What the generator itself cost while it ran a cell, to tell a late client from a slow server."""

    wall_s: float
    cpu_s: float  # the generator process's CPU time over the cell
    nice: int  # the generator process's nice value (GENERATOR_NICE if the OS allowed it)
    # CPU time the hypervisor took from this virtual machine over the cell, all cores together (Linux's `steal`;
    # None elsewhere). A paused virtual CPU delays whatever it was running, the generator included, at any priority.
    steal_s: float | None = None
    autogroup_nice: int | None = None  # its session's scheduling group's nice, where Linux's autogroup is on
    # Why a send was late, where Linux says (schedstat): the event-loop thread's time runnable but waiting for a
    # core, against the loop's own stalls (a timer wake-up that came late, whatever held it). A stall with little
    # run-queue wait is not CPU contention (e.g. a kernel path on that core that would not yield).
    run_queue_wait_s: float | None = None
    loop_stall_s: float | None = None  # the sum of the stalls, each beyond LOOP_STALL_S
    loop_stall_max_ms: float | None = None


def send_lag_summary(records: list[RequestRecord]) -> dict[str, float]:
    lags = [record.send_lag_s for record in records if record.send_lag_s is not None]
    if not lags:
        return {"send_lag_p50_ms": 0.0, "send_lag_p99_ms": 0.0, "send_lag_max_ms": 0.0}
    return {"send_lag_p50_ms": round(float(np.percentile(lags, 50)) * 1e3, 2),
            "send_lag_p99_ms": round(float(np.percentile(lags, 99)) * 1e3, 2),
            "send_lag_max_ms": round(max(lags) * 1e3, 2)}


def filler_document(first_year: int = 1900) -> str:
    """A deterministic text of about 1,200 tokens (numbered facts about made-up towns), to build prompts from."""
    cities = ["Arden", "Belmont", "Corvin", "Dunmore", "Elston", "Farrow", "Glenby", "Harlow", "Ivel", "Jarrow"]
    lines = []
    for index in range(34):
        city = cities[index % len(cities)]
        lines.append(
            f"Fact {index + 1}: the town of {city} had {1000 + 37 * index} residents in year {first_year + index}, "
            f"and its river carried {index % 7 + 2} boats."
        )
    return "Here is a record of towns.\n" + "\n".join(lines) + "\nSummary: the town with the most boats was"


def read_server_timing(header: str | None, record: RequestRecord) -> None:
    """`prefill;dur=812.3;desc="prefill-0-ab12", first_chunk;dur=95.1, path;desc="split", predicted_ttft;dur=880`
    (W3C Server-Timing, durations in ms)."""
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        duration = re.search(r"dur=([0-9.]+)", params)
        description = re.search(r'desc="([^"]*)"', params)
        if name == "prefill" and duration:
            record.prefill_s = float(duration.group(1)) / 1e3
            record.prefill_engine_id = description.group(1) if description else ""
        elif name == "first_chunk" and duration:
            record.first_chunk_s = float(duration.group(1)) / 1e3
        elif name == "path" and description:
            record.path = description.group(1)
        elif name == "predicted_ttft" and duration:
            record.predicted_ttft_s = float(duration.group(1)) / 1e3


class PromptBuilder:
    def __init__(self, tokenizer_path: str, filler: str):
        from transformers import AutoTokenizer

        self._tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self._filler = self._tokenizer.encode(filler, add_special_tokens=False)

    def build(self, request_id: int, num_tokens: int) -> str:
        head = self._tokenizer.encode(f"Request {request_id}.", add_special_tokens=False)
        body = (self._filler * (1 + num_tokens // max(1, len(self._filler))))[:max(0, num_tokens - len(head))]
        return self._tokenizer.decode(head + body)


def check_loopback(base_url: str) -> None:
    host = urlparse(base_url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"the load generator only targets this host (loopback), not {host!r}")


async def _one(client, model: str, request: TraceRequest, prompt: str, due_at: float, cell_started_at: float,
               timeout_s: float) -> RequestRecord:
    """One streamed request, due at `due_at` (perf_counter): every latency is timed from then."""
    record = RequestRecord(request_id=request.request_id, arrival_s=request.arrival_s, prompt_tokens=0,
                           output_tokens=0)
    record.start_s = time.perf_counter() - cell_started_at
    last = None
    try:
        # The budget runs from when the request was due: a request that left late has less of it.
        async with asyncio.timeout(max(0.0, due_at + timeout_s - time.perf_counter())):
            raw = await client.completions.with_raw_response.create(
                model=model, prompt=prompt, max_tokens=request.output_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True, "return_token_ids": True})
            read_server_timing(raw.headers.get("server-timing"), record)
            async for chunk in raw.parse():
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    record.output_tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    now = time.perf_counter()
                    num_tokens = len(getattr(chunk.choices[0], "token_ids", None) or ()) or 1
                    if last is None:
                        record.ttft_s = now - due_at
                    else:
                        record.tbt_s += [(now - last) / num_tokens] * num_tokens
                    last = now
        record.e2e_s = time.perf_counter() - due_at
    except TimeoutError:
        record.error = f"timeout after {timeout_s:.0f} s"
    except Exception as exc:  # the server's error, as the client saw it
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    return record


async def sleep_until(due_at: float, *, clock=time.perf_counter, sleep=asyncio.sleep) -> None:
    """Sleeps until `due_at` (on `clock`) in steps of at most MAX_SLEEP_S, each of which the kernel ends on time."""
    while (remaining := due_at - clock()) > 0:
        await sleep(min(remaining, MAX_SLEEP_S))


def _client(base_url: str, request_timeout_s: float):
    import openai

    check_loopback(base_url)
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("SPLITSERVE_API_KEY", "unused"),
                              max_retries=0, timeout=request_timeout_s)


class LoopWatch:
    """A task that wakes every LOOP_WATCH_PERIOD_S and keeps how late each wake-up came: the event loop's stalls,
    which delay every send due meanwhile."""

    def __init__(self) -> None:
        self.stall_s = 0.0
        self.max_stall_s = 0.0
        self._task: asyncio.Task | None = None

    async def _watch(self) -> None:
        while True:
            due_at = time.perf_counter() + LOOP_WATCH_PERIOD_S
            await asyncio.sleep(LOOP_WATCH_PERIOD_S)
            late_s = time.perf_counter() - due_at
            if late_s > LOOP_STALL_S:
                self.stall_s += late_s
                self.max_stall_s = max(self.max_stall_s, late_s)

    def __enter__(self) -> LoopWatch:
        self._task = asyncio.get_running_loop().create_task(self._watch())
        return self

    def __exit__(self, *_: object) -> None:
        if self._task is not None:
            self._task.cancel()


def run_queue_wait_s() -> float | None:
    """The calling thread's time spent runnable but not running, since it started (Linux's schedstat)."""
    try:
        return int(Path("/proc/thread-self/schedstat").read_text().split()[1]) / 1e9
    except (OSError, IndexError, ValueError):
        return None


async def run_trace(*, base_url: str, model: str, requests: list[TraceRequest], prompts: list[str],
                    max_duration_s: float = 600.0, request_timeout_s: float = 300.0,
                    description: str = "requests", is_progress_shown: bool = True) -> list[RequestRecord]:
    client = _client(base_url, request_timeout_s)
    due = sorted(((request, prompt) for request, prompt in zip(requests, prompts, strict=True)
                  if request.arrival_s <= max_duration_s), key=lambda pair: pair[0].arrival_s)
    tasks: list[asyncio.Task] = []
    with tqdm(total=len(due), desc=description, unit="req", disable=not is_progress_shown) as progress:
        started_at = time.perf_counter()
        # One dispatcher, asleep until the next arrival: a request's start never waits on an earlier one.
        for request, prompt in due:
            due_at = started_at + request.arrival_s
            await sleep_until(due_at)
            task = asyncio.create_task(_one(client, model, request, prompt, due_at, started_at, request_timeout_s))
            task.add_done_callback(lambda _: progress.update())
            tasks.append(task)
        records = list(await asyncio.gather(*tasks))
    await client.close()
    return sorted(records, key=lambda record: record.request_id)


async def run_closed_loop(*, base_url: str, model: str, requests: list[TraceRequest], prompts: list[str],
                          concurrency: int, request_timeout_s: float = 300.0, description: str = "requests",
                          is_progress_shown: bool = True) -> list[RequestRecord]:
    """`concurrency` users, each sending its next request as soon as its last one ends (arrival times ignored)."""
    client = _client(base_url, request_timeout_s)
    queue: asyncio.Queue = asyncio.Queue()
    for pair in zip(requests, prompts, strict=True):
        queue.put_nowait(pair)
    records: list[RequestRecord] = []
    started_at = time.perf_counter()

    async def user(progress: tqdm) -> None:
        while not queue.empty():
            request, prompt = queue.get_nowait()
            # Arrival = now: the request is due the moment its user is free.
            due_at = time.perf_counter()
            due = request.model_copy(update={"arrival_s": due_at - started_at})
            records.append(await _one(client, model, due, prompt, due_at, started_at, request_timeout_s))
            progress.update()

    with tqdm(total=len(requests), desc=description, unit="req", disable=not is_progress_shown) as progress:
        await asyncio.gather(*(user(progress) for _ in range(concurrency)))
    await client.close()
    return sorted(records, key=lambda record: record.request_id)


def _raise_priority() -> None:
    """Where Linux's autogroup is on (`kernel.sched_autogroup_enabled`), the scheduler shares the CPU between
    sessions first, and a nice value only counts within its own session: against the engines, which run in the Ray
    head's session, a nice of -10 alone is worth nothing (measured: the generator waited 307 s on the run queue over
    50 minutes of a comparison). So the generator takes a session of its own and gives that session's group the same
    nice. Each step is skipped where the OS does not allow it; the stats say what the process got."""
    with contextlib.suppress(OSError):
        os.setsid()
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, GENERATOR_NICE)
    with contextlib.suppress(OSError):
        AUTOGROUP.write_text(str(GENERATOR_NICE))


def autogroup_nice() -> int | None:
    """This process's autogroup nice (`/autogroup-74 nice -10`), None where there is no autogroup."""
    try:
        return int(AUTOGROUP.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def host_steal_s() -> float | None:
    """Seconds of CPU the hypervisor has taken from this machine since boot (the 8th field of /proc/stat's `cpu`)."""
    try:
        with open("/proc/stat") as stat:
            return int(stat.readline().split()[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


async def _watched(kind: Literal["open", "closed"], arguments: dict) -> tuple[list[RequestRecord], LoopWatch]:
    with LoopWatch() as watch:
        records = await (run_trace(**arguments) if kind == "open" else run_closed_loop(**arguments))
    return records, watch


def _run_cell(kind: Literal["open", "closed"], arguments: dict) -> tuple[list[RequestRecord], GeneratorStats]:
    began_wall, began_cpu, began_steal = time.perf_counter(), time.process_time(), host_steal_s()
    began_wait = run_queue_wait_s()
    records, watch = asyncio.run(_watched(kind, arguments))
    ended_steal, ended_wait = host_steal_s(), run_queue_wait_s()
    return records, GeneratorStats(wall_s=time.perf_counter() - began_wall, cpu_s=time.process_time() - began_cpu,
                                   nice=os.getpriority(os.PRIO_PROCESS, 0), autogroup_nice=autogroup_nice(),
                                   steal_s=None if began_steal is None or ended_steal is None
                                   else ended_steal - began_steal,
                                   run_queue_wait_s=None if began_wait is None or ended_wait is None
                                   else round(ended_wait - began_wait, 4),
                                   loop_stall_s=round(watch.stall_s, 4),
                                   loop_stall_max_ms=round(watch.max_stall_s * 1e3, 2))


class CellRunner:
    """The load generator's own process (spawned once, reused for every cell), at a raised priority if allowed."""

    def __init__(self) -> None:
        self._pool = ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_raise_priority)

    def run(self, kind: Literal["open", "closed"], **arguments) -> tuple[list[RequestRecord], GeneratorStats]:
        return self._pool.submit(_run_cell, kind, arguments).result()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> CellRunner:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
