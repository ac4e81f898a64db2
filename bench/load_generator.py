"""Open-loop load: send a trace's requests at their arrival times, streamed, and time every token.

1. `PromptBuilder` makes a prompt of exactly the requested number of tokens with the served model's tokenizer;
   each prompt starts with its own request number, so no prefix cache serves one request from another's KV.
2. `run_trace` starts each request at its arrival time whether or not earlier ones finished (open loop), through
   the official `openai` client with streaming, and records TTFT, every inter-token gap, E2E, tokens in and out,
   and the error if any. Servers may put several tokens in one chunk (Ray Serve LLM sends a chunk every 50 ms):
   the token ids each chunk carries (vLLM's `return_token_ids`) say how many, and a chunk of k tokens that came
   g seconds after the previous one counts as k gaps of g/k, so TBT means the same for every server. A progress
   bar counts finished requests. It stops sending at `max_duration_s` and gives up on requests still running
   `request_timeout_s` after they started: a run is bounded in count and time.
3. `run_closed_loop` instead keeps a fixed number of requests in flight (the anchor cells: docs/benchmarks.md).
4. Where the server says how the time to first token split (splitserve's `Server-Timing` header: prefill, and
   decode's first chunk), that is recorded too, for the per-replica timeline.
5. Only loopback targets are accepted: a benchmark must not load someone else's server by mistake.
"""

from __future__ import annotations

import asyncio
import os
import time
import re
from dataclasses import dataclass, field
from urllib.parse import urlparse

from tqdm import tqdm

from bench.traces import TraceRequest

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


@dataclass
class RequestRecord:
    request_id: int
    arrival_s: float  # scheduled, relative to the run's start
    prompt_tokens: int  # as the server counted them (0 if it never said)
    output_tokens: int
    start_s: float | None = None  # when it was actually sent, relative to the run's start
    ttft_s: float | None = None
    tbt_s: list[float] = field(default_factory=list)
    e2e_s: float | None = None
    error: str | None = None
    # From the server's Server-Timing header, where it sends one (splitserve does).
    prefill_s: float | None = None
    prefill_engine_id: str = ""
    first_chunk_s: float | None = None
    workload: str = ""  # which cell of a comparison it belongs to, set by the runner

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.ttft_s is not None


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
    """`prefill;dur=812.3;desc="prefill-0-ab12", first_chunk;dur=95.1` (W3C Server-Timing, durations in ms)."""
    for metric in (header or "").split(","):
        name, _, params = metric.strip().partition(";")
        duration = re.search(r"dur=([0-9.]+)", params)
        description = re.search(r'desc="([^"]*)"', params)
        if name == "prefill" and duration:
            record.prefill_s = float(duration.group(1)) / 1e3
            record.prefill_engine_id = description.group(1) if description else ""
        elif name == "first_chunk" and duration:
            record.first_chunk_s = float(duration.group(1)) / 1e3


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


async def _one(client, model: str, request: TraceRequest, prompt: str, started_at: float,
               timeout_s: float) -> RequestRecord:
    record = RequestRecord(request_id=request.request_id, arrival_s=request.arrival_s, prompt_tokens=0,
                           output_tokens=0)
    await asyncio.sleep(max(0.0, started_at + request.arrival_s - time.perf_counter()))
    sent = time.perf_counter()
    record.start_s = sent - started_at
    last = None
    try:
        async with asyncio.timeout(timeout_s):
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
                        record.ttft_s = now - sent
                    else:
                        record.tbt_s += [(now - last) / num_tokens] * num_tokens
                    last = now
        record.e2e_s = time.perf_counter() - sent
    except TimeoutError:
        record.error = f"timeout after {timeout_s:.0f} s"
    except Exception as exc:  # the server's error, as the client saw it
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    return record


def _client(base_url: str, request_timeout_s: float):
    import openai

    check_loopback(base_url)
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=os.environ.get("SPLITSERVE_API_KEY", "unused"),
                              max_retries=0, timeout=request_timeout_s)


async def run_trace(*, base_url: str, model: str, requests: list[TraceRequest], prompts: list[str],
                    max_duration_s: float = 600.0, request_timeout_s: float = 300.0,
                    description: str = "requests", is_progress_shown: bool = True) -> list[RequestRecord]:
    client = _client(base_url, request_timeout_s)
    due = [(request, prompt) for request, prompt in zip(requests, prompts, strict=True)
           if request.arrival_s <= max_duration_s]
    started_at = time.perf_counter()
    tasks = [asyncio.create_task(_one(client, model, request, prompt, started_at, request_timeout_s))
             for request, prompt in due]
    records = []
    with tqdm(total=len(tasks), desc=description, unit="req", disable=not is_progress_shown) as progress:
        for finished in asyncio.as_completed(tasks):
            records.append(await finished)
            progress.update()
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
            due = request.model_copy(update={"arrival_s": time.perf_counter() - started_at})
            records.append(await _one(client, model, due, prompt, started_at, request_timeout_s))
            progress.update()

    with tqdm(total=len(requests), desc=description, unit="req", disable=not is_progress_shown) as progress:
        await asyncio.gather(*(user(progress) for _ in range(concurrency)))
    await client.close()
    return sorted(records, key=lambda record: record.request_id)
