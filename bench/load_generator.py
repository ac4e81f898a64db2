"""Open-loop load: send a trace's requests at their arrival times, streamed, and time every token.

1. `PromptBuilder` makes a prompt of exactly the requested number of tokens with the served model's tokenizer;
   each prompt starts with its own request number, so no prefix cache serves one request from another's KV.
2. `run_trace` starts each request at its arrival time whether or not earlier ones finished (open loop), through
   the official `openai` client with streaming, and records TTFT, every inter-token gap, E2E, tokens in and out,
   and the error if any. A progress bar counts finished requests. It stops sending at `max_duration_s` and
   gives up on requests still running `request_timeout_s` after they started: a run is bounded in count and time.
3. Only loopback targets are accepted: a benchmark must not load someone else's server by mistake.
"""

from __future__ import annotations

import asyncio
import time
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

    @property
    def is_ok(self) -> bool:
        return self.error is None and self.ttft_s is not None


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
            stream = await client.completions.create(
                model=model, prompt=prompt, max_tokens=request.output_tokens, temperature=0, stream=True,
                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
            async for chunk in stream:
                if chunk.usage is not None:
                    record.prompt_tokens = chunk.usage.prompt_tokens
                    record.output_tokens = chunk.usage.completion_tokens
                if chunk.choices and chunk.choices[0].text:
                    now = time.perf_counter()
                    if last is None:
                        record.ttft_s = now - sent
                    else:
                        record.tbt_s.append(now - last)
                    last = now
        record.e2e_s = time.perf_counter() - sent
    except TimeoutError:
        record.error = f"timeout after {timeout_s:.0f} s"
    except Exception as exc:  # the server's error, as the client saw it
        record.error = f"{type(exc).__name__}: {exc}"[:300]
    return record


async def run_trace(*, base_url: str, model: str, requests: list[TraceRequest], prompts: list[str],
                    max_duration_s: float = 600.0, request_timeout_s: float = 300.0,
                    description: str = "requests", is_progress_shown: bool = True) -> list[RequestRecord]:
    import openai

    check_loopback(base_url)
    due = [(request, prompt) for request, prompt in zip(requests, prompts, strict=True)
           if request.arrival_s <= max_duration_s]
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0,
                                timeout=request_timeout_s)
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
