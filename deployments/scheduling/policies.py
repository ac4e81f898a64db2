"""Per request: which path (split, decode-local, prefill-local) and which engines. Pure: no Ray, no vLLM, no clock.

1. The router knows a request's prompt length and nothing of its output (`RequestFacts`); the load book knows
   every engine's pending prompt tokens and requests (loads.py); the rates say how fast each engine works
   (rates.py).
2. A policy's `decide` returns a `Decision`: the path, the engines (None: Serve's own router picks), the TTFT it
   predicts where it predicts one, and why, in words a log line and a dashboard can carry.
3. The router then dispatches (and tells the book), and reports what it observed back into the rates.
Every decision looks at a bounded number of engines per pool through the book's heaps: O(log engines).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from deployments.scheduling.loads import LoadBook, Role
from deployments.scheduling.rates import Rates
from serve_app.config import SchedulingConfig

# Decode-local candidates whose TBT guard is checked before giving up on decode-local: bounded, so a decision
# stays O(log engines) with thousands of engines.
NUM_GUARDED_CANDIDATES = 4


class Path(StrEnum):
    SPLIT = "split"  # prefill engine runs the prompt, KV moves, decode engine streams
    DECODE_LOCAL = "decode_local"  # a decode engine runs the prompt and streams
    PREFILL_LOCAL = "prefill_local"  # a prefill engine runs the whole request


@dataclass(frozen=True)
class RequestFacts:
    """What a live router knows of a request before it runs: never its output length."""

    request_id: str
    num_prompt_tokens: int
    max_tokens: int | None = None


@dataclass(frozen=True)
class Decision:
    path: Path
    prefill_engine: str | None  # None: Serve's router picks (always_split), or the path has no prefill engine
    decode_engine: str | None
    reason: str
    predicted_ttft_s: float | None = None


class Policy(Protocol):
    name: str

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision: ...


def _split_jsq(book: LoadBook, reason: str) -> Decision:
    return Decision(Path.SPLIT, book.least_loaded("prefill"), book.least_loaded("decode"), reason)


@dataclass
class AlwaysSplit:
    """Prefill then decode for every request; Serve's router picks the replicas (power of two choices)."""

    name: str = "always_split"

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision:
        return Decision(Path.SPLIT, None, None, "always split")


@dataclass
class TokenJSQ:
    """SplitwiseSim's join-the-shortest-queue: split, each pool's engine with the fewest pending tokens."""

    name: str = "token_jsq"

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision:
        return _split_jsq(book, "shortest queues")


@dataclass
class Conditional:
    """Dynamo's rule: a short prompt, or any prompt while prefill's queue is long, runs on decode."""

    config: SchedulingConfig
    name: str = "conditional"

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision:
        if request.num_prompt_tokens <= self.config.max_local_prompt_tokens:
            return Decision(Path.DECODE_LOCAL, None, book.least_loaded("decode"),
                            f"prompt of {request.num_prompt_tokens} tokens is short")
        prefill = book.least_loaded("prefill")
        queue = book.entry(prefill).num_requests if prefill is not None else 0
        if queue >= self.config.max_prefill_queue_requests:
            return Decision(Path.DECODE_LOCAL, None, book.least_loaded("decode"),
                            f"prefill's shortest queue holds {queue} requests")
        return Decision(Path.SPLIT, prefill, book.least_loaded("decode"), "long prompt, prefill free")


