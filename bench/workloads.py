"""What a comparison sends to every system: the same cells, in the same order, with the same prompts.

1. Per trace (Azure `conv` and `code` by default), an **uncontended** cell: ≥ 30 requests sent one at a time,
   picked at evenly spaced quantiles of the loaded cells' request sizes, so that they span the sizes the loaded
   cells send. The reference system's (collocated) uncontended cells fit the one SLO reference (bench/slo.py).
2. Per trace, a **rate sweep** of open-loop cells (≥ 5 rates, from light load to past saturation; the light end is
   its own option, since it decides how long a run takes): the real trace's arrival pattern replayed at each mean
   rate (or, with `arrivals="poisson"`, Poisson arrivals at that rate with the trace's token sizes) for at least
   `min_duration_s` and `min_requests`, token counts scaled to this host (`TokenScaling`, recorded in the results). A trace is `conv` or `code` (the Azure traces vendored in
   bench/data/azure_traces) or the path of any SplitwiseSim or Azure-format CSV.
3. The **anchor** cells (docs/benchmarks.md): 300-token prompts, 32 output tokens, closed loop at concurrency 1
   and 4, so that figures stay comparable across runs and with the peer's published anchor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bench.traces import Scaling, TraceRequest, poisson_trace, read_trace, scale_trace, scaling_for_rate

# Vendored (see its README.md for the source and license), so that a fresh clone has them.
TRACES_DIR = Path(__file__).resolve().parent / "data" / "azure_traces"
TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
ANCHOR_PROMPT_TOKENS, ANCHOR_OUTPUT_TOKENS = 300, 32


class TokenScaling(BaseModel):
    """How a trace's token counts are fitted to a 2-core host and a 2,048-token model."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    prompt_scale: float = Field(gt=0)
    max_prompt_tokens: int = Field(ge=1)
    output_scale: float = Field(gt=0)
    max_output_tokens: int = Field(ge=1)


# Conversation: median prompt 1,020 → ~255 tokens, median output 129 → ~32. Code: median prompt 1,469 → ~367,
# outputs (median 13) kept. Both keep the traces' shape: code is prefill-heavy, conversation decode-heavy.
DEFAULT_TOKEN_SCALING = {
    "conv": TokenScaling(prompt_scale=0.25, max_prompt_tokens=512, output_scale=0.25, max_output_tokens=64),
    "code": TokenScaling(prompt_scale=0.25, max_prompt_tokens=768, output_scale=1.0, max_output_tokens=64),
}
# A trace of the user's own: sizes kept, clipped to what a 2,048-token context holds.
OWN_TRACE_TOKEN_SCALING = TokenScaling(prompt_scale=1.0, max_prompt_tokens=1536, output_scale=1.0,
                                       max_output_tokens=256)


