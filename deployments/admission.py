"""Admission: the router's overload bound, so that a burst is refused quickly instead of queueing without limit.

1. `try_admit` before any engine is asked: a request is refused (the role that is full is returned) when the
   prefill stage already holds its bound, or when decode already has as many requests coming as it may hold. The
   router answers it with 503 and `Retry-After`; nothing was computed or allocated for it.
2. `prefill_done` when prefill has answered (or failed): the request leaves the prefill stage.
3. `finished` when the request is over, whatever the outcome: it leaves decode's count.

Bounds are per role, `num_replicas * (max_ongoing_requests or max_num_seqs) + max_queued_requests`
(EngineRoleConfig), shared out over the router's replicas: each router replica admits its part. Counting at the
router covers both stages at once, which Serve's per-deployment `max_queued_requests` cannot: a request refused by
decode after its prefill would have wasted that prefill and held its KV. The engine replicas take the queued ones
too (their `max_ongoing_requests`), so an admitted request waits in its engine's scheduler, not in Serve's router.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from serve_app.config import AppConfig


@dataclass
class Admission:
    num_prefill_admissible: int | None  # None: collocated mode, one stage only
    num_decode_admissible: int  # decode's bound (collocated: the engines' bound)
    num_in_prefill: int = field(default=0, init=False)
    num_in_flight: int = field(default=0, init=False)

    @classmethod
    def from_config(cls, config: AppConfig) -> Admission:
        def share(num_admissible: int) -> int:
            return max(1, math.ceil(num_admissible / config.router.num_replicas))

        if not config.is_disaggregated:
            return cls(None, share(config.collocated.num_admissible))
        return cls(share(config.prefill.num_admissible), share(config.decode.num_admissible))

    def try_admit(self) -> str | None:
        """None if admitted (the caller must call `finished` later), else the name of the role that is full."""
        full = None
        if self.num_in_flight >= self.num_decode_admissible:
            full = "decode" if self.num_prefill_admissible is not None else "collocated"
        elif self.num_prefill_admissible is not None and self.num_in_prefill >= self.num_prefill_admissible:
            full = "prefill"
        if full is not None:
            return full
        self.num_in_flight += 1
        if self.num_prefill_admissible is not None:
            self.num_in_prefill += 1
        return None

    def prefill_done(self) -> None:
        self.num_in_prefill -= 1

    def finished(self) -> None:
        self.num_in_flight -= 1

    def counts(self) -> dict[str, int]:
        """This router replica's requests between admission and their end (for /health and leak checks)."""
        counts = {"num_in_flight": self.num_in_flight}
        if self.num_prefill_admissible is not None:
            counts["num_in_prefill"] = self.num_in_prefill
        return counts