@dataclass
class MixedPool:
    """Splitwise's cluster scheduler. While every prefill engine has more than `borrow_tokens` pending, decode
    engines are borrowed, one per decision, into a mixed pool where they run whole requests; they go back once a
    prefill engine is under `return_tokens`. Symmetrically, prefill engines join while every decode engine holds
    more than `borrow_requests`. A request goes to the mixed pool when a mixed engine's queue is the shortest.

    A pool lends its last engine too: a lent engine keeps its own phase's work (a borrowed decode engine still
    decodes every split sent to it, a borrowed prefill engine still prefills them) and runs whole requests beside
    it. So on one prefill and one decode engine the policy can act at all (with the last engine kept, it split
    every request, as always_split does), and with both lent it balances whole requests over both engines, as
    collocated serving does, until the queues drain."""

    config: SchedulingConfig
    name: str = "mixed_pool"
    borrowed_decode: set[str] = field(default_factory=set)  # decode engines running prompts too
    borrowed_prefill: set[str] = field(default_factory=set)  # prefill engines decoding too

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision:
        self._rebalance(book)
        prefill = self._least_loaded(book, "prefill", self.borrowed_prefill)
        decode = self._least_loaded(book, "decode", self.borrowed_decode)
        mixed_decode = _least_of(book, self.borrowed_decode)
        if mixed_decode is not None and (prefill is None or book.drain_s(mixed_decode) < book.drain_s(prefill)):
            return Decision(Path.DECODE_LOCAL, None, mixed_decode, "prefill pool over its threshold: mixed pool")
        mixed_prefill = _least_of(book, self.borrowed_prefill)
        if mixed_prefill is not None and (decode is None or book.entry(mixed_prefill).num_requests
                                          < book.entry(decode).num_requests):
            return Decision(Path.PREFILL_LOCAL, mixed_prefill, None, "decode pool over its threshold: mixed pool")
        return Decision(Path.SPLIT, prefill, decode, "pools under their thresholds" if not (
            self.borrowed_decode or self.borrowed_prefill) else "split: the pools' own queues are the shortest")

    @staticmethod
    def _least_loaded(book: LoadBook, pool: Role, lent: set[str]) -> str | None:
        """The pool's least-loaded engine that is not lent, else (every one lent) its least-loaded engine."""
        return book.least_loaded(pool, skip=frozenset(lent)) or book.least_loaded(pool)

    def _rebalance(self, book: LoadBook) -> None:
        # Engines that are gone leave the mixed pool (O(borrowed), never O(engines)).
        self.borrowed_decode = {engine_id for engine_id in self.borrowed_decode if book.engine(engine_id)}
        self.borrowed_prefill = {engine_id for engine_id in self.borrowed_prefill if book.engine(engine_id)}
        # The shortest queue of a pool says whether all of it is over the threshold: O(log engines).
        prefill = self._least_loaded(book, "prefill", self.borrowed_prefill)
        shortest_tokens = book.entry(prefill).num_pending_prompt_tokens if prefill is not None else 0
        if prefill is not None and shortest_tokens > self.config.borrow_tokens:
            lender = book.least_loaded("decode", skip=frozenset(self.borrowed_decode))
            if lender is not None:
                self.borrowed_decode.add(lender)
        elif shortest_tokens < self.config.return_tokens:
            self.borrowed_decode.clear()
        decode = self._least_loaded(book, "decode", self.borrowed_decode)
        shortest_requests = book.entry(decode).num_requests if decode is not None else 0
        if decode is not None and shortest_requests > self.config.borrow_requests:
            lender = book.least_loaded("prefill", skip=frozenset(self.borrowed_prefill))
            if lender is not None:
                self.borrowed_prefill.add(lender)
        elif shortest_requests < self.config.return_requests:
            self.borrowed_prefill.clear()


def _least_of(book: LoadBook, members: set[str]) -> str | None:
    """The least-loaded engine among a (small) borrowed set."""
    live = [engine_id for engine_id in members if book.engine(engine_id) is not None]
    return min(live, key=lambda engine_id: (book.drain_s(engine_id), book.entry(engine_id).num_requests),
               default=None)