class Workload(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str  # e.g. "conv@0.5/s", "uncontended-conv", "anchor-c4"
    trace: str  # conv, code, anchor
    kind: Literal["uncontended", "open", "closed"]
    rate_per_s: float | None = None  # open loop
    concurrency: int | None = None  # closed loop
    scaling: Scaling | None = None
    requests: tuple[TraceRequest, ...]


class Plan(BaseModel):
    """The options a comparison runs with; `workloads()` expands them into cells."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    traces: tuple[str, ...] = ("conv", "code")  # names in TRACE_FILES, or paths of trace CSVs
    arrivals: Literal["trace", "poisson"] = "trace"
    # Five rates per trace, from about one request in flight for the reference (conv 0.3/s) to past every system's
    # throughput limit on a 2-core host (delivered requests/s stopped following the offered rate at ~1.1 conv and
    # ~0.6 code for every system at c06db50). With ≥ 50 requests and ≥ 60 s per cell the three default systems took
    # 64 minutes (d2fb4db).
    rates_per_s: dict[str, tuple[float, ...]] = {"conv": (0.3, 0.6, 0.9, 1.3, 1.8),
                                                 "code": (0.4, 0.55, 0.7, 0.85, 1.0)}
    # An optional lighter end (e.g. conv 0.15/s, code 0.1/s: under half a request in flight), so that a system that
    # misses the SLOs at the lowest sweep rate still gets a goodput rate. Not in the default: ≥ 50 requests at those
    # rates are 333 s and 500 s of arrivals per system, which turns a 64-minute run into about two hours.
    light_rates_per_s: dict[str, tuple[float, ...]] = {}
    min_duration_s: float = Field(60.0, gt=0)  # of arrivals, per open-loop cell
    min_requests: int = Field(50, ge=1)  # per open-loop cell: a cell lasts max(min_duration_s, min_requests / rate)
    num_uncontended: int = Field(30, ge=1)
    anchor_concurrencies: tuple[int, ...] = (1, 4)
    num_anchor_requests_per_user: int = Field(10, ge=1)
    token_scaling: dict[str, TokenScaling] = DEFAULT_TOKEN_SCALING
    traces_dir: Path = TRACES_DIR

    def workloads(self) -> list[Workload]:
        cells: list[Workload] = []
        for trace_spec in self.traces:
            trace, source = self._source(trace_spec)
            tokens = self.token_scaling.get(trace, OWN_TRACE_TOKEN_SCALING).model_dump()
            sweep_rates = self.rates_per_s.get(trace, ())
            rates = sorted({*sweep_rates, *self.light_rates_per_s.get(trace, ())})
            loaded = [self._open_loop(trace, source, rate, tokens) for rate in rates]
            # The sweep's requests (or the trace's first ones, without a sweep): the sizes the loaded cells send.
            # A light cell replays the trace's first requests, which every sweep cell sends too; it adds no size.
            mix = [request for cell in loaded if cell.rate_per_s in sweep_rates for request in cell.requests] or \
                scale_trace(source, Scaling(max_requests=self.num_uncontended, **tokens))
            by_size = sorted(mix, key=lambda request: (request.prompt_tokens, request.output_tokens))
            picks = [by_size[round(i * (len(by_size) - 1) / max(1, self.num_uncontended - 1))]
                     for i in range(min(self.num_uncontended, len(by_size)))]
            cells.append(Workload(name=f"uncontended-{trace}", trace=trace, kind="uncontended", concurrency=1,
                                  requests=tuple(request.model_copy(update={"request_id": index, "arrival_s": 0.0})
                                                 for index, request in enumerate(picks))))
            cells += loaded
        for concurrency in self.anchor_concurrencies:
            requests = tuple(TraceRequest(request_id=index, arrival_s=0.0, prompt_tokens=ANCHOR_PROMPT_TOKENS,
                                          output_tokens=ANCHOR_OUTPUT_TOKENS)
                             for index in range(concurrency * self.num_anchor_requests_per_user))
            cells.append(Workload(name=f"anchor-c{concurrency}", trace="anchor", kind="closed",
                                  concurrency=concurrency, requests=requests))
        return cells

    def _source(self, trace_spec: str) -> tuple[str, list[TraceRequest]]:
        if trace_spec in TRACE_FILES:
            return trace_spec, read_trace(self.traces_dir / TRACE_FILES[trace_spec])
        path = Path(trace_spec)
        if not path.is_file():
            raise ValueError(f"trace {trace_spec!r} is neither one of {', '.join(TRACE_FILES)} nor a CSV file")
        return path.stem, read_trace(path)

    def duration_s(self, rate_per_s: float) -> float:
        return max(self.min_duration_s, self.min_requests / rate_per_s)

    def _open_loop(self, trace: str, source: list[TraceRequest], rate: float, tokens: dict) -> Workload:
        duration_s = self.duration_s(rate)
        if self.arrivals == "poisson":
            scaling = Scaling(**tokens)
            requests = poisson_trace(rate_per_s=rate, num_requests=max(1, round(rate * duration_s)),
                                     sizes_from=scale_trace(source, scaling))
        else:
            scaling = scaling_for_rate(source, rate_per_s=rate, duration_s=duration_s, **tokens)
            requests = scale_trace(source, scaling)
        return Workload(name=f"{trace}@{rate:g}/s", trace=trace, kind="open", rate_per_s=rate, scaling=scaling,
                        requests=tuple(requests))
