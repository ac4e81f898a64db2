"""One engine in the simulation: SplitwiseSim's machine-level scheduling, as vLLM's scheduler does it.

A request's life on a machine:
1. It arrives with a prompt to compute (`add_prompt`: a split's prefill, or a whole request) or with its prompt's
   KV handed over (`add_decode`: a split's decode side; loaded in step, its KV moves inside the iteration that
   computes it). Prompts wait first come, first served; a handed-over request joins the running batch as soon as
   its KV fits in memory.
2. Each iteration (`plan_iteration`) runs every running sequence for one token, then fills the rest of the token
   budget (`max_batch_tokens`) with chunks of the waiting prompts in order (chunked prefill; no prompt passes one
   that does not fit). KV memory is counted in tokens: a chunk reserves its tokens, a decode step one per sequence.
   When the running sequences cannot all grow, the newest is preempted: its KV is freed and its prompt and the
   tokens it had are computed again (vLLM's recompute), at most `max_preemptions` times per request; a request at
   the cap keeps its KV and sits the iteration out instead, unless nothing at all could run (then it goes too).
3. At the iteration's end (`finish_iteration`) every sequence has its token; a prompt whose last chunk ran either
   leaves for the hand-over (a split's prefill machine: its KV stays until the transfer is done, `release`) or
   samples its first token and joins the running batch. A request with all its tokens frees its KV.
The machine never looks at the clock: the simulator tells it when an iteration ends.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum

from bench.sim.config import MachineConfig
from bench.sim.model import PerfModel, prompt_pairs
from deployments.scheduling.loads import Role


@dataclass(slots=True, eq=False)
class SimRequest:
    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int
    path: str = ""
    prefill_machine: int = -1  # index of the machine that computed (or computes) its prompt for a split
    num_to_compute: int = 0  # prompt tokens to compute where it runs now (prompt + tokens after a preemption)
    num_computed: int = 0
    num_generated: int = 0
    kv_tokens: int = 0  # KV it holds on the machine it runs on now
    handover_kv_tokens: int = 0  # a split's KV its prefill machine holds until the hand-over is done (`release`)
    num_preemptions: int = 0
    prompt_start_s: float | None = None  # its prompt's first chunk ran (SplitwiseSim's queue time ends)
    first_token_s: float | None = None
    last_token_s: float | None = None
    done_s: float | None = None
    gaps_s: list[float] | None = None  # every gap between tokens, where the simulation keeps them
    # What the router remembers of it, to observe it (the simulator's, as deployments/scheduler.py's Flight).
    predicted_ttft_s: float | None = None
    times_prefill_of: str = ""  # the engine whose prefill rate it measures (the engine was idle when it was sent)
    prefilled_s: float | None = None  # a split's prefill answer (its KV handle)
    decode_engine: str = ""  # a split's decode engine: the policy's, or Serve's pick once prefill answered
    num_ahead: int = 0  # requests already on the decode engine when the split's decode call went out
    is_aborted: bool = False  # the client gave up on it (its timeout): it leaves whatever it was doing
    on_machine: int = -1  # index of the machine it was last given to (a split in hand-over: still prefill's)
    num_load_steps: int = 0  # iterations of its decode machine to end before its loaded KV can be scheduled
    load_s: float = 0.0  # its KV's load inside the decode iteration that computes it: that iteration waits it out


class Outcome(IntEnum):
    PREFILLED = 0  # a split's prompt is computed: its KV leaves for the decode machine
    LOADED = 1  # a split's KV was loaded inside this iteration: the prefill machine may free it
    FIRST_TOKEN = 2
    DONE = 3


@dataclass(slots=True)
class IterationStats:
    num_iterations: int = 0
    busy_s: float = 0.0
    num_prompt_tokens: int = 0
    num_decode_tokens: int = 0  # tokens of decode steps
    num_prompt_samples: int = 0  # tokens sampled by the iteration that finished a prompt (or its recompute)
    num_preemptions: int = 0
    peak_kv_tokens: int = 0


@dataclass(eq=False)
class Machine:
    index: int
    engine_id: str
    role: Role  # "prefill" or "decode": the pool the scheduler sees it in
    config: MachineConfig
    model: PerfModel
    keeps_gaps: bool = True
    waiting: deque[SimRequest] = field(default_factory=deque)  # prompts to compute, first come first served
    arrived: deque[SimRequest] = field(default_factory=deque)  # handed-over KV waiting for memory
    running: list[SimRequest] = field(default_factory=list)  # decoding, oldest first
    kv_used: int = 0
    num_pending_prompt_tokens: int = 0
    is_busy: bool = False
    stats: IterationStats = field(default_factory=IterationStats)
    # The iteration in flight: the sequences it extends, the prompt chunks it computes, how long it takes.
    _decoding: list[SimRequest] = field(default_factory=list)
    _chunks: list[tuple[SimRequest, int]] = field(default_factory=list)
    _num_partial: int = 0  # waiting prompts with some of their tokens computed: sequences in vLLM's batch
    last_step_s: float = 0.0  # the iteration in flight (or the last one): its time and what it holds
    last_num_decoding: int = 0
    last_num_prompt_tokens: int = 0
    can_fast_forward: bool = True  # pure decode iterations as one segment (same times, fewer events)
    version: int = 0  # bumped when the iteration in flight is cut short: the event of its old end is stale
    _segment_start_s: float = 0.0
    _num_steps: int = 1
    _first_step_s: float = 0.0
    _stretch: float = 1.0
    _share_stretch: float = 1.0  # the iteration in flight's stretch now (its core's share may change midway)
    _aborting: list[SimRequest] = field(default_factory=list)  # aborted in the iteration in flight: out at its end
    _loading: list[SimRequest] = field(default_factory=list)  # KV loaded inside the iteration in flight

    # 1. Arrivals.
    def add_prompt(self, request: SimRequest) -> None:
        request.on_machine = self.index
        request.num_to_compute, request.num_computed = request.prompt_tokens + request.num_generated, 0
        self.waiting.append(request)
        self.num_pending_prompt_tokens += request.num_to_compute

    def add_decode(self, request: SimRequest) -> None:
        """A split's decode call has reached this machine. Loaded in the background (`kv_load_steps` ≥ 1), its KV
        is here already (the hand-over ran before the call), and a busy engine ends the iteration in flight, then
        runs `kv_load_steps` more before scheduling it; an idle one loads it at once (its empty steps poll the load
        within milliseconds). Loaded in step (`kv_load_steps` 0), the iteration that computes it first waits out
        the hand-over (`load_s`): every sequence of that iteration waits with it, as decode's streams wait out a
        READ inside the step."""
        request.on_machine = self.index
        request.num_load_steps = 1 + self.config.kv_load_steps if self.is_busy and self.config.kv_load_steps else 0
        request.load_s = 0.0 if self.config.kv_load_steps else self.model.handover_s(request.prompt_tokens)
        self.arrived.append(request)

    def abort(self, request: SimRequest) -> None:
        """Its client gave up: it leaves the machine and frees its KV, as vLLM aborts a request between two steps
        (one in the iteration in flight leaves at that iteration's end). A split's KV held for its hand-over is the
        simulator's to release (`release`)."""
        request.is_aborted = True
        if self.is_busy and (request in self._decoding or any(chunk[0] is request for chunk in self._chunks)):
            self._aborting.append(request)
            return
        self._remove(request)

    def _remove(self, request: SimRequest) -> None:
        if request in self.running:
            self.running.remove(request)
        elif request in self.arrived:
            self.arrived.remove(request)
            return  # its KV was counted on no machine yet (the prefill machine holds it)
        elif request in self.waiting:
            self.waiting.remove(request)
            self.num_pending_prompt_tokens -= request.num_to_compute - request.num_computed
            self._num_partial -= request.num_computed > 0
        else:
            return  # done, or handed over: nothing of it here
        self.kv_used -= request.kv_tokens
        request.kv_tokens = 0

    def release(self, request: SimRequest) -> None:
        """A split's KV has reached the decode machine (or never will): the prefill machine frees it."""
        self.kv_used -= request.handover_kv_tokens
        request.handover_kv_tokens = 0

    @property
    def num_requests(self) -> int:
        return len(self.waiting) + len(self.arrived) + len(self.running)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.arrived or self.running)

    @property
    def num_steps_in_flight(self) -> int:
        return self._num_steps

    @property
    def free_kv(self) -> int:
        return self.config.kv_capacity_tokens - self.kv_used

    # 2. One iteration.
    def plan_iteration(self, now: float = 0.0, stretch: float = 1.0) -> float | None:
        """Forms the next batch and returns how long it runs; None when there is nothing it can run.

        Pure decode with no prompt waiting runs as one segment of k iterations up to the first sequence's last
        token, each iteration timed as its own (the KV read grows a token per sequence per iteration): the same
        times as k single iterations, at the cost of one event. Handed-over KV waiting for memory or a sequence
        slot does not stop a segment: what it waits for (a sequence that ends and frees both) comes only at the
        segment's end, since until then every sequence grows and none leaves. A request that arrives meanwhile
        cuts the segment at the iteration in flight (`cut`). `stretch`: how much longer each iteration
        takes than the model's line (another machine of its host computing as the segment starts)."""
        if self.arrived and not self.running and not self.waiting:
            for request in self.arrived:  # nothing else to compute: the engine's empty steps see the loads done
                request.num_load_steps = 0
        while self.arrived and not self.arrived[0].num_load_steps and len(self.running) < self.config.max_num_seqs \
                and self.free_kv >= self.arrived[0].prompt_tokens + 1:
            request = self.arrived.popleft()
            request.kv_tokens = request.prompt_tokens
            self.kv_used += request.kv_tokens
            self.running.append(request)
            if request.load_s:
                self._loading.append(request)
        while True:
            decoding = self._grow_running()
            chunks = self._prompt_chunks(len(decoding), now) if self.waiting else []
            if decoding or chunks or not self._make_room():
                break
        if not decoding and not chunks:
            return None
        num_decoding = len(decoding)
        self.kv_used += num_decoding  # each sequence's next token
        num_steps = 1
        num_context_tokens = 0
        is_loading = bool(self.arrived) and self.arrived[-1].num_load_steps > 0  # (the newest loads longest)
        if self.can_fast_forward and not chunks and not self.waiting and num_decoding == len(self.running) \
                and not is_loading:
            # One pass for what the segment needs: its first sequence to end, whether a first token is due (a
            # handed-over request's first token is its own event: the router observes it) and the KV it reads.
            num_steps = self.config.kv_capacity_tokens
            for request in decoding:
                num_left = request.output_tokens - request.num_generated
                if num_left < num_steps:
                    num_steps = num_left
                if request.num_generated == 0:
                    num_steps = 0
                num_context_tokens += request.kv_tokens
            num_steps = max(1, min(num_steps, 1 + self.free_kv // num_decoding))
            self.kv_used += (num_steps - 1) * num_decoding
        else:
            num_context_tokens = sum(request.kv_tokens for request in decoding)
        if self.kv_used > self.stats.peak_kv_tokens:
            self.stats.peak_kv_tokens = self.kv_used
        if chunks:
            num_prompt_tokens = sum(chunk for _, chunk in chunks)
            # Attention's pairs: a chunk attends to the prompt's tokens computed before it and to its own.
            num_prompt_pairs = sum(prompt_pairs(chunk, request.num_computed) for request, chunk in chunks)
        else:
            num_prompt_tokens = num_prompt_pairs = 0
        self._decoding, self._chunks = decoding, chunks
        self.last_num_decoding, self.last_num_prompt_tokens = num_decoding, num_prompt_tokens
        self._segment_start_s, self._num_steps = now, num_steps
        self._stretch = self._share_stretch = stretch
        self._first_step_s = stretch * self.model.step_s(num_prompt_tokens, num_decoding, num_context_tokens,
                                                         num_prompt_pairs)
        for request in self._loading:  # (a loading request samples its first token here: a segment of one step)
            self._first_step_s += request.load_s
        self.last_step_s = self._steps_s(num_steps)
        self.is_busy = True
        return self.last_step_s

    def _steps_s(self, num_steps: int) -> float:
        """The first `num_steps` iterations of the segment: each reads one more token per sequence than the last."""
        growth = self._stretch * self.model.context_token_s * self.last_num_decoding
        return num_steps * self._first_step_s + growth * num_steps * (num_steps - 1) / 2

    def cut(self, now: float) -> float | None:
        """A request arrived while a segment runs: it ends after the iteration in flight now. Returns the new end
        (the simulator's event for the old one goes stale: `version`), None if nothing changes."""
        if not self.is_busy or self._num_steps == 1:
            return None
        elapsed, done = now - self._segment_start_s, 0
        while done < self._num_steps and self._steps_s(done + 1) <= elapsed:
            done += 1
        num_steps = min(self._num_steps, done + 1)
        if num_steps == self._num_steps:
            return None
        self.kv_used -= (self._num_steps - num_steps) * self.last_num_decoding
        self._num_steps = num_steps
        self.last_step_s = self._steps_s(num_steps)
        self.version += 1
        return self._segment_start_s + self.last_step_s

    def reshare(self, now: float, stretch: float) -> float | None:
        """Another machine on this one's core started or stopped computing at `now`: the segment ends after the
        iteration in flight (as `cut`), and that iteration's rest runs at the new share of the core (`stretch` over
        the one it had: processor sharing). Returns the new end, None if nothing changes."""
        if not self.is_busy:
            return None
        is_cut = self.cut(now) is not None
        end = self._segment_start_s + self.last_step_s
        if stretch == self._share_stretch or end <= now:
            return end if is_cut else None
        end = now + (end - now) * stretch / self._share_stretch
        self._share_stretch = stretch
        self.last_step_s = end - self._segment_start_s
        self.version += 1
        return end

    def _prompt_chunks(self, num_decoding: int, now: float) -> list[tuple[SimRequest, int]]:
        """The waiting prompts' chunks, in order, within the token budget, the sequence cap and memory."""
        config = self.config
        budget = config.max_batch_tokens - num_decoding
        num_sequences = len(self.running) + self._num_partial
        chunks: list[tuple[SimRequest, int]] = []
        for request in self.waiting:
            if budget <= 0:
                break
            if request.num_computed == 0:
                if num_sequences >= config.max_num_seqs:
                    break
                num_sequences += 1
            chunk = min(request.num_to_compute - request.num_computed, budget, self.free_kv - num_decoding,
                        config.long_prefill_token_threshold or budget)
            if chunk <= 0:
                break  # first come, first served: nothing passes a prompt that does not fit
            chunks.append((request, chunk))
            if request.prompt_start_s is None:
                request.prompt_start_s = now
            self.kv_used += chunk
            request.kv_tokens += chunk
            budget -= chunk
        return chunks

    def _make_room(self) -> bool:
        """Nothing can run: half-computed prompts or sequences at the preemption cap hold the memory the others
        need. The newest half-computed prompt gives its KV back and starts over, else the newest running sequence
        is preempted whatever its count (without this the machine would wait forever). False: nothing to free."""
        victim = next((request for request in reversed(self.waiting) if request.num_computed > 0), None)
        if victim is not None:
            self.kv_used -= victim.kv_tokens
            self.num_pending_prompt_tokens += victim.num_computed
            victim.kv_tokens, victim.num_computed = 0, 0
            self._num_partial -= 1
        elif self.running:
            self._preempt(self.running[-1])
        else:
            return False
        self.stats.num_preemptions += 1
        return True

    def _grow_running(self) -> list[SimRequest]:
        """The running sequences that grow this iteration: the newest are preempted until the rest fit."""
        decoding = list(self.running)
        while len(decoding) > self.config.kv_capacity_tokens - self.kv_used:  # (free_kv, without a call)
            victim = next((request for request in reversed(decoding)
                           if request.num_preemptions < self.config.max_preemptions), None)
            if victim is None:
                decoding.pop()  # every candidate is at the cap: the newest keeps its KV and waits a turn
                continue
            decoding.remove(victim)
            self._preempt(victim)
            self.stats.num_preemptions += 1
        return decoding

    def _preempt(self, victim: SimRequest) -> None:
        """vLLM's recompute: the KV is freed; its prompt and the tokens it had are computed again, first in line."""
        self.running.remove(victim)
        self.kv_used -= victim.kv_tokens
        victim.kv_tokens = 0
        victim.num_preemptions += 1
        victim.load_s = 0.0  # its loaded KV is gone too: computed again, nothing to load
        victim.num_to_compute, victim.num_computed = victim.prompt_tokens + victim.num_generated, 0
        self.waiting.appendleft(victim)
        self.num_pending_prompt_tokens += victim.num_to_compute

    # 3. Its end.
    def finish_iteration(self, now: float) -> list[tuple[Outcome, SimRequest]]:
        outcomes: list[tuple[Outcome, SimRequest]] = []
        if self._loading:  # first, so that the prefill machine frees the KV before what follows
            outcomes += [(Outcome.LOADED, request) for request in self._loading]
            for request in self._loading:
                request.load_s = 0.0
            self._loading = []
        stats = self.stats
        num_steps = self._num_steps
        stats.num_iterations += num_steps
        stats.busy_s += self.last_step_s
        # The end of each iteration of the segment (one, unless pure decode ran several).
        ends = [self._segment_start_s + self._steps_s(step) for step in range(1, num_steps)] + [now] \
            if num_steps > 1 and self.keeps_gaps else None
        if self.keeps_gaps:
            for request in self._decoding:
                request.kv_tokens += num_steps
                if num_steps > 1:
                    self._tokens(request, num_steps, ends)
                self._token(request, now, outcomes)
        else:  # `_tokens` then `_token` with no gaps to keep, spelled out: a large run's innermost loop
            for request in self._decoding:
                request.kv_tokens += num_steps
                request.num_generated += num_steps
                if request.first_token_s is None:
                    request.first_token_s = now
                    outcomes.append((Outcome.FIRST_TOKEN, request))
                request.last_token_s = now
                if request.num_generated >= request.output_tokens:
                    self._done(request, now, outcomes)
        stats.num_decode_tokens += num_steps * len(self._decoding)
        for request, chunk in self._chunks:
            was_partial = request.num_computed > 0
            request.num_computed += chunk
            self.num_pending_prompt_tokens -= chunk
            stats.num_prompt_tokens += chunk
            if request.num_computed < request.num_to_compute:
                self._num_partial += not was_partial
                continue
            self._num_partial -= was_partial
            self.waiting.remove(request)
            if request.path == "split" and request.prefill_machine == self.index:
                outcomes.append((Outcome.PREFILLED, request))  # its KV stays until the hand-over is done
                request.handover_kv_tokens, request.kv_tokens = request.kv_tokens, 0
                continue
            # The iteration that computes a prompt's last token samples the next one (its KV is written by the
            # next step, which reserves it).
            self.running.append(request)
            stats.num_prompt_samples += 1
            self._token(request, now, outcomes)
        self._decoding, self._chunks = [], []
        self.is_busy = False
        for request in self.arrived:  # (a few at most: handed-over KV not yet scheduled)
            if request.num_load_steps:
                request.num_load_steps -= 1
        if self._aborting:  # what its client gave up on during the iteration leaves now, with no outcome
            aborted, self._aborting = self._aborting, []
            for request in aborted:
                if request.path == "split" and request.prefill_machine == self.index \
                        and request.num_computed >= request.num_to_compute:
                    self.release(request)  # prefilled in this very iteration: no hand-over will take its KV
                else:
                    self._remove(request)
            # (a load that ran still frees the prefill machine's KV)
            outcomes = [outcome for outcome in outcomes if not outcome[1].is_aborted or outcome[0] == Outcome.LOADED]
        return outcomes

    def _tokens(self, request: SimRequest, num_steps: int, ends: list[float] | None) -> None:
        """All but the last token of a segment (the last one goes through `_token`, which ends the request)."""
        request.num_generated += num_steps - 1
        if ends is not None and request.last_token_s is not None:  # (set: a segment decodes after a first token)
            if request.gaps_s is None:
                request.gaps_s = []
            request.gaps_s += [end - previous for previous, end in zip([request.last_token_s, *ends[:-2]], ends[:-1])]
            request.last_token_s = ends[-2]

    def _token(self, request: SimRequest, now: float, outcomes: list[tuple[Outcome, SimRequest]]) -> None:
        request.num_generated += 1
        if request.first_token_s is None:
            request.first_token_s = now
            outcomes.append((Outcome.FIRST_TOKEN, request))
        elif self.keeps_gaps and request.last_token_s is not None:
            if request.gaps_s is None:
                request.gaps_s = []
            request.gaps_s.append(now - request.last_token_s)
        request.last_token_s = now
        if request.num_generated >= request.output_tokens:
            self._done(request, now, outcomes)

    def _done(self, request: SimRequest, now: float, outcomes: list[tuple[Outcome, SimRequest]]) -> None:
        """Its last token is out: it leaves the batch and frees its KV."""
        request.done_s = now
        self.running.remove(request)
        self.kv_used -= request.kv_tokens
        request.kv_tokens = 0
        outcomes.append((Outcome.DONE, request))