@dataclass
class Predictive:
    """Ours: the path with the lowest predicted TTFT whose decode streams stay within the TBT bounds.

    split:         max(drain(P) + prefill(P, n) + hand-over(D, n, requests ahead on D), drain(D)) + one decode
                   step on D (the first token waits for the prompts D is computing: its local ones)
    decode-local:  drain(D) + prefill(D, n) + D's decode steps that carry the prompt's chunks, allowed only if
                   those steps keep D's gaps within `tbt_gap_slowdown` of D's own step and what the prompt adds to
                   its running requests' mean gap within `tbt_mean_slowdown` - 1 of it (a chunk charged as a
                   request, or its compute only: `tbt_guard_charge`); the stream itself is not charged, since it
                   joins D's batch on the split path too
    prefill-local: drain(P) + prefill(P, n) + P's steps that carry the prompt's chunks, when P computes no prompt
                   now and one more stream there stays within the mean bound of P's own step: a stream on P waits
                   out every prompt P computes during its life, so its mean gap is P's step / (1 - the share of P's
                   time its prompts took lately). So at light load the two engines share the streams, as collocated
                   serving does, and each prompt goes where it starts soonest; under load P's prompts close it.
                   (Allowed only while decode could not take one more stream, the policy left prefill idle at light
                   load: 66-78% of prompts on decode beside its streams, 2-4% prefill-local, TTFT p50 1.08-1.35x
                   and TBT p50 1.13-1.16x collocated's at conv 0.39/s and code 0.42/s; bench/results/asleep_light.
                   Without the busy-share guard the default run's worst streams were prefill-local, per-request
                   mean gaps 0.86-0.92 s at code 0.48-0.9/s, 3eb988b.)
    The guard yields where the split is late: when the split's TTFT is predicted past `split_late_slowdown` times
    its TTFT on idle engines (Splitwise's P90 TTFT bound, 3x) and a decode engine would start the prompt within
    that, decode-local is offered whatever the streams' bounds say (`is_gap_bound_kept_on_yield`: whatever the
    mean bound says, the gap bound still holding). A prompt that would miss its TTFT bound on the split is saved
    at a price its streams' gaps pay; one that decode could not save either leaves them be.
    Until the rates are known it acts as token_jsq, which is how it learns them."""

    config: SchedulingConfig
    # What a decode engine computes of one prompt per step beside its streams (vLLM's long_prefill_token_threshold,
    # else its max_num_batched_tokens): the chunk whose step the TBT guard weighs.
    chunk_tokens: int = 256
    prefill_chunk_tokens: int = 2048  # the same, on prefill engines (for a prompt beside a prefill-local stream)
    expected_output_tokens: float = 128.0  # learned from finished requests (`observe_output`)
    name: str = "predictive"

    def observe_output(self, num_output_tokens: int) -> None:
        self.expected_output_tokens += (num_output_tokens - self.expected_output_tokens) / 32

    def decide(self, request: RequestFacts, book: LoadBook, rates: Rates) -> Decision:
        if not rates.is_known():
            return _split_jsq(book, "learning the rates (token JSQ)")
        n = request.num_prompt_tokens
        # Each path's (predicted TTFT, prefill engine, decode engine); the Decision is made for the winner only.
        options: list[tuple[float, Path, str | None, str | None]] = []
        # The decode engines in drain order, of which the first is the split's (one pass over the heap for both).
        candidates = book.first_loaded("decode", NUM_GUARDED_CANDIDATES)
        prefill, decode = book.least_loaded("prefill"), candidates[0] if candidates else None
        # Where the split's first token misses its TTFT bound (`split_late_slowdown`): the bound; else None.
        late_after_s: float | None = None
        if prefill is not None and decode is not None:
            num_ahead = book.entry(decode).num_requests
            kv_ready_s = book.drain_s(prefill) + rates.prefill_s(prefill, n) + rates.handover_s(decode, n, num_ahead)
            ttft = max(kv_ready_s, book.drain_s(decode)) + rates.decode_step_s(decode, num_ahead + 1)
            options.append((ttft, Path.SPLIT, prefill, decode))
            if self.config.split_late_slowdown is not None:
                bound_s = self.config.split_late_slowdown * self._idle_split_s(prefill, decode, n, rates)
                late_after_s = bound_s if ttft > bound_s else None
        is_guard_yielded = False
        for candidate in candidates:
            ttft = book.drain_s(candidate) + rates.prefill_s(candidate, n) + self._chunk_steps_s(candidate, n,
                                                                                              book, rates)
            if self._decode_can_take(candidate, n, book, rates):
                options.append((ttft, Path.DECODE_LOCAL, None, candidate))
                break  # candidates come in drain order: the first that passes has the lowest TTFT of them
            # The split misses the prompt's TTFT bound and decode would meet it: the streams' guard yields, once
            # per prompt it saves (on the code trace, 2 cores, the guard otherwise left prompts queued on prefill
            # for tens of seconds while decode's streams kept their gaps: saturation 0.70x collocated's).
            if late_after_s is not None and ttft <= late_after_s and (
                    not self.config.is_gap_bound_kept_on_yield or self._keeps_gap_bound(candidate, n, book, rates)):
                options.append((ttft, Path.DECODE_LOCAL, None, candidate))
                is_guard_yielded = True
                break
        if prefill is not None and self._prefill_can_decode(prefill, book, rates) and (
                self.config.prefill_local == "idle" or decode is None
                or not self._decode_can_stream(decode, book, rates)):
            ttft = book.drain_s(prefill) + rates.prefill_s(prefill, n) + self._chunk_steps_s(
                prefill, n, book, rates, chunk_tokens=self.prefill_chunk_tokens)
            options.append((ttft, Path.PREFILL_LOCAL, prefill, None))
        if not options:
            return _split_jsq(book, "no path predicted")
        best = options[0]
        for option in options[1:]:  # ties go to the split, then decode-local: the order they were added in
            if option[0] < best[0]:
                best = option
        ttft, path, prefill_engine, decode_engine = best
        reason = "split late, TBT guard yields" if path == Path.DECODE_LOCAL and is_guard_yielded \
            else "lowest predicted TTFT"
        return Decision(path, prefill_engine, decode_engine, reason, ttft)

    @staticmethod
    def _idle_split_s(prefill: str, decode: str, num_tokens: int, rates: Rates) -> float:
        """The split's TTFT on idle engines: what the prompt's TTFT bound is a multiple of."""
        return rates.prefill_s(prefill, num_tokens) + rates.handover_s(decode, num_tokens, 0) \
            + rates.decode_step_s(decode, 1)

    def _chunk_steps_s(self, engine_id: str, num_tokens: int, book: LoadBook, rates: Rates, *,
                       chunk_tokens: int | None = None) -> float:
        """What running streams add to a local prompt: each step that carries one of its chunks decodes them too."""
        running = book.entry(engine_id).num_requests
        num_chunks = -(-num_tokens // (chunk_tokens or self.chunk_tokens))
        return 0.0 if running == 0 else num_chunks * rates.decode_step_s(engine_id, running)

    def _decode_can_take(self, engine_id: str, num_tokens: int, book: LoadBook, rates: Rates) -> bool:
        running = book.entry(engine_id).num_requests
        if running == 0:
            return True  # no stream to slow down: only this request's own TTFT, which the prediction weighs
        base = rates.decode_step_s(engine_id, 1)
        if base <= 0:
            return False
        if not self._is_within_gap_bound(engine_id, running, min(num_tokens, self.chunk_tokens), rates):
            return False
        # The prompt's compute (and that of the prompts already pending there), spread over a running request's
        # expected output: what each of its tokens waits longer on average. Only that is this path's to answer
        # for: the new stream joins a decode engine's batch on either path (the split's decode runs there too), so
        # the batch's own step is no reason to send a prompt to the prefill queue. Charging it was: with a few
        # streams running the step alone passed 1.25x, every prompt was split however small, and in the policies
        # run (f5fcfff) every code request whose TTFT went past 3x its reference was a split prompt of 9-88 tokens
        # waiting behind a long one on prefill (TTFT P99 slowdown 23.8-45.9 at code 0.42-0.84/s).
        pending = num_tokens + book.entry(engine_id).num_pending_prompt_tokens
        extra_per_token = self._chunk_cost_s(engine_id, pending, rates) / max(1.0, self.expected_output_tokens)
        return extra_per_token <= (self.config.tbt_mean_slowdown - 1) * base

    def _keeps_gap_bound(self, engine_id: str, num_tokens: int, book: LoadBook, rates: Rates) -> bool:
        """The step that would carry the prompt's first chunk, with the prompts already waiting on the engine (vLLM
        batches them into the same step, up to its token budget), stays within the gap bound of its own
        single-stream step."""
        engine = book.entry(engine_id)
        chunk = min(num_tokens + engine.num_pending_prompt_tokens, self.chunk_tokens)
        return engine.num_requests == 0 or self._is_within_gap_bound(engine_id, engine.num_requests, chunk, rates)

    def _is_within_gap_bound(self, engine_id: str, num_running: int, chunk_tokens: int, rates: Rates) -> bool:
        """A step of the engine's streams and one more, carrying `chunk_tokens` of a prompt, within the gap bound of
        its single-stream step."""
        step_with_chunk = rates.decode_step_s(engine_id, num_running + 1) + self._chunk_cost_s(engine_id, chunk_tokens,
                                                                                               rates)
        return step_with_chunk <= self.config.tbt_gap_slowdown * rates.decode_step_s(engine_id, 1)

    def _chunk_cost_s(self, engine_id: str, num_tokens: int, rates: Rates) -> float:
        if self.config.tbt_guard_charge == "compute":
            return rates.prompt_compute_s(engine_id, num_tokens)
        return rates.prefill_s(engine_id, num_tokens)

    def _decode_can_stream(self, engine_id: str, book: LoadBook, rates: Rates) -> bool:
        """One more stream keeps the decode engine's step within the mean bound of its own single-stream step."""
        return self._one_more_stream_fits(engine_id, book, rates, busy_share=0.0)

    def _one_more_stream_fits(self, engine_id: str, book: LoadBook, rates: Rates, *, busy_share: float) -> bool:
        """The engine's step with one more stream, stretched by the share of its time prompts take, stays within
        the mean bound of its own single-stream step."""
        base = rates.decode_step_s(engine_id, 1)
        step = rates.decode_step_s(engine_id, book.entry(engine_id).num_requests + 1)
        return step / (1 - busy_share) <= self.config.tbt_mean_slowdown * base

    def _prefill_can_decode(self, engine_id: str, book: LoadBook, rates: Rates) -> bool:
        """P computes no prompt now, and one more stream there keeps its mean gap, its step stretched by the share
        of its time prompts took lately, within the mean bound of its own single-stream step."""
        engine = book.entry(engine_id)
        if engine.num_pending_prompt_tokens > 0:
            return False
        base = rates.decode_step_s(engine_id, 1)  # its own step, or its peers' until it has one
        if base <= 0:
            return False
        busy_share = self.prompt_busy_share(engine_id, book, rates)
        return busy_share < 1 and self._one_more_stream_fits(engine_id, book, rates, busy_share=busy_share)

    @staticmethod
    def prompt_busy_share(engine_id: str, book: LoadBook, rates: Rates) -> float:
        """The share of the engine's time its prompts took lately: its prompt throughput times the compute a prompt
        token adds to a step (a stream's step stretches by that compute, not by a request's fixed cost)."""
        return rates.prompt_compute_s(engine_id, book.prompt_tokens_per_s(engine_id))


def make_policy(config: SchedulingConfig, *, decode_chunk_tokens: int = 256,
                prefill_chunk_tokens: int = 2048) -> Policy:
    """`*_chunk_tokens`: what each pool's engines compute of one prompt per step beside their streams."""
    policies: dict[str, Callable[[], Policy]] = {"always_split": lambda: AlwaysSplit(), "token_jsq": lambda: TokenJSQ(),
                "conditional": lambda: Conditional(config), "mixed_pool": lambda: MixedPool(config),
                "predictive": lambda: Predictive(config, chunk_tokens=decode_chunk_tokens,
                                                     prefill_chunk_tokens=prefill_chunk_tokens)}
    return policies[config.policy]()
