"""What the scheduler knows of each engine's load: the engine's own reports plus the router's in-flight accounting.

1. An engine replica reports an `EngineLoad` (prompt tokens not yet computed, requests it holds, KV in use) every
   few hundred milliseconds, with this router's share of those counts.
2. The router knows its own requests exactly and at once (`dispatched`, `prompt_done`, `request_done`, each with
   the dispatch number): an engine's load is its report, less this router's share in it, plus this router's live
   dispatches now. A report made before a request finished, arriving after, never brings it back; one made before a
   dispatch arrived never misses it. With several router replicas, another router's traffic is as fresh as the
   last report.
3. `least_loaded(role)` gives the engine whose queue drains first, in O(log engines): each role keeps a heap keyed
   on (drain time of its pending prompt tokens, requests it holds), refreshed lazily (an engine whose load changed
   is pushed again; stale entries are skipped when they reach the top). Drain time comes from the learned rates
   (rates.py); until they are known it is the pending tokens themselves, which is token join-the-shortest-queue.
   `refresh_keys` re-keys the book under new rates (the router does it between reports): as if every engine were
   pushed again in the order they joined the book, in O(changed engines · log engines), not O(engines).
4. `prompt_tokens_per_s(engine)`: the prompt tokens the engine computed per second lately, every router's, from
   the growth of its own count between reports: the load a stream placed on that engine would meet (a prefill
   engine computes every split's prompt between its local stream's tokens).

Plain state, no I/O and no clock of its own: the router (or a simulator) drives it, and sets `now_s`.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

Role = Literal["prefill", "decode"]
# How far back an engine's prompt throughput looks (an exponentially decaying window, seconds): about the life of a
# stream, whose gaps meet the prompts its engine computes meanwhile, and short enough to follow a change of load.
PROMPT_RATE_HORIZON_S = 10.0
# Ties of entries pushed since the last re-key start here, above every re-keyed entry's (its engine's rank).
_PUSHED_TIE_BASE = 1 << 48


class EngineLoad(NamedTuple):
    """One engine's report. `engine_id` is the replica's; counts are the engine's own, across all routers. A named
    tuple, immutable like a frozen dataclass and built in a third of its time: a simulator makes one per engine
    change, millions a run."""

    engine_id: str
    role: Role
    num_pending_prompt_tokens: int = 0  # prompt tokens queued or being prefilled
    num_running: int = 0  # requests decoding (or prefilling) now
    num_waiting: int = 0  # requests not yet scheduled
    kv_usage: float = 0.0  # share of the KV cache in use, 0 to 1
    num_prompt_tokens_computed: int = 0  # since the engine started, every router's requests
    num_own_requests: int = 0  # of num_running + num_waiting, this router's
    num_own_pending_prompt_tokens: int = 0  # of num_pending_prompt_tokens, this router's


@dataclass
class _Engine:
    reported: EngineLoad
    rank: int = 0  # the order it joined the book in: its tie once re-keyed
    keyed_drain_s: float = 0.0  # the drain time in its latest heap entry
    # This router's dispatches to the engine not yet done: dispatch number -> prompt tokens still pending.
    live: dict[int, int] = field(default_factory=dict)
    num_live_pending: int = 0  # the sum of `live`'s values, kept as they change
    version: int = 0
    # Prompt tokens computed per second, a decaying sum over PROMPT_RATE_HORIZON_S, as of `rate_at_s`.
    prompt_tokens_per_s: float = 0.0
    rate_at_s: float | None = None

    def take_computed(self, load: EngineLoad, now_s: float) -> None:
        """The engine's count grew by `delta` tokens since its last report: they join a window that decays with
        time, so a steady r tokens/s reads r, and a quiet engine fades to 0 within a few horizons."""
        if self.rate_at_s is None:
            self.rate_at_s = now_s
            return
        delta = load.num_prompt_tokens_computed - self.reported.num_prompt_tokens_computed
        if delta > 0:  # else the rate and its time stand, and it decays when read (no work per unchanged report)
            self.prompt_tokens_per_s = self.rate_now(now_s) + delta / PROMPT_RATE_HORIZON_S
            self.rate_at_s = now_s

    def rate_now(self, now_s: float) -> float:
        if self.rate_at_s is None:
            return 0.0
        return self.prompt_tokens_per_s * math.exp(-max(0.0, now_s - self.rate_at_s) / PROMPT_RATE_HORIZON_S)

    @property
    def num_pending_prompt_tokens(self) -> int:
        others = self.reported.num_pending_prompt_tokens - self.reported.num_own_pending_prompt_tokens
        return (others if others > 0 else 0) + self.num_live_pending

    @property
    def num_requests(self) -> int:
        others = self.reported.num_running + self.reported.num_waiting - self.reported.num_own_requests
        return (others if others > 0 else 0) + len(self.live)

    def set_live(self, seq: int, num_prompt_tokens: int | None) -> bool:
        """This router's dispatch `seq` now has `num_prompt_tokens` pending (None: done). Whether it was live."""
        was = self.live.pop(seq, None) if num_prompt_tokens is None else self.live.get(seq)
        if num_prompt_tokens is not None:
            self.live[seq] = num_prompt_tokens
        self.num_live_pending += (num_prompt_tokens or 0) - (was or 0)
        return was is not None

    @property
    def num_own_requests(self) -> int:
        """This router's requests on the engine now (the rest of `num_requests` is other routers', as reported)."""
        return len(self.live)


