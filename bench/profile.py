"""Profile this host's engine for the simulator: step times against what a step computes, KV hand-over times.

    python -m bench.profile                          # ~6 min here; writes bench/results/profile/
    python -m bench.profile --repeats 1 --quick      # a smoke run (CI)

1. One engine as the app runs its decode role (serve_config.yaml's model and engine settings), served as the app
   serves it: its EngineCore and model worker in processes of their own, the worker's threads bound to the role's
   core. That core runs ahead of this client, so a step may not hold what the sweep meant it to: each step is read
   back from the core's own outputs instead (`ServedSteps`: its end is the outputs' timestamp, taken in the core;
   what it computed is which requests got their first token and which one more), and the fit is of the steps the
   engine ran. `--in-process` runs the EngineCore in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), each
   `step()` exactly the step the sweep composed; vLLM binds a CPU engine's threads only when it spawns its
   worker, so this process pins itself to the role's cores first (without that, the committed profile of ed4dea1
   timed an engine on both cores of a 2-core host). Every prompt size runs once, untimed, before the sweeps
   (first runs of a shape cost more).
2. Sweeps whose every step's contents are known by construction (all prompts of a batch fit one step's token
   budget): single and batched prompts (prompt time against prompt and batch tokens), SplitwiseSim's
   (prompt size, batch size, token size) cells (prompt time, then every decode step against batch size and the
   KV it reads), and mixed steps (running sequences plus one new prompt's tokens). Every step is a row of
   steps.csv; each SplitwiseSim cell a row of perf_model.csv in its columns (times in ms).
3. KV hand-overs per backend, at the KV sizes of 128 to 2,048 prompt tokens, measured as bench.transfer_bench
   measures them (the app's shape: another process, flushed cache): transfers.csv.
4. The fit: least squares of a step's seconds on 1, prompt tokens, decode sequences and KV tokens read; then, for
   steps that only decode, the median of what each batch size takes beyond that line (`decode_batch_s@<b>`: on
   this host's CPU 2 sequences step slower than 1 or 3, bench/results/profile); a line in the prompt's tokens per
   backend for the hand-over. `--refit` fits the measurements already under --out again (the model's form
   changed, the measurements did not). model.csv (`parameter,value`) is what
   `bench.sim.model.PerfModel.from_profile` reads; fit.png draws the fit against every measurement; report.md
   gives the fit's error per kind of step.
5. The served path: the app as bench.compare's baseline runs it (collocated: two engines, the router, Serve's
   proxy), one streamed request at a time through the OpenAI API. A client's gap over the fitted engine step for
   the same sequence is what the served output path adds per token (`served_token_s`: its processes share the
   cores with the engine); its TTFT over the fitted prompt step, the path's latency (`served_request_s`). Then two
   streams at a time, one on each engine: their gap over the one-at-a-time gap of the same prompt size is what an
   engine loses while the other computes (`shared_host_slowdown`). Then the split app (always_split, NIXL), one at
   a time: its TTFT over the prompt's step, the hand-over, decode's step and the terms above is what the split path
   itself adds (`served_split_s`: the router's second call, prefill's answer, decode's wait for the KV; on the Xeon
   host about 95 ms from prefill's answer to decode's first chunk where the engine parts took ~60), split by the
   router's phases in report.md. Medians over the requests: served.csv. Without these terms the simulator was 8-18%
   fast on TBT one at a time (bench/results/sim at cfd1787: the engine stepped 44 ms, a client saw 50), and
   always_split's TTFT 0.57-0.82 of measured (bench/results/xeon_session).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from bench import processes
from bench.provenance import provenance
from bench.sim.model import PerfModel, decode_batch_extra_s, decode_batch_table
from bench.sim.model import prompt_pairs as pairs  # a whole prompt in one step: pairs(n) = n·(n+1)/2
from bench.systems import app_config

DEFAULT_OUT = Path(__file__).parent / "results" / "profile"
PROMPT_SIZES = (16, 64, 128, 256, 512, 1024, 1536, 2000)  # + its output within max_model_len
BATCHED_PROMPTS = ((2, 512), (4, 256), (8, 128), (16, 64), (4, 512), (2, 1024), (8, 256))
# SplitwiseSim's cells: (prompt size, batch size); every batch's prompts fit one step of 2,048 tokens.
# (128, 2) and the batches of 3: pure decode steps are not a line in their sequences (fit_decode_batches), so every
# small batch size is measured.
SPLITWISE_CELLS = ((128, 1), (128, 2), (128, 3), (128, 4), (128, 16), (512, 1), (512, 2), (512, 3), (512, 4),
                   (1024, 1), (1024, 2), (2000, 1))
TOKEN_SIZE = 32
# (running sequences, new prompt tokens): the new request needs a free sequence slot (max_num_seqs is 16) to join
# the running batch's next step.
MIXED = ((1, 64), (1, 512), (4, 64), (4, 512), (8, 256), (15, 64), (15, 1024))
HANDOVER_TOKENS = (128, 512, 1024, 2048)
SERVED_PROMPTS = (128, 512, 1024)  # 5.: streamed one at a time, `--served-requests` of each
SERVED_OUTPUT_TOKENS = 48
SHARED_PROMPT = SERVED_PROMPTS[0]  # two at a time (one per engine): prompts this size, 2 × `--served-requests`
SPLIT_SYSTEM = "splitserve-nixl"  # 5.: the split path served (always_split, NIXL: the simulator's default hand-over)
MIN_STEPS_PER_BATCH = 5  # a batch size's decode steps needed for its own entry in the decode_batch_s table
SERVED_FIELDS = ("system", "concurrency", "num_prompt_tokens", "num_output_tokens", "ttft_s", "mean_gap_s",
                 "prefill_s", "first_chunk_s")
STEP_FIELDS = ("kind", "num_prompt_tokens", "num_decode_seqs", "num_context_tokens", "seconds", "num_prompt_pairs")
SPLITWISE_FIELDS = ("model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time",
                    "e2e_time", "tensor_parallel")


@dataclass(frozen=True)
class Step:
    kind: str  # prefill, batched_prefill, decode, mixed
    num_prompt_tokens: int
    num_decode_seqs: int
    num_context_tokens: int  # KV the decode sequences read
    seconds: float
    num_prompt_pairs: int = 0  # attention's pairs among the prompt tokens (each prompt computed from its start)


@dataclass
class ServedSteps:
    """The steps a served EngineCore ran, read from its outputs (one message per step that produced tokens).

    A step ends at its outputs' timestamp (monotonic, taken in the core: one clock for every process of a host).
    It began where the last one ended if the core still held requests then (its loop runs step after step), else
    when the first request it computes was sent (the core was idle). A request whose first token comes out of a
    step had its whole prompt computed there (the sweeps' prompts fit one step's budget; nothing is chunked); one
    that had tokens already decoded one more, reading the KV written before the step."""

    prompt_tokens: dict[str, int] = field(default_factory=dict)  # every request sent: its prompt's tokens
    sent_at: dict[str, float] = field(default_factory=dict)
    generated: dict[str, int] = field(default_factory=dict)  # tokens each request has had so far
    in_flight: set[str] = field(default_factory=set)
    last_end: float | None = None
    steps: list[Step] = field(default_factory=list)
    is_recording: bool = True

    def sent(self, request_id: str, num_prompt_tokens: int, at: float) -> None:
        self.prompt_tokens[request_id], self.sent_at[request_id] = num_prompt_tokens, at
        self.generated[request_id] = 0
        self.in_flight.add(request_id)

    def ran(self, end: float, outputs: list[tuple[str, int, bool]]) -> None:
        """One message: (request, new tokens, finished) for each request the step gave tokens to."""
        new = [request_id for request_id, *_ in outputs if self.generated[request_id] == 0]
        if self.last_end is not None and self.in_flight - set(new):
            began = self.last_end  # requests held across the last step's end: the loop went straight on
        else:  # the core was idle until this step's first request reached it
            began = max([self.sent_at[request_id] for request_id in new] + [self.last_end or 0.0])
        num_prompt_tokens = num_decode = num_context = num_pairs = 0
        for request_id, _, _ in outputs:
            previous = self.generated[request_id]
            if previous == 0:
                num_prompt_tokens += self.prompt_tokens[request_id]
                num_pairs += pairs(self.prompt_tokens[request_id])
            else:
                num_decode += 1
                num_context += self.prompt_tokens[request_id] + previous - 1
        kind = ("mixed" if num_decode else ("batched_prefill" if len(new) > 1 else "prefill")) \
            if num_prompt_tokens else "decode"
        if self.is_recording:
            self.steps.append(Step(kind, num_prompt_tokens, num_decode, num_context, end - began, num_pairs))
        for request_id, num_new, is_finished in outputs:
            self.generated[request_id] += num_new
            if is_finished:
                self.in_flight.discard(request_id)
        self.last_end = end


class EngineProbe:
    """One engine in this process; requests of exact token counts; one timed `step()` at a time."""

    def __init__(self, config: Any, *, is_in_process: bool = False, kv_connector: str | None = None,
                 transfer_update: dict[str, Any] | None = None) -> None:
        """`kv_connector` (nixl): the decode role's connector as the app configures it, idle (no peer),
        to weigh what it costs a step."""
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if is_in_process else "1"
        from vllm.engine.arg_utils import EngineArgs
        from vllm.entrypoints.launchers.cli_args import make_arg_parser
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.llm_engine import LLMEngine

        from deployments.engine import binding_cores, engine_environment, vllm_cli_args
        from kv_transfer.backend import kv_transfer_config

        connector = None if kv_connector is None else kv_transfer_config(
            config.transfer.model_copy(update={"backend": kv_connector, **(transfer_update or {})}), is_producer=False,
            engine_id="profile-decode")
        os.environ.update(engine_environment(config.decode, 0))
        cores = binding_cores(config.decode.cpu_binding_for(0))
        if is_in_process and cores:  # the binding vLLM gives only a worker it spawns: this process's threads
            import torch

            os.sched_setaffinity(0, cores)
            torch.set_num_threads(len(cores))
        args = make_arg_parser(FlexibleArgumentParser()).parse_args(
            vllm_cli_args(config.model, config.decode, connector))
        self.engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(args))
        self._next_id = 0
        self.served = None if is_in_process else ServedSteps()
        if self.served is not None:
            core, get_output = self.engine.engine_core, self.engine.engine_core.get_output

            def recorded() -> Any:
                outputs = get_output()
                if outputs.outputs:
                    self.served.ran(outputs.timestamp, [(out.request_id, len(out.new_token_ids),
                                                         out.finish_reason is not None) for out in outputs.outputs])
                return outputs

            core.get_output = recorded

    def add(self, num_prompt_tokens: int, max_tokens: int) -> str:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self._next_id += 1
        request_id = f"profile-{self._next_id}"
        # Distinct first tokens: no prefix-cache hit between requests.
        tokens = [(self._next_id * 7919 + index) % 30000 + 100 for index in range(num_prompt_tokens)]
        sent_at = time.monotonic()
        internal_id = self.engine.add_request(request_id, TokensPrompt(prompt_token_ids=tokens),
                                              SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0))
        if self.served is not None:
            self.served.sent(internal_id, num_prompt_tokens, sent_at)
        return request_id

    def step(self) -> float:
        """Seconds until the engine's next step's outputs: with the EngineCore in its own process, a call can return
        before the step (no outputs yet), so it waits for a call that brings some."""
        began = time.perf_counter()
        while not self.engine.step() and self.engine.has_unfinished_requests():
            pass
        return time.perf_counter() - began

    def drain(self) -> None:
        while self.engine.has_unfinished_requests():
            self.engine.step()


def prefill_steps(probe: EngineProbe, repeats: int, prompt_sizes: tuple[int, ...],
                  batches: tuple[tuple[int, int], ...]) -> list[Step]:
    steps = []
    for _ in range(repeats):
        for size in prompt_sizes:
            probe.add(size, 1)
            steps.append(Step("prefill", size, 0, 0, probe.step(), pairs(size)))
            probe.drain()
        for count, size in batches:
            for _ in range(count):
                probe.add(size, 1)
            steps.append(Step("batched_prefill", count * size, 0, 0, probe.step(), count * pairs(size)))
            probe.drain()
    return steps


def splitwise_cell(probe: EngineProbe, prompt_size: int, batch_size: int) -> tuple[dict[str, Any], list[Step]]:
    """A batch started together: its prompts in one step, then TOKEN_SIZE - 1 decode steps."""
    for _ in range(batch_size):
        probe.add(prompt_size, TOKEN_SIZE)
    prompt_s = probe.step()
    steps = [Step("batched_prefill" if batch_size > 1 else "prefill", prompt_size * batch_size, 0, 0, prompt_s,
                  batch_size * pairs(prompt_size))]
    for generated in range(1, TOKEN_SIZE):
        context = batch_size * (prompt_size + generated - 1)  # as the simulator counts it: KV written before the step
        steps.append(Step("decode", 0, batch_size, context, probe.step()))
    probe.drain()
    decode_s = [step.seconds for step in steps[1:]]
    row = {"model": "", "hardware": "", "prompt_size": prompt_size, "batch_size": batch_size,
           "token_size": TOKEN_SIZE, "prompt_time": prompt_s * 1e3, "token_time": float(np.mean(decode_s)) * 1e3,
           "e2e_time": (prompt_s + sum(decode_s)) * 1e3, "tensor_parallel": 1}
    return row, steps


def mixed_steps(probe: EngineProbe, repeats: int, cells: tuple[tuple[int, int], ...]) -> list[Step]:
    """`running` sequences of 128-token prompts decoding, then one new prompt of `chunk` tokens joins: that step
    carries both."""
    steps = []
    for _ in range(repeats):
        for running, chunk in cells:
            for _ in range(running):
                probe.add(128, 8)
            probe.step()  # their prompts
            probe.step()  # one pure decode step, so that every sequence has a generated token
            probe.add(chunk, 1)
            steps.append(Step("mixed", chunk, running, running * (128 + 1), probe.step(), pairs(chunk)))
            probe.drain()
    return steps


def handover_rows(config: Any, repeats: int, token_counts: tuple[int, ...]) -> list[dict[str, Any]]:
    """Per backend and prompt size: bench.transfer_bench's measurement of that many tokens' KV."""
    import ray

    from bench import transfer_bench
    from bench.engines import kv_bytes_per_block

    block = config.model.block_size or 128
    bytes_per_token = kv_bytes_per_block(config.model.path, block) / block
    flush, measures = transfer_bench.CacheFlusher(), transfer_bench.paths()
    backends = {"object_store": measures["object_store"], **({"nixl": measures["nixl"]} if "nixl" in measures else {})}
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=transfer_bench.OBJECT_STORE_BYTES, namespace=f"profile-{uuid.uuid4().hex[:6]}")
    rows = []
    try:
        transfer_bench.warm_object_store()
        for backend, measure in backends.items():
            for num_tokens in token_counts:
                layers = transfer_bench.NUM_LAYERS
                nbytes = int(num_tokens * bytes_per_token) // layers * layers
                for seconds in measure(nbytes, repeats, flush):
                    rows.append({"backend": backend, "num_prompt_tokens": num_tokens, "num_bytes": nbytes,
                                 "seconds": seconds})
    finally:
        ray.shutdown()
    return rows


def served_rows(config: Any, num_each: int, logs_dir: Path) -> list[dict[str, Any]]:
    """5. Requests streamed through the served baseline, one at a time and then two at a time (Serve's choice of
    the less loaded replica puts one on each engine), then one at a time through the split app (`SPLIT_SYSTEM`):
    each one's client TTFT and mean gap, and for a split the router's phases (its Server-Timing header)."""
    import asyncio

    from bench.load_generator import PromptBuilder, filler_document, run_closed_loop
    from bench.systems import SYSTEMS
    from bench.traces import TraceRequest

    builder = PromptBuilder(config.model.path, filler_document())
    model = config.model.served_name
    rows: list[dict[str, Any]] = []

    def run(base_url: str, concurrency: int, prompt_sizes: tuple[int, ...], first_id: int,
            description: str) -> list[Any]:
        requests = [TraceRequest(request_id=first_id + index, arrival_s=0.0, prompt_tokens=size,
                                 output_tokens=SERVED_OUTPUT_TOKENS) for index, size in enumerate(prompt_sizes)]
        prompts = [builder.build(request.request_id, request.prompt_tokens) for request in requests]
        records = asyncio.run(run_closed_loop(base_url=base_url, model=model, requests=requests, prompts=prompts,
                                              concurrency=concurrency, description=description,
                                              is_progress_shown=bool(description)))
        return list(zip(requests, records, strict=True))

    def measure(base_url: str, system: str, concurrency: int, prompt_sizes: tuple[int, ...]) -> None:
        for request, record in run(base_url, concurrency, prompt_sizes, 1000 * concurrency + len(rows),
                                   f"served {system}, {concurrency} at a time"):
            if not record.is_ok:
                raise RuntimeError(f"a served request failed: {record.error}")
            # The server's own token counts, where it gave them (a built prompt may tokenize a token off).
            rows.append({"system": system, "concurrency": concurrency,
                         "num_prompt_tokens": record.prompt_tokens or request.prompt_tokens,
                         "num_output_tokens": record.output_tokens or request.output_tokens,
                         "ttft_s": record.ttft_s, "mean_gap_s": record.tpot_s,
                         "prefill_s": record.prefill_s, "first_chunk_s": record.first_chunk_s})

    for name, system, sizes in (("collocated", "collocated", {1: SERVED_PROMPTS * num_each,
                                                              2: (SHARED_PROMPT,) * (2 * num_each)}),
                                (SPLIT_SYSTEM, "split", {1: SERVED_PROMPTS * num_each})):
        with SYSTEMS[name].start(logs_dir) as base_url:
            # Untimed first: each prompt size's first run pays one-time costs on either engine.
            run(base_url, 1, SERVED_PROMPTS * 2, -100, "")
            for concurrency, prompt_sizes in sizes.items():
                measure(base_url, system, concurrency, prompt_sizes)
    return rows


def _is_collocated(row: dict[str, Any]) -> bool:
    return row.get("system", "collocated") in ("collocated", "")  # served.csv before split rows had no system


def fit_served(rows: list[dict[str, Any]], model: dict[str, float]) -> dict[str, float]:
    """What the served path adds to the fitted engine, from the one-at-a-time requests: per streamed token (a
    client's mean gap over the engine's steps for the same sequence) and per request (its TTFT over the prompt's
    step); from the two-at-a-time ones, their gap over the one-at-a-time gap at the same prompt size, less 1
    (`shared_host_slowdown`); from the split app's, their TTFT over everything the simulator already puts in a
    split's first token (the prompt's step, the NIXL hand-over, one decode step and the two terms above):
    `served_split_s`, the router's second call, prefill's answer and decode's wait for the KV. Medians."""
    alone = [row for row in rows if row.get("concurrency", 1) == 1 and _is_collocated(row)]
    if not alone:
        return {}
    per_token, per_request = [], []
    for row in alone:
        n, num_output = row["num_prompt_tokens"], row["num_output_tokens"]
        engine_steps = [fitted_s(model, Step("decode", 0, 1, n + index, 0.0)) for index in range(1, num_output)]
        per_token.append(row["mean_gap_s"] - float(np.mean(engine_steps)))
        per_request.append(row["ttft_s"] - fitted_s(model, Step("prefill", n, 0, 0, 0.0, pairs(n))))
    fitted = {"served_token_s": max(0.0, float(np.median(per_token))),
              "served_request_s": max(0.0, float(np.median(per_request)))}
    shared = [row["mean_gap_s"] for row in rows if row.get("concurrency", 1) == 2 and _is_collocated(row)]
    alone_same_size = [row["mean_gap_s"] for row in alone
                       if abs(row["num_prompt_tokens"] - SHARED_PROMPT) <= SHARED_PROMPT // 8]
    if shared and alone_same_size:
        fitted["shared_host_slowdown"] = max(0.0, float(np.median(shared) / np.median(alone_same_size)) - 1.0)
    split = [row["ttft_s"] - split_parts_s(model | fitted, row["num_prompt_tokens"])["total"]
             for row in rows if row.get("system") == "split"]
    if split:
        fitted["served_split_s"] = max(0.0, float(np.median(split)))
    return fitted


def split_parts_s(model: dict[str, float], num_prompt_tokens: int) -> dict[str, float]:
    """A split request's first token one at a time as the simulator composes it before `served_split_s`: the
    prompt's step on prefill, the hand-over, decode's step that makes the first token (the served output path's
    share of it included), and the served path's latency."""
    n = num_prompt_tokens
    parts = {"prefill": fitted_s(model, Step("prefill", n, 0, 0, 0.0, pairs(n))),
             "handover": PerfModel.from_fitted(model).handover_s(n),  # NIXL's, the simulator's default
             "decode_step": fitted_s(model, Step("decode", 0, 1, n, 0.0)) + model.get("served_token_s", 0.0),
             "served_request": model.get("served_request_s", 0.0)}
    return parts | {"total": sum(parts.values())}


def split_breakdown(rows: list[dict[str, Any]], model: dict[str, float]) -> dict[str, float]:
    """Where a split's `served_split_s` lies, from the router's phases (medians, seconds): from dispatch to
    prefill's answer beyond the prompt's fitted step (`prefill_extra_s`), and from that answer to decode's first
    chunk beyond the hand-over and decode's step (`decode_extra_s`); the rest is outside the router's phases."""
    split = [row for row in rows if row.get("system") == "split" and row.get("prefill_s") is not None
             and row.get("first_chunk_s") is not None]
    if not split:
        return {}
    prefill_extra, decode_extra = [], []
    for row in split:
        parts = split_parts_s(model, row["num_prompt_tokens"])
        prefill_extra.append(row["prefill_s"] - parts["prefill"])
        decode_extra.append(row["first_chunk_s"] - parts["handover"] - parts["decode_step"])
    return {"prefill_extra_s": float(np.median(prefill_extra)), "decode_extra_s": float(np.median(decode_extra)),
            "first_chunk_s": float(np.median([row["first_chunk_s"] for row in split])),
            "num_requests": len(split)}


STEP_TERMS = ("step_s0", "decode_step_s0", "prompt_token_s", "prompt_pair_s", "decode_seq_s", "context_token_s")


def _terms(step: Step) -> list[float]:
    return [1.0, 1.0 if step.num_decode_seqs else 0.0, step.num_prompt_tokens, step.num_prompt_pairs,
            step.num_decode_seqs, step.num_context_tokens]


def fit_steps(steps: list[Step]) -> dict[str, float]:
    """Least squares of seconds on the performance model's terms (bench/sim/model.py). A term whose coefficient
    comes out below 0 (work that would make a step faster) is left out and the rest fitted again."""
    design = np.array([_terms(step) for step in steps])
    seconds = np.array([step.seconds for step in steps])
    kept = list(range(len(STEP_TERMS)))
    while True:
        coefficients, *_ = np.linalg.lstsq(design[:, kept], seconds, rcond=None)
        if (coefficients >= 0).all() or len(kept) == 1:
            break
        kept.pop(int(np.argmin(coefficients)))
    fitted = dict.fromkeys(STEP_TERMS, 0.0)
    fitted.update({STEP_TERMS[index]: max(0.0, float(value)) for index, value in zip(kept, coefficients, strict=True)})
    return fitted


def fitted_s(model: dict[str, float], step: Step) -> float:
    """The engine's step as fitted (the served path's terms left out: they are measured over it)."""
    return (sum(model[name] * term for name, term in zip(STEP_TERMS, _terms(step), strict=True))
            + decode_batch_extra_s(decode_batch_table(model), step.num_prompt_tokens, step.num_decode_seqs))


def fit_decode_batches(steps: list[Step], model: dict[str, float]) -> dict[str, float]:
    """What a pure decode step of b sequences takes beyond the line (`decode_batch_s@b`): the median residual of
    the steps of each batch size measured MIN_STEPS_PER_BATCH times or more, sizes between them interpolated,
    below the first the first's, up to the largest measured (PerfModel takes the last entry past it)."""
    residuals: dict[int, list[float]] = {}
    for step in steps:
        if step.num_decode_seqs and not step.num_prompt_tokens:
            residuals.setdefault(step.num_decode_seqs, []).append(step.seconds - fitted_s(model, step))
    measured = sorted(size for size, values in residuals.items() if len(values) >= MIN_STEPS_PER_BATCH)
    if not measured:
        return {}
    medians = [float(np.median(residuals[size])) for size in measured]
    return {f"decode_batch_s@{size}": float(np.interp(size, measured, medians))
            for size in range(1, measured[-1] + 1)}


def fit_handovers(rows: list[dict[str, Any]]) -> dict[str, float]:
    fitted = {}
    for backend in dict.fromkeys(row["backend"] for row in rows):
        mine = [row for row in rows if row["backend"] == backend]
        slope, intercept = np.polyfit([row["num_prompt_tokens"] for row in mine], [row["seconds"] for row in mine], 1)
        fitted[f"handover_s0@{backend}"] = max(0.0, float(intercept))
        fitted[f"handover_token_s@{backend}"] = max(0.0, float(slope))
    return fitted


def fit_errors(steps: list[Step], model: dict[str, float]) -> dict[str, dict[str, float]]:
    """Per kind of step: the median and p90 of |fitted / measured - 1|."""
    errors: dict[str, list[float]] = {}
    for step in steps:
        errors.setdefault(step.kind, []).append(abs(fitted_s(model, step) / step.seconds - 1))
    return {kind: {"num_steps": len(values), "median": float(np.median(values)),
                   "p90": float(np.percentile(values, 90))} for kind, values in errors.items()}


def draw(steps: list[Step], model: dict[str, float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fitted = [fitted_s(model, step) for step in steps]
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    for kind in dict.fromkeys(step.kind for step in steps):
        mine = [(step, fit) for step, fit in zip(steps, fitted, strict=True) if step.kind == kind]
        left.scatter([s.seconds * 1e3 for s, _ in mine], [f * 1e3 for _, f in mine], s=12, label=kind)
    top = max(step.seconds for step in steps) * 1e3
    left.plot([0, top], [0, top], color="grey", linewidth=1)
    left.set(xlabel="measured step, ms", ylabel="fitted step, ms", title="the fit against every step")
    left.legend()
    decode = [step for step in steps if step.kind == "decode"]
    right.scatter([s.num_decode_seqs for s in decode], [s.seconds * 1e3 for s in decode], s=10, label="measured")
    right.scatter([s.num_decode_seqs for s in decode],
                  [fitted_s(model, s) * 1e3 for s in decode], s=10, marker="x",
                  label="fitted")
    right.set(xlabel="decode sequences in the step", ylabel="step, ms", title="decode steps")
    right.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _write_csv(rows: list[dict[str, Any]], fields: tuple[str, ...] | list[str], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(fields))
        writer.writeheader()
        writer.writerows(rows)


def read_measurements(folder: Path) -> tuple[list[Step], list[dict[str, Any]], list[dict[str, Any]]]:
    """A profile's measurements (steps, hand-overs, served requests) as `main` wrote them under `folder`."""
    def rows(name: str) -> list[dict[str, Any]]:
        if not (folder / name).exists():
            return []
        with open(folder / name, newline="") as handle:
            return [{key: value if key in ("kind", "backend", "system") else float(value) if value != "" else None
                     for key, value in row.items()} for row in csv.DictReader(handle)]

    steps = [Step(row["kind"], int(row["num_prompt_tokens"]), int(row["num_decode_seqs"]),
                  int(row["num_context_tokens"]), row["seconds"], int(row["num_prompt_pairs"]))
             for row in rows("steps.csv")]
    if not steps:
        raise SystemExit(f"{folder} holds no steps.csv to fit")
    served = [{**row, "concurrency": int(row["concurrency"]), "num_prompt_tokens": int(row["num_prompt_tokens"]),
               "num_output_tokens": int(row["num_output_tokens"])} for row in rows("served.csv")]
    return steps, rows("transfers.csv"), served


def fit(steps: list[Step], handovers: list[dict[str, Any]], served: list[dict[str, Any]]) -> dict[str, float]:
    """4.-5.: the step line, the hand-overs' lines, the decode batch table over the line, the served path's terms."""
    model = fit_steps(steps) | fit_handovers(handovers)
    model |= fit_decode_batches(steps, model)
    return model | fit_served(served, model)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="runs of each prompt and mixed sweep")
    parser.add_argument("--handover-repeats", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="a few cells only (a smoke run)")
    parser.add_argument("--no-handover", action="store_true", help="skip the KV hand-over measurements")
    parser.add_argument("--served-requests", type=int, default=8,
                        help="requests of each size streamed through the served app (0: skip it)")
    parser.add_argument("--in-process", action="store_true",
                        help="the EngineCore in this process (pinned to the role's cores), each step as composed")
    parser.add_argument("--kv-connector", choices=["nixl"],
                        help="run the decode role's KV connector, idle, to weigh its cost per step")
    parser.add_argument("--nixl-progress-interval-us", metavar="US|none",
                        help="with --kv-connector nixl: its progress thread's wait between passes (`none`: no "
                             "thread); default serve_config.yaml's")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--refit", action="store_true",
                        help="measure nothing: fit the measurements under --out again, rewriting its model.csv, "
                             "report.md and fit.png (run.json keeps when and where they were measured)")
    args = parser.parse_args(argv)
    command = ["python -m bench.profile", *(sys.argv[1:] if argv is None else argv)]
    if args.refit:
        refit(args.out, command)
        return
    # Before Ray is imported (it reads RAY_AUTH_MODE once, at import): the hand-overs' Ray cluster and this driver
    # share one token (Ray 2.60's token auth); without it, on a machine with ~/.ray/auth_token the cluster refused
    # the driver and the whole profile was lost at its last sweep.
    processes.use_ray_token_auth()
    progress = args.nixl_progress_interval_us
    transfer_update = {} if progress is None else {"nixl_progress_interval_us": None if progress == "none"
                                                   else int(progress)}
    config = app_config()
    prompt_sizes, batches = (PROMPT_SIZES[::3], BATCHED_PROMPTS[:2]) if args.quick else (PROMPT_SIZES, BATCHED_PROMPTS)
    cells = SPLITWISE_CELLS[:2] if args.quick else SPLITWISE_CELLS
    mixed = MIXED[:2] if args.quick else MIXED
    began, origin = time.time(), provenance()
    probe = EngineProbe(config, is_in_process=args.in_process, kv_connector=args.kv_connector,
                        transfer_update=transfer_update)
    if probe.served is not None:
        probe.served.is_recording = False
    prefill_steps(probe, 1, prompt_sizes, batches)  # untimed: each shape's first run pays one-time costs
    if probe.served is not None:
        probe.served.is_recording = True
    steps: list[Step] = []
    splitwise_rows: list[dict[str, Any]] = []
    num_served = 0 if args.quick else args.served_requests
    with tqdm(total=3 + (0 if args.no_handover else 1) + bool(num_served), desc="profile", unit="sweep") as progress:
        steps += prefill_steps(probe, args.repeats, prompt_sizes, batches)
        progress.update()
        for prompt_size, batch_size in cells:
            row, cell_steps = splitwise_cell(probe, prompt_size, batch_size)
            row |= {"model": config.model.served_name, "hardware": "host-cpu"}
            splitwise_rows.append(row)
            steps += cell_steps
        progress.update()
        steps += mixed_steps(probe, args.repeats, mixed)
        progress.update()
        if probe.served is not None:  # what the served core ran, not what the sweeps meant it to
            steps = probe.served.steps
        del probe
        handovers = [] if args.no_handover else handover_rows(config, args.handover_repeats,
                                                              HANDOVER_TOKENS[:2] if args.quick else HANDOVER_TOKENS)
        progress.update(0 if args.no_handover else 1)
        # The app's logs go to a folder of their own, out of the results.
        served = served_rows(config, num_served, Path(tempfile.mkdtemp(prefix="profile-served-"))) \
            if num_served else []
        progress.update(bool(num_served))
    model = fit(steps, handovers, served)
    errors = fit_errors(steps, model)
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv([asdict(step) for step in steps], STEP_FIELDS, args.out / "steps.csv")
    _write_csv(splitwise_rows, SPLITWISE_FIELDS, args.out / "perf_model.csv")
    if served:
        _write_csv(served, SERVED_FIELDS, args.out / "served.csv")
    if handovers:
        _write_csv(handovers, ("backend", "num_prompt_tokens", "num_bytes", "seconds"), args.out / "transfers.csv")
    _write_csv([{"parameter": name, "value": value} for name, value in model.items()], ("parameter", "value"),
               args.out / "model.csv")
    draw(steps, model, args.out / "fit.png")
    meta = {"started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(began)),
            "wall_s": round(time.time() - began, 1), **origin, "engine": {
                "model": config.model.served_name, "dtype": config.model.dtype,
                "max_num_batched_tokens": config.decode.max_num_batched_tokens,
                "max_num_seqs": config.decode.max_num_seqs, "kv_cache_gib": config.decode.kv_cache_gib,
                "cpu_binding": config.decode.cpu_binding, "is_engine_core_in_process": args.in_process,
                "kv_connector": args.kv_connector, **transfer_update},
            "model": model, "fit_errors": errors, "split_breakdown": split_breakdown(served, model),
            "num_steps": len(steps), "num_handovers": len(handovers), "num_served": len(served),
            "command": " ".join(command)}
    (args.out / "run.json").write_text(json.dumps(meta, indent=2))
    write_report(args.out, meta, steps, model, errors, has_handovers=bool(handovers), has_served=bool(served))


def refit(out: Path, command: list[str]) -> None:
    """--refit: the measurements under `out` fitted by this commit's code; run.json keeps what measured them and
    says who refitted them."""
    steps, handovers, served = read_measurements(out)
    model = fit(steps, handovers, served)
    errors = fit_errors(steps, model)
    _write_csv([{"parameter": name, "value": value} for name, value in model.items()], ("parameter", "value"),
               out / "model.csv")
    draw(steps, model, out / "fit.png")
    meta = json.loads((out / "run.json").read_text())
    origin = provenance()
    meta |= {"model": model, "fit_errors": errors, "split_breakdown": split_breakdown(served, model),
             "refit": {"commit": origin["commit"], "is_dirty": origin["is_dirty"],
                       "at": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(command)}}
    (out / "run.json").write_text(json.dumps(meta, indent=2))
    write_report(out, meta, steps, model, errors, has_handovers=bool(handovers), has_served=bool(served))


def write_report(out: Path, meta: dict[str, Any], steps: list[Step], model: dict[str, float],
                 errors: dict[str, dict[str, float]], *, has_handovers: bool, has_served: bool) -> None:
    refitted = meta.get("refit")
    line = {name: value for name, value in model.items() if not name.startswith("decode_batch_s@")}
    batches = [(name.split("@")[1], value) for name, value in model.items() if name.startswith("decode_batch_s@")]
    lines = ["# The engine's profile on this host", "",
             f"`{meta.get('command', 'python -m bench.profile')}`",
             f"at commit {meta['commit']}{' (dirty tree)' if meta['is_dirty'] else ''}, "
             f"{meta['started_at']}, {meta['wall_s'] / 60:.1f} min: {meta['num_steps']} engine steps, "
             f"{meta['num_handovers']} hand-overs, {meta['num_served']} requests served through the app."
             + (f" **Refitted**: `{refitted['command']}` at commit {refitted['commit']}"
                f"{' (dirty tree)' if refitted['is_dirty'] else ''}, {refitted['at']}: the same measurements, that "
                "commit's fit." if refitted else ""), "",
             "step seconds = step_s0 + decode_step_s0 (if any sequence decodes) + prompt_token_s · prompt tokens + "
             "prompt_pair_s · prompt token pairs (attention's quadratic part) + "
             "decode_seq_s · decode sequences + context_token_s · KV tokens read"
             + (" + decode_batch_s@b where a step only decodes, b sequences" if batches else "")
             + "; served through the app, served_token_s more per decode sequence and served_request_s more before "
             "the first token (a split, served_split_s more between prefill and decode); an iteration "
             "shared_host_slowdown longer while the host's other engine computes", "",
             "| parameter | value |", "| --- | --- |",
             *[f"| {name} | {value:.4g} |" for name, value in line.items()], ""]
    if batches:
        lines += ["What a step that only decodes b sequences takes beyond the line, ms (`decode_batch_s@b`; "
                  "past the last, the last):", "",
                  "| b | " + " | ".join(size for size, _ in batches) + " |", "|" + " --- |" * (len(batches) + 1),
                  "| ms | " + " | ".join(f"{value * 1e3:.1f}" for _, value in batches) + " |", ""]
    if split := meta.get("split_breakdown"):
        lines += [f"A split request one at a time ({split['num_requests']} through `{SPLIT_SYSTEM}`): its TTFT beyond "
                  "the prompt's step, the hand-over, one decode step and the served path is `served_split_s` "
                  f"({model.get('served_split_s', 0.0) * 1e3:.1f} ms, median). By the router's phases: dispatch to "
                  f"prefill's answer {split['prefill_extra_s'] * 1e3:.1f} ms beyond the prompt's fitted step; that "
                  f"answer to decode's first chunk {split['first_chunk_s'] * 1e3:.1f} ms, "
                  f"{split['decode_extra_s'] * 1e3:.1f} beyond the hand-over and decode's step.", ""]
    lines += ["The fit's error per kind of step, |fitted / measured - 1|:", "",
              "| steps | n | median | p90 |", "| --- | --- | --- | --- |",
              *[f"| {kind} | {e['num_steps']} | {e['median']:.1%} | {e['p90']:.1%} |" for kind, e in errors.items()],
              "", "![fit](fit.png)", "",
              "Every step is in [steps.csv](steps.csv), SplitwiseSim's cells in [perf_model.csv](perf_model.csv)"
              + (", the hand-overs in [transfers.csv](transfers.csv)" if has_handovers else "")
              + (", the served requests in [served.csv](served.csv)." if has_served else ".")]
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
