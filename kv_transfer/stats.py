"""One vocabulary for KV-transfer stats: vLLM's connector stats, parsed once into `TransferStats`.

Every engine step, vLLM hands its stat loggers what the engine's KV connector measured since the last step, as a
dict of lists (`SchedulerStats.kv_connector_stats`). Both backends speak the keys of vLLM's NIXL connector
(`NixlKVConnectorStats`): vLLM's own NixlConnector writes them, and our object-store connector writes the same keys
(plus `send_wait_duration`, prefill's step blocked on handing KV over). This module is the only reader and writer
of those keys; the engine counters, the Ray metrics and the benchmarks all read `TransferStats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict

# vLLM's NIXL keys, one list entry per event.
TRANSFER_DURATION = "transfer_duration"  # seconds, per completed transfer (decode's load)
BYTES_TRANSFERRED = "bytes_transferred"  # bytes, per completed transfer
NUM_FAILED_TRANSFERS = "num_failed_transfers"
NUM_FAILED_HANDSHAKES = "num_failed_handshakes"
NUM_FAILED_NOTIFICATIONS = "num_failed_notifications"
NUM_KV_EXPIRED_REQS = "num_kv_expired_reqs"
# Ours: seconds prefill's engine step waited on handing KV over instead of computing.
SEND_WAIT_DURATION = "send_wait_duration"
# Ours: prompt tokens of a load that failed inside its engine step (vLLM's synchronous load). vLLM counted them as
# loaded when it scheduled the request and then computes them again without counting that: the engine counters
# (deployments/engine_counters.py) move them back to computed.
FAILED_IN_STEP_TOKENS = "failed_in_step_tokens"
# As vLLM's own NIXL stats count them: a failed read, handshake or notification is a failed transfer.
_FAILURE_KEYS = (NUM_FAILED_TRANSFERS, NUM_FAILED_HANDSHAKES, NUM_FAILED_NOTIFICATIONS)
OBJECT_STORE_KEYS = (TRANSFER_DURATION, BYTES_TRANSFERRED, NUM_FAILED_TRANSFERS, SEND_WAIT_DURATION,
                     FAILED_IN_STEP_TOKENS)


def empty_connector_stats() -> dict[str, list[float]]:
    """The dict our object-store connector fills between two engine steps, in vLLM's keys."""
    return {key: [] for key in OBJECT_STORE_KEYS}


class TransferStats(BaseModel):
    """What one engine's connector reported for an interval: one entry per transfer or per blocked step."""

    model_config = ConfigDict(frozen=True)

    transfer_seconds: tuple[float, ...] = ()
    transfer_bytes: tuple[int, ...] = ()
    send_wait_seconds: tuple[float, ...] = ()
    num_failed: int = 0
    num_expired: int = 0
    num_recomputed_tokens: int = 0  # loaded by vLLM's count, computed in fact (FAILED_IN_STEP_TOKENS)

    @classmethod
    def from_connector_stats(cls, data: Mapping[str, Sequence[Any]] | None) -> TransferStats:
        data = data or {}

        def values(key: str) -> tuple[Any, ...]:
            return tuple(data.get(key) or ())

        return cls(
            transfer_seconds=tuple(float(value) for value in values(TRANSFER_DURATION)),
            transfer_bytes=tuple(int(value) for value in values(BYTES_TRANSFERRED)),
            send_wait_seconds=tuple(float(value) for value in values(SEND_WAIT_DURATION)),
            num_failed=int(sum(sum(values(key)) for key in _FAILURE_KEYS)),
            num_expired=int(sum(values(NUM_KV_EXPIRED_REQS))),
            num_recomputed_tokens=int(sum(values(FAILED_IN_STEP_TOKENS))),
        )

    @property
    def num_transfers(self) -> int:
        return len(self.transfer_seconds)

    @property
    def num_bytes(self) -> int:
        return sum(self.transfer_bytes)

    @property
    def total_transfer_seconds(self) -> float:
        return sum(self.transfer_seconds)

    @property
    def total_send_wait_seconds(self) -> float:
        return sum(self.send_wait_seconds)

    @property
    def is_empty(self) -> bool:
        return not (self.transfer_seconds or self.send_wait_seconds or self.num_failed or self.num_expired
                    or self.num_recomputed_tokens)

    def summary(self) -> dict[str, int | float]:
        """The interval in a few numbers, for vLLM's periodic log line."""
        return {"num_transfers": self.num_transfers, "bytes_transferred": self.num_bytes,
                "num_failed_transfers": self.num_failed, "send_wait_seconds": self.total_send_wait_seconds}