@dataclass
class LoadBook:
    """Every engine's estimated load, by role. `drain_s(engine_id, tokens)` turns pending tokens into seconds."""

    drain_time: Callable[[str, int], float] = field(default=lambda engine_id, num_tokens: float(num_tokens))
    _engines: dict[str, _Engine] = field(default_factory=dict)
    # Per role, entries (drain seconds, requests held, tie, engine id, version): the smallest is the shortest queue.
    _heaps: dict[str, list[tuple[float, int, int, str, int]]] = field(
        default_factory=lambda: {"prefill": [], "decode": []})
    _tie: int = 0  # push order breaks ties: of two equal queues, the one that has waited longer goes first
    _num_engines: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    _num_joined: int = 0
    # What a re-key must push again: engines pushed since the last one (their ties become their ranks), and
    # engines with prompts pending (the rates turn those into their drain time; with none it is 0 whatever the
    # rates). Every other engine's entry already is what a re-key would make.
    _moved: set[str] = field(default_factory=set)
    _with_pending: set[str] = field(default_factory=set)
    now_s: float = 0.0  # the driver's clock (the router's monotonic seconds, a simulator's time), set before use

    # 1. Reports.
    def report(self, load: EngineLoad) -> None:
        engine = self._engines.get(load.engine_id)
        if engine is None or engine.reported.role != load.role:
            self.remove(load.engine_id)
            self._num_joined += 1
            engine = self._engines[load.engine_id] = _Engine(reported=load, rank=self._num_joined)
            self._num_engines[load.role] += 1
        if load.num_prompt_tokens_computed != engine.reported.num_prompt_tokens_computed or engine.rate_at_s is None:
            engine.take_computed(load, self.now_s)  # (else nothing to take: most reports, in a simulator)
        engine.reported = load
        self._push(engine)

    def remove(self, engine_id: str) -> None:
        """An engine that is gone (its replica died or was scaled down): its heap entries go stale."""
        engine = self._engines.pop(engine_id, None)
        if engine is not None:
            self._num_engines[engine.reported.role] -= 1
            self._moved.discard(engine_id)
            self._with_pending.discard(engine_id)

    # 2. The router's own traffic between reports.
    def dispatched(self, engine_id: str, seq: int, num_prompt_tokens: int) -> None:
        """Dispatch `seq` was sent to the engine; it will compute `num_prompt_tokens` of prompt (0: KV arrives)."""
        engine = self._engines.get(engine_id)
        if engine is not None:
            engine.set_live(seq, num_prompt_tokens)
            self._push(engine)

    def prompt_done(self, engine_id: str, seq: int) -> None:
        """The engine's first token (or KV handle) came back: its prompt tokens are computed."""
        engine = self._engines.get(engine_id)
        if engine is not None and engine.live.get(seq):
            engine.set_live(seq, 0)
            self._push(engine)

    def request_done(self, engine_id: str, seq: int) -> None:
        engine = self._engines.get(engine_id)
        if engine is not None and engine.set_live(seq, None):
            self._push(engine)

    # 3. Queries.
    def least_loaded(self, role: Role, *, skip: frozenset[str] = frozenset()) -> str | None:
        """The `role` engine whose pending prompts drain first, ties to the longest unchanged; None if none."""
        found = self.first_loaded(role, 1, skip=skip)
        return found[0] if found else None

    def first_loaded(self, role: Role, count: int, *, skip: frozenset[str] = frozenset()) -> list[str]:
        """Up to `count` engines of `role` in drain-time order: O(count · log engines) amortised."""
        heap, engines = self._heaps[role], self._engines
        found: list[str] = []
        popped: list[tuple[float, int, int, str, int]] = []
        while heap and len(found) < count:
            *_, engine_id, version = heap[0]
            engine = engines.get(engine_id)
            if engine is None or engine.version != version or engine.reported.role != role:
                heapq.heappop(heap)  # stale: the engine changed since (a fresher entry exists) or is gone
                continue
            if count - len(found) == 1 and engine_id not in skip:
                found.append(engine_id)  # the last one wanted is at the top: read, not popped
                break
            popped.append(heapq.heappop(heap))
            if engine_id not in skip:
                found.append(engine_id)
        for entry in popped:
            heapq.heappush(heap, entry)
        return found

    def engine(self, engine_id: str) -> _Engine | None:
        return self._engines.get(engine_id)

    def entry(self, engine_id: str) -> _Engine:
        """The entry of an engine the book holds: what a policy reads of an engine the book itself just named
        (KeyError where it holds none)."""
        return self._engines[engine_id]

    def num_engines(self, role: Role) -> int:
        return self._num_engines[role]

    def refresh_keys(self) -> None:
        """The book under the current rates, ordered as if every engine were pushed again in the order it joined
        (its rank breaks ties): for the router to run when the rates changed, not per decision. Only the engines
        whose entry that would change are pushed (`_moved`, `_with_pending`): O(those · log engines)."""
        moved, self._moved = self._moved, set()
        for engine_id in moved | self._with_pending:
            engine = self._engines.get(engine_id)
            if engine is None:
                continue
            if engine_id not in moved and self.drain_s(engine_id) == engine.keyed_drain_s:
                continue  # not pushed since the last re-key, which ranked its entry, and its drain time stands
            heapq.heappush(self._heaps[engine.reported.role], self._entry(engine, engine.rank))

    def engine_ids(self, role: Role) -> list[str]:
        return [engine_id for engine_id, engine in self._engines.items() if engine.reported.role == role]

    def prompt_tokens_per_s(self, engine_id: str) -> float:
        """4. The prompt tokens the engine computed per second lately (0: quiet, or reported once so far)."""
        engine = self._engines.get(engine_id)
        return engine.rate_now(self.now_s) if engine is not None else 0.0

    def drain_s(self, engine_id: str) -> float:
        """Seconds until the engine has computed every prompt it holds (0 with none pending)."""
        pending = self._engines[engine_id].num_pending_prompt_tokens
        return self.drain_time(engine_id, pending) if pending > 0 else 0.0

    def _entry(self, engine: _Engine, tie: int) -> tuple[float, int, int, str, int]:
        """The engine's heap entry under its current load and rates; older entries of it go stale."""
        engine.version += 1
        engine_id = engine.reported.engine_id
        pending = engine.num_pending_prompt_tokens
        if pending > 0:
            drain = self.drain_time(engine_id, pending)
            self._with_pending.add(engine_id)
        else:
            drain = 0.0
            self._with_pending.discard(engine_id)
        engine.keyed_drain_s = drain
        return drain, engine.num_requests, tie, engine_id, engine.version

    def _push(self, engine: _Engine) -> None:
        role = engine.reported.role
        self._tie += 1
        self._moved.add(engine.reported.engine_id)
        heapq.heappush(self._heaps[role], self._entry(engine, _PUSHED_TIE_BASE + self._tie))
        # Stale entries are dropped when they surface; a heap far larger than its engines is rebuilt, so memory
        # stays O(engines) however many updates arrive.
        if len(self._heaps[role]) > 4 * max(16, self._num_engines[role]):
            self._heaps[role] = [entry for entry in self._heaps[role]
                                 if (live := self._engines.get(entry[-2])) is not None and live.version == entry[-1]]
            heapq.heapify(self._heaps[role])
