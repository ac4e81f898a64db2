"""NIXL loads inside decode's engine step: what the scheduler and worker halves tell each other.

vLLM's NixlConnector loads a split's KV asynchronously: a request that reaches a busy decode engine is seen by the
next step, which starts the READ, and is computed in the step after; under load that is one whole decode step of
TTFT per split (docs/kv-transfer.md, "Decode: KV in"). With `transfer.is_load_in_step` (the default since
the wait polls only its own READs: docs/benchmarks.md) our connector loads it inside the step that computes it, as
vLLM's synchronous load, wherever that cannot stall the step on a handshake:

1. The worker half reports, as vLLM's worker metadata, the prefill engines it holds a NIXL connection to
   (`ReadyEngines`), whenever that set changes.
2. The scheduler half matches a split from such an engine synchronously, one token short of the prompt
   (`num_in_step_tokens`): vLLM must compute at least one token in the step to sample from, and the async path
   recomputes that last token anyway. A split from an engine decode has not met yet loads in the background and
   so makes the connection without holding up the step (NIXL's handshake waits up to 5 s for a dead peer).
3. The scheduler half names those requests and their loaded token counts in the step's metadata
   (`IN_STEP_ATTR`); the worker half starts their READs with the others and waits for them before the forward pass.
4. A READ that fails there reports its blocks as load errors in the same step, and vLLM recomputes them; its tokens
   are reported as `failed_in_step_tokens` (vLLM counted them as loaded when it scheduled the request).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorWorkerMetadata
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats

from kv_transfer.stats import FAILED_IN_STEP_TOKENS

# The attribute of vLLM's NixlConnectorMetadata that carries {request id: tokens loaded in step}.
IN_STEP_ATTR = "splitserve_in_step_tokens"


def num_in_step_tokens(num_matched: int, is_async: bool, params: Mapping[str, Any] | None,
                       ready_engines: frozenset[str]) -> int | None:
    """The tokens to load inside the step for a request vLLM's pull scheduler matched (`num_matched`, `is_async`),
    or None to keep vLLM's background load. Only a remote prefill from an engine the worker is connected to, with
    at least one token to load besides the last."""
    if not (is_async and params and params.get("do_remote_prefill")):
        return None
    if params.get("remote_engine_id") not in ready_engines or num_matched < 2:
        return None
    return num_matched - 1


class ReadyEngines(KVConnectorWorkerMetadata):
    """Worker → scheduler: the prefill engines this worker holds a NIXL connection to. With several workers (tensor
    parallel), an engine counts as ready only if all of them hold it."""

    def __init__(self, engine_ids: frozenset[str]):
        self.engine_ids = engine_ids

    def aggregate(self, other: KVConnectorWorkerMetadata) -> KVConnectorWorkerMetadata:
        if isinstance(other, ReadyEngines):
            return ReadyEngines(self.engine_ids & other.engine_ids)
        return self


class SplitserveNixlStats(NixlKVConnectorStats):
    """vLLM's NIXL stats plus the prompt tokens of in-step loads that failed (kv_transfer/stats.py reads them)."""

    def reset(self) -> None:
        super().reset()
        self.data[FAILED_IN_STEP_TOKENS] = []

    def record_failed_in_step(self, num_tokens: int) -> None:
        self.data[FAILED_IN_STEP_TOKENS].append(num_tokens)

    def aggregate(self, other: Any) -> Any:
        # vLLM aggregates by key; a plain NixlKVConnectorStats (no key of ours) aggregates into ours unchanged.
        if not other.is_empty():
            for key, values in other.data.items():
                self.data.setdefault(key, []).extend(values)
        return self
