"""Where a request's time went, as the router saw it; sent to the client as a `Server-Timing` header.

The hand-off (handoff.py) fills in the phases and the path the scheduler chose, the router its own answer time; the
benchmark draws its timelines and each cell's mix of decisions from the header, e.g.
`router;dur=910.2, prefill;dur=812.3;desc="prefill-0-1a2b3c4d", first_chunk;dur=95.1, path;desc="split",
predicted_ttft;dur=880.0` (the scheduler's prediction, where its policy makes one).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PhaseTiming:
    prefill_s: float | None = None
    prefill_engine_id: str = ""
    # Disaggregated: prefill's answer -> decode's first chunk (KV hand-over + one decode step).
    # Collocated: the whole time to the first chunk (queue, prompt and one decode step).
    first_chunk_s: float | None = None
    # From the request reaching the router to its answer (or, streaming, its first chunk) leaving it: what the
    # client waited beyond that was spent in the network, Serve's proxy or the client itself.
    router_s: float | None = None
    path: str = ""  # the scheduler's path: split, decode_local, prefill_local (empty: collocated)
    predicted_ttft_s: float | None = None  # the scheduler's prediction, where its policy makes one

    def header(self) -> str:
        metrics = []
        if self.router_s is not None:
            metrics.append(f"router;dur={self.router_s * 1e3:.1f}")
        if self.prefill_s is not None:
            metrics.append(f'prefill;dur={self.prefill_s * 1e3:.1f};desc="{self.prefill_engine_id}"')
        if self.first_chunk_s is not None:
            metrics.append(f"first_chunk;dur={self.first_chunk_s * 1e3:.1f}")
        if self.path:
            metrics.append(f'path;desc="{self.path}"')
        if self.predicted_ttft_s is not None:
            metrics.append(f"predicted_ttft;dur={self.predicted_ttft_s * 1e3:.1f}")
        return ", ".join(metrics)
