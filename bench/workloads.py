"""What a comparison sends to every system: the same cells, in the same order, with the same prompts.

1. Per trace (Azure `conv` and `code` by default), an **uncontended** cell: ≥ 30 requests sent one at a time,
   picked at evenly spaced quantiles of the loaded cells' request sizes, so that they span the sizes the loaded
   cells send. The reference system's (collocated) uncontended cells fit the one SLO reference (bench/slo.py).
2. Per trace, a **rate sweep** of open-loop cells (≥ 5 rates, from light load to past saturation): the real
   trace's arrival pattern replayed at each mean rate (or, with `arrivals="poisson"`, Poisson arrivals at that rate
   with the trace's token sizes) for at least `min_duration_s` and `min_requests`, token counts scaled to this host
   (`TokenScaling`, recorded in the results). The rates are set from this host's own reference, not fixed: the
   sweep is a ladder of **loads**, the reference's mean requests in flight (Little's law: rate × the reference's
   mean uncontended E2E over the trace's requests, `unit_rate`), so that a host twice as slow gets half the rates
   and the sweep still spans light load to past saturation (fixed rates tuned on one host started past every
   system's saturation on a host 2× slower). Rates given explicitly (`rates_per_s`) replace a trace's loads.
   A trace is `conv` or `code` (the Azure traces vendored in bench/data/azure_traces) or the path of any
   SplitwiseSim or Azure-format CSV.
3. The **anchor** cells (docs/benchmarks.md): 300-token prompts, 32 output tokens, closed loop at concurrency 1
   and 4, so that figures stay comparable across runs and with the peer's published anchor.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import numpy as np

from pydantic import BaseModel, ConfigDict, Field

from bench.slo import ReferenceFit
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


# Prompts of both traces ×0.15 (conversation median 1,020 → ~153 tokens, code 1,469 → ~220), outputs ×0.125 for
# conversation (median 129 → ~16) and ×0.5 for code (13 → ~6): the traces' shape is kept (code prefill-heavy, its
# prompts 1.4× conversation's; conversation decode-heavy), at sizes this host serves fast enough for the default run
# to fit its 75 minutes. The time a sweep takes is 50 requests × the reference's mean E2E × Σ 1/load per trace
# (the light end, where 50 requests take longest to arrive, is most of it), so it scales with the request sizes: on
# the AMD EPYC host the earlier sizes (prompts ×0.25, outputs ×0.25 and ×1) had a mean uncontended E2E of 5.7 s on
# conversation and 4.0 s on code, and the default run took 127 minutes; these have 2.9 s and 2.2 s.
DEFAULT_TOKEN_SCALING = {
    "conv": TokenScaling(prompt_scale=0.15, max_prompt_tokens=320, output_scale=0.125, max_output_tokens=32),
    "code": TokenScaling(prompt_scale=0.15, max_prompt_tokens=480, output_scale=0.5, max_output_tokens=32),
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


# The sweep in loads (the reference's mean requests in flight). The light end is where the reference itself met
# every SLO: conv at 0.7 load (0.52 requests in flight, 76d8c03) and code at 0.6 (0.64 in flight, with its Poisson
# arrivals, 88e4b6f). The top is past every system's saturation (delivered requests/s below 0.9 of the offered):
# conv's 8 loads is past the collocated baseline's (from 5 loads at 76d8c03; both PD systems from 3), code's 3.4
# past the baseline's, which still delivered 0.95 of the offered at 2.4 loads (the PD systems 0.55-0.59 there).
# Conversation batches its decodes, so it saturates later than code, whose prompts hold the cores.
DEFAULT_LOADS: dict[str, tuple[float, ...]] = {"conv": (0.7, 1.5, 3.0, 5.0, 8.0),
                                              "code": (0.6, 0.9, 1.2, 1.7, 2.4, 3.4)}

Arrivals = Literal["trace", "poisson"]
# How each trace's loaded cells time their arrivals. Conversation replays its own arrival times (its bursts run at
# ~2x its mean rate, which a 50-request cell holds, and its cells stay one ladder: delivered over offered fell
# monotonically with the rate at 76d8c03). Code draws Poisson arrivals at each rate, with its sizes: its trace comes
# in bursts of tens of requests within seconds (12 in 1.4 s, then 38 in 7 s after a 28 s lull, then 128 in 12 s at
# ~190 s), so a 50-request cell replayed at 0.6 load still sent 38 requests at 4x its mean rate, and cells of
# different sizes replayed different windows (collocated's delivered over offered went 0.97, 0.88, 0.82, 0.89, 0.74
# up the ladder at 76d8c03): its rates neither had a light end nor meant the same traffic from cell to cell.
# Poisson at every rate with one seed sends the same draws at every rate, only the time axis changes (Splitwise's and
# DistServe's rate sweeps draw Poisson arrivals too).
DEFAULT_ARRIVALS: dict[str, Arrivals] = {"conv": "trace", "code": "poisson"}
OWN_TRACE_LOADS = (0.5, 1.0, 2.0, 3.0, 4.5)


@functools.lru_cache(maxsize=8)
def _read_trace_once(path: Path) -> list[TraceRequest]:
    """A trace file, read once per process: the plan expands it for the mix, the unit rate and every cell."""
    return read_trace(path)


def unit_rate(mix: list[TraceRequest], fit: ReferenceFit) -> float:
    """The rate at which the reference holds one request in flight (Little's law): 1 / its mean uncontended E2E
    over `mix`, as its fitted model predicts for each request's size."""
    return 1.0 / float(np.mean([fit.e2e_s(request.prompt_tokens, request.output_tokens) for request in mix]))


def rate_at(load: float, unit_rate_per_s: float) -> float:
    """A load as a rate, to two significant digits: cell names stay readable ("conv@0.15/s") and a rerun of the
    same reference gets the same cells."""
    return float(f"{load * unit_rate_per_s:.2g}")


class Plan(BaseModel):
    """The options a comparison runs with; `workloads(unit_rates)` expands them into cells."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    traces: tuple[str, ...] = ("conv", "code")  # names in TRACE_FILES, or paths of trace CSVs
    # Per trace: replay its own arrival times ("trace", for any trace not named) or draw Poisson arrivals.
    arrivals: dict[str, Arrivals] = DEFAULT_ARRIVALS
    # Per trace, the sweep as loads (the reference's requests in flight); its rates come from `unit_rates`.
    loads: dict[str, tuple[float, ...]] = DEFAULT_LOADS
    # Explicit rates for a trace replace its loads: such a trace needs no reference to expand.
    rates_per_s: dict[str, tuple[float, ...]] = {}
    # Extra rates added to a trace's sweep (e.g. a lighter end), explicit requests/s.
    light_rates_per_s: dict[str, tuple[float, ...]] = {}
    min_duration_s: float = Field(60.0, gt=0)  # of arrivals, per open-loop cell
    min_requests: int = Field(50, ge=1)  # per open-loop cell: a cell lasts max(min_duration_s, min_requests / rate)
    num_uncontended: int = Field(30, ge=1)
    # The trace's first requests (scaled), whose sizes the uncontended cell spans and the unit rate averages over.
    # The sweep's cells replay the trace from its start, so they send these (the heaviest default cell sends ~100).
    num_mix_requests: int = Field(200, ge=1)
    anchor_concurrencies: tuple[int, ...] = (1, 4)
    num_anchor_requests_per_user: int = Field(5, ge=1)
    token_scaling: dict[str, TokenScaling] = DEFAULT_TOKEN_SCALING
    traces_dir: Path = TRACES_DIR

    def trace_names(self) -> list[str]:
        return [trace if trace in TRACE_FILES else Path(trace).stem for trace in self.traces]

    def calibrated_traces(self) -> list[str]:
        """The traces whose rates come from the reference (no explicit rates given)."""
        return [trace for trace in self.trace_names() if trace not in self.rates_per_s]

    def loads_of(self, trace: str) -> tuple[float, ...]:
        return self.loads.get(trace, OWN_TRACE_LOADS)

    def arrivals_of(self, trace: str) -> Arrivals:
        return self.arrivals.get(trace, "trace")

    def mix(self, trace_spec: str) -> list[TraceRequest]:
        trace, source = self._source(trace_spec)
        tokens = self.token_scaling.get(trace, OWN_TRACE_TOKEN_SCALING).model_dump()
        return scale_trace(source, Scaling(max_requests=self.num_mix_requests, **tokens))

    def unit_rates(self, fit_for: Mapping[str, ReferenceFit]) -> dict[str, float]:
        """Each calibrated trace's unit rate, from the reference's fit for that trace (`fit_for[trace]`)."""
        return {trace: unit_rate(self.mix(spec), fit_for[trace])
                for spec, trace in zip(self.traces, self.trace_names(), strict=True)
                if trace in self.calibrated_traces()}

    def sweep_rates(self, unit_rates: Mapping[str, float] | None = None) -> dict[str, tuple[float, ...]]:
        """Per trace, the sweep's rates: explicit, or its loads at its unit rate (a ValueError without one)."""
        unit_rates = unit_rates or {}
        rates = {}
        for trace in self.trace_names():
            if trace in self.rates_per_s:
                rates[trace] = tuple(self.rates_per_s[trace])
            else:
                if trace not in unit_rates:
                    raise ValueError(f"the sweep of {trace!r} is set in loads and needs the reference's unit rate "
                                   f"(or explicit rates)")
                loads = self.loads_of(trace)
                rates[trace] = tuple(dict.fromkeys(rate_at(load, unit_rates[trace]) for load in loads))
        return rates

    def fixed_workloads(self) -> list[Workload]:
        """The cells that need no rate: every trace's uncontended cell, then the anchors."""
        return self.workloads(is_sweep_included=False)

    def workloads(self, unit_rates: Mapping[str, float] | None = None, *,
                  is_sweep_included: bool = True) -> list[Workload]:
        sources = [self._source(trace_spec) for trace_spec in self.traces]  # a trace that is not found says so first
        sweep = self.sweep_rates(unit_rates) if is_sweep_included else {}
        cells: list[Workload] = []
        for trace_spec, name, (trace, source) in zip(self.traces, self.trace_names(), sources, strict=True):
            tokens = self.token_scaling.get(trace, OWN_TRACE_TOKEN_SCALING).model_dump()
            rates = sorted({*sweep.get(name, ()), *self.light_rates_per_s.get(name, ())}) if is_sweep_included \
                else []
            loaded = [self._open_loop(trace, source, rate, tokens) for rate in rates]
            # The uncontended requests span the sizes of the trace's first requests, which the loaded cells send.
            by_size = sorted(self.mix(trace_spec), key=lambda request: (request.prompt_tokens, request.output_tokens))
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
            return trace_spec, _read_trace_once(self.traces_dir / TRACE_FILES[trace_spec])
        path = Path(trace_spec)
        if not path.is_file():
            raise ValueError(f"trace {trace_spec!r} is neither one of {', '.join(TRACE_FILES)} nor a CSV file")
        return path.stem, _read_trace_once(path)

    def duration_s(self, rate_per_s: float) -> float:
        return max(self.min_duration_s, self.min_requests / rate_per_s)

    def _open_loop(self, trace: str, source: list[TraceRequest], rate: float, tokens: dict) -> Workload:
        duration_s = self.duration_s(rate)
        if self.arrivals_of(trace) == "poisson":
            # Sizes drawn from the trace's first requests: the ones the uncontended cells span and the unit rate
            # averages over, so a load means the same here as in a replayed cell.
            scaling = Scaling(max_requests=self.num_mix_requests, **tokens)
            requests = poisson_trace(rate_per_s=rate, num_requests=max(1, round(rate * duration_s)),
                                     sizes_from=scale_trace(source, scaling))
        else:
            scaling = scaling_for_rate(source, rate_per_s=rate, duration_s=duration_s, **tokens)
            requests = scale_trace(source, scaling)
        return Workload(name=f"{trace}@{rate:g}/s", trace=trace, kind="open", rate_per_s=rate, scaling=scaling,
                        requests=tuple(requests))


def open_cell(name: str, plan: Plan | None = None) -> Workload:
    """The open-loop cell a comparison names "<trace>@<rate>/s" (e.g. "conv@0.6/s"), at any rate, as `plan` (the
    default's options) expands it: for tools that replay one cell without a reference (bench.simulate,
    bench.vllm_crosscheck)."""
    trace, _, rate = name.partition("@")
    if not rate.endswith("/s"):
        raise ValueError(f"{name!r} is not an open-loop cell's name, <trace>@<rate>/s")
    plan = (plan or Plan()).model_copy(update={"traces": (trace,), "rates_per_s": {trace: (float(rate[:-2]),)},
                                               "anchor_concurrencies": ()})
    return next(cell for cell in plan.workloads() if cell.kind == "open")
