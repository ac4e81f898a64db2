"""The simulation: a trace's requests through a cluster of machines, decided by the live router's policy code.

A request's life:
1. It arrives at its trace time. The policy (deployments/scheduling/policies.py, the object `make_policy` builds
   for the router) sees what a live router sees, the prompt's size and never its output length, and the same
   LoadBook and Rates, and chooses the path and machines. Where it leaves a machine to Serve (always_split), the
   machine is Serve's power-of-two choice on requests held.
2. split: the prefill machine computes the prompt; its KV moves to the decode machine (the model's hand-over time,
   and the served split path's latency: the router's second call) and is freed on the prefill machine once there;
   the decode machine streams every token. A decode machine that loads in step (`kv_load_steps` 0, the app's
   default) gets the call after the served path's latency alone and moves the KV inside the iteration that
   computes the request, which waits it out; the prefill machine frees it at that iteration's end. decode-local
   and prefill-local: one machine computes the prompt and streams.
3. Each machine runs iteration after iteration while it has work (machine.py); an iteration's end is an event.
4. What the router observes feeds the rates as the router feeds them (deployments/scheduler.py): a prompt sent to
   an idle engine times its prefill, a split's decode call to first token its hand-over, pure decode steps the
   step line, finished requests the policy's output length. Loads reach the book as each machine changes (one
   router, so its view is exact), and the book is re-keyed under the current rates once per
   `scheduling.load_report_period_s` of simulated time, as the router does when reports come.
5. Every request ends as a bench `RequestRecord` (times from its arrival), so bench.result_files writes the same
   CSVs and SLO arithmetic as a measured run. The served path's own latency (the model's `served_request_s`: the
   proxy, router and replica between a client and its engine) is added to its first token and end; it holds no
   engine, so no machine waits on it.
"""

from __future__ import annotations

import gc
import heapq
import random
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from bench.load_generator import RequestRecord
from bench.sim.config import MachineConfig, SimConfig
from bench.sim.machine import Machine, Outcome, SimRequest
from bench.sim.model import PerfModel
from bench.traces import TraceRequest
from deployments.scheduling.loads import EngineLoad, LoadBook, Role
from deployments.scheduling.policies import Path, Policy, RequestFacts, make_policy
from deployments.scheduling.rates import Rates

_ITERATION_END, _KV_ARRIVED, _CLIENT_GAVE_UP = 0, 1, 2


@dataclass
class SimResult:
    records: list[RequestRecord]
    requests: list[SimRequest]
    machines: list[Machine]
    model: PerfModel
    decisions: Counter = field(default_factory=Counter)
    num_events: int = 0
    wall_s: float = 0.0
    simulated_s: float = 0.0


class Simulator:
    def __init__(self, config: SimConfig, *, model: PerfModel | None = None, policy: Policy | None = None,
                 can_fast_forward: bool = True) -> None:
        self.config = config
        self.model = model or config.perf_model()
        cluster = config.cluster
        self.is_collocated = cluster.mode == "collocated"
        decode: list[tuple[Role, MachineConfig]] = [("decode", cluster.decode)] * cluster.num_decode
        prefill: list[tuple[Role, MachineConfig]] = [("prefill", cluster.prefill)] * cluster.num_prefill
        roles = decode if self.is_collocated else prefill + decode
        self.machines = [Machine(index=index, engine_id=f"{role}-{index}", role=role, config=machine_config,
                                 model=self.model, keeps_gaps=config.keeps_token_gaps,
                                 can_fast_forward=can_fast_forward)
                         for index, (role, machine_config) in enumerate(roles)]
        self.by_engine = {machine.engine_id: machine for machine in self.machines}
        # Each machine's host-mates (hosts of machines_per_host machines, in index order) on other cores: an
        # iteration that starts while one of them computes is stretched by the model's shared_host_slowdown (none
        # listed without a slowdown to apply, so that a large run pays nothing for it). Its core-mates
        # (`host_cores`) share its core: while k machines of a core compute, each runs at 1/k of its speed.
        per_host, cores = cluster.machines_per_host, cluster.host_cores
        self._host_mates: list[list[Machine]] = []
        self._core_mates: list[list[Machine]] = []
        for machine in self.machines:
            first = machine.index - machine.index % per_host
            host = [mate for mate in self.machines[first:first + per_host] if mate is not machine]
            same_core = [mate for mate in host
                         if cores and cores[mate.index - first] == cores[machine.index - first]]
            self._core_mates.append(same_core)
            self._host_mates.append([mate for mate in host if mate not in same_core]
                                    if self.model.shared_host_slowdown else [])
        # Whether each machine computed when its host-mates last planned: when that changes, their segments of
        # decode steps are cut at the step in flight, so that each later step is stretched (or not) as it would be
        # planned on its own.
        self._was_busy = [False] * len(self.machines)
        self.rates = Rates(min_observations=config.scheduling.min_observations)
        self.book = LoadBook(drain_time=self.rates.drain_s)
        self.policy = policy or make_policy(config.scheduling,
                                            decode_chunk_tokens=cluster.decode.num_prefill_chunk_tokens,
                                            prefill_chunk_tokens=cluster.prefill.num_prefill_chunk_tokens)
        self._observe_output = getattr(self.policy, "observe_output", None)  # what the router tells a policy
        self._random = random.Random(config.seed)
        self._events: list[tuple[float, int, int, Any]] = []  # (time, push order, kind, its payload)
        self._seq = 0
        self._errors: dict[int, str] = {}
        self._next_rekey_s = 0.0
        self._forced_paths: dict[int, str] = {}
        for machine in self.machines:
            self._report(machine)

    # The run.
    def run(self, requests: Iterable[TraceRequest], *, is_progress_shown: bool = False,
            paths: dict[int, str] | None = None) -> SimResult:
        """`paths`: a request id's path, taken whatever the policy decides (a replay of a live run's decisions:
        the machines' model apart from the policy's dynamics). The policy still decides every request, and names
        the engines where it named one for that role; Serve's choice where it did not."""
        self._forced_paths = paths or {}
        # The run makes millions of objects and no reference cycle: Python's cycle collector would only walk them
        # over and over (10% of a large run). Reference counting still frees everything.
        is_collecting = gc.isenabled()
        gc.disable()
        try:
            return self._run(requests, is_progress_shown)
        finally:
            if is_collecting:
                gc.enable()

    def _run(self, requests: Iterable[TraceRequest], is_progress_shown: bool) -> SimResult:
        began = time.perf_counter()
        arrivals = sorted((SimRequest(request_id=request.request_id, arrival_s=request.arrival_s,
                                      prompt_tokens=request.prompt_tokens, output_tokens=request.output_tokens)
                           for request in requests), key=lambda request: request.arrival_s)
        decisions: Counter = Counter()
        num_events, now, next_arrival = 0, 0.0, 0
        progress = tqdm(total=len(arrivals), desc="arrivals", unit="req", disable=not is_progress_shown,
                        miniters=max(1, len(arrivals) // 100))
        events, book, num_arrivals = self._events, self.book, len(arrivals)
        rekey_period_s = self.config.scheduling.load_report_period_s
        next_arrival_s = arrivals[0].arrival_s if arrivals else 0.0
        while next_arrival < num_arrivals or events:
            if events and (next_arrival == num_arrivals or events[0][0] <= next_arrival_s):
                now, _, kind, payload = heapq.heappop(events)
                book.now_s = now
                if kind == _ITERATION_END:
                    machine, version = payload
                    if version != machine.version:
                        continue  # a segment cut short since: its new end is queued
                    self._iteration_ended(machine, now)
                elif kind == _KV_ARRIVED:
                    self._kv_arrived(payload, now)
                else:
                    self._give_up(payload, now)
            else:
                request = arrivals[next_arrival]
                next_arrival += 1
                if next_arrival < num_arrivals:
                    next_arrival_s = arrivals[next_arrival].arrival_s
                now = book.now_s = request.arrival_s
                decisions[self._arrive(request, now)] += 1
                progress.update()
            num_events += 1
            if now >= self._next_rekey_s:
                book.refresh_keys()
                self._next_rekey_s = now + rekey_period_s
        progress.close()
        return SimResult(records=[self._record(request) for request in arrivals], requests=arrivals,
                         machines=self.machines, model=self.model, decisions=decisions, num_events=num_events,
                         wall_s=time.perf_counter() - began,
                         simulated_s=now)

    # 1. Arrivals: the policy decides.
    def _arrive(self, request: SimRequest, now: float) -> str:
        facts = RequestFacts(str(request.request_id), request.prompt_tokens)  # never the output length
        decision = self.policy.decide(facts, self.book, self.rates)
        path = Path.DECODE_LOCAL if self.is_collocated else decision.path
        forced = self._forced_paths.get(request.request_id)
        if forced is not None and not self.is_collocated and forced != path.value:
            path = Path(forced)
        request.path = path.value
        request.predicted_ttft_s = decision.predicted_ttft_s if path == decision.path else None  # (another path's)
        if path == Path.DECODE_LOCAL:
            machine = self.by_engine[decision.decode_engine or self._serve_pick("decode")]
        else:
            machine = self.by_engine[decision.prefill_engine or self._serve_pick("prefill")]
            if path == Path.SPLIT:
                request.prefill_machine = machine.index
                request.decode_engine = decision.decode_engine or ""  # empty: Serve picks once prefill answered
        # Where it could never fit (a prompt and its output beyond a machine's KV), vLLM refuses it too.
        capacity = machine.config.kv_capacity_tokens if path != Path.SPLIT else \
            min(machine.config.kv_capacity_tokens, self.config.cluster.decode.kv_capacity_tokens)
        if request.prompt_tokens + request.output_tokens > capacity:
            self._errors[request.request_id] = "prompt and output exceed the machine's KV capacity"
            return path.value
        if not machine.has_work:  # nothing ahead of it: its time to first token (or KV handle) times a prefill
            request.times_prefill_of = machine.engine_id
        machine.add_prompt(request)
        self._kick(machine, now)
        if self.config.request_timeout_s is not None:
            self._push(now + self.config.request_timeout_s, _CLIENT_GAVE_UP, request)
        return path.value

    def _give_up(self, request: SimRequest, now: float) -> None:
        """The client's timeout: a request still running is aborted where it is, its KV freed, as the router
        cancels the engine's request when its client goes (a split in hand-over: once its KV arrives)."""
        if request.done_s is not None or request.is_aborted:
            return
        self._errors[request.request_id] = f"timeout after {self.config.request_timeout_s:g} s (the client gave up)"
        machine = self.machines[request.on_machine]
        machine.abort(request)
        if request.load_s and request not in machine.running:
            # It waited on decode for the iteration that would have loaded its KV (one in flight holds it in
            # `running` and frees prefill's at its end): prefill frees it now.
            self._release_prefill(request, now)
        self._kick(machine, now)  # (and the book hears of it)

    def _serve_pick(self, role: Role) -> str:
        """Serve's own choice: two replicas at random, the one holding fewer requests."""
        engines = self.book.engine_ids(role)
        first, second = self._random.choice(engines), self._random.choice(engines)
        return min((first, second), key=lambda engine_id: self.by_engine[engine_id].num_requests)

    # 2-3. Machines.
    def _kick(self, machine: Machine, now: float) -> None:
        """New work, or an iteration over: the machine starts its next iteration, or cuts a running segment of
        decode iterations short so that the new work joins after the one in flight."""
        if not machine.is_busy:
            duration = machine.plan_iteration(now, self._stretch_of(machine))
            if duration is not None:
                self._push(now + duration, _ITERATION_END, (machine, machine.version))
        elif (end := machine.cut(now)) is not None:
            self._push(end, _ITERATION_END, (machine, machine.version))
        if machine.is_busy != self._was_busy[machine.index]:
            self._was_busy[machine.index] = machine.is_busy
            for mate in self._host_mates[machine.index]:  # none with a host each
                if (end := mate.cut(now)) is not None:
                    self._push(end, _ITERATION_END, (mate, mate.version))
            for mate in self._core_mates[machine.index]:  # none with a core each
                if (end := mate.reshare(now, self._stretch_of(mate))) is not None:
                    self._push(end, _ITERATION_END, (mate, mate.version))
        self._report(machine)

    def _stretch_of(self, machine: Machine) -> float:
        """How much longer than the model's line an iteration of `machine` takes now: its share of its core, and
        the shared-host slowdown while a machine on another core of its host computes."""
        stretch = 1.0
        for mate in self._core_mates[machine.index]:
            if mate.is_busy:
                stretch += 1.0
        for mate in self._host_mates[machine.index]:
            if mate.is_busy:
                return stretch * (1.0 + self.model.shared_host_slowdown)
        return stretch

    def _iteration_ended(self, machine: Machine, now: float) -> None:
        num_decoding, had_prompts = machine.last_num_decoding, machine.last_num_prompt_tokens > 0
        step_s = machine.last_step_s / machine.num_steps_in_flight  # a segment's mean step
        had_first_token = False
        for outcome, request in machine.finish_iteration(now):
            if outcome == Outcome.PREFILLED:
                self._prefilled(request, machine, now)
            elif outcome == Outcome.LOADED:
                self._release_prefill(request, now)
            elif outcome == Outcome.FIRST_TOKEN:
                had_first_token = True
                self._first_token(request, machine, now)
            elif self._observe_output is not None:
                self._observe_output(request.num_generated)
        if num_decoding and not had_prompts and not had_first_token:
            # A pure decode step, as the engines time and report them: vLLM's inter-token gaps of a step in which
            # no request got its first token (a handed-over request's first step, with its load, is not one).
            self.rates.observe_decode_step(machine.engine_id, num_decoding, step_s)
        self._kick(machine, now)

    def _prefilled(self, request: SimRequest, machine: Machine, now: float) -> None:
        request.prefilled_s = now
        if request.times_prefill_of:
            self.rates.observe_prefill(request.times_prefill_of, request.prompt_tokens, now - request.arrival_s)
        decode = self.by_engine[request.decode_engine or self._serve_pick("decode")]
        request.decode_engine, request.num_ahead = decode.engine_id, decode.num_requests
        # Loaded in step, the KV moves inside decode's iteration (machine.py): the call arrives after the served
        # path's latency alone.
        handover_s = self.model.split_handover_s(request.prompt_tokens) if decode.config.kv_load_steps \
            else self.model.served_split_s
        self._push(now + handover_s, _KV_ARRIVED, (request, decode))

    def _kv_arrived(self, payload: tuple[SimRequest, Machine], now: float) -> None:
        request, decode = payload
        if request.is_aborted:  # its client gave up during the hand-over
            self._release_prefill(request, now)
            return
        decode.add_decode(request)
        if not request.load_s:  # moved before the call (in the background): prefill frees it now
            self._release_prefill(request, now)
        self._kick(decode, now)

    def _release_prefill(self, request: SimRequest, now: float) -> None:
        prefill = self.machines[request.prefill_machine]
        prefill.release(request)
        self._kick(prefill, now)

    def _first_token(self, request: SimRequest, machine: Machine, now: float) -> None:
        if request.prefilled_s is not None:
            # As the router: the decode call's time to first token, less one step of the batch it joined.
            step_s = self.rates.decode_step_s(machine.engine_id, request.num_ahead + 1)
            self.rates.observe_handover(machine.engine_id, request.prompt_tokens, request.num_ahead,
                                        max(0.0, now - request.prefilled_s - step_s))
        elif request.times_prefill_of:
            self.rates.observe_prefill(request.times_prefill_of, request.prompt_tokens, now - request.arrival_s)

    def _report(self, machine: Machine) -> None:
        # Positional, in EngineLoad's order: engine, role, pending prompt tokens, running, waiting, KV in use,
        # prompt tokens computed (one per machine change: the hottest line of a large run).
        self.book.report(EngineLoad(machine.engine_id, machine.role, machine.num_pending_prompt_tokens,
                                    len(machine.running), len(machine.waiting) + len(machine.arrived),
                                    machine.kv_used / machine.config.kv_capacity_tokens,
                                    machine.stats.num_prompt_tokens))

    def _push(self, at: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._events, (at, self._seq, kind, payload))

    # 5. Results.
    def _record(self, request: SimRequest) -> RequestRecord:
        record = RequestRecord(request_id=request.request_id, arrival_s=request.arrival_s,
                               prompt_tokens=request.prompt_tokens, output_tokens=request.num_generated,
                               start_s=request.arrival_s, path=request.path)
        error = self._errors.get(request.request_id)
        if error is not None or request.done_s is None:
            record.error = error or "not finished when the simulation ended"
            return record
        served_s, done_s = self.model.served_request_s, request.done_s
        first_token_s = request.first_token_s if request.first_token_s is not None else done_s  # (set: it is done)
        record.ttft_s = first_token_s - request.arrival_s + served_s
        record.e2e_s = done_s - request.arrival_s + served_s
        if request.gaps_s is not None or request.num_generated < 2:
            record.tbt_s = list(request.gaps_s or ())
        else:  # gaps not kept: one mean gap stands for them (a request's TBT is right, all-gap tails are not)
            record.tbt_s = [(done_s - first_token_s) / (request.num_generated - 1)]
        record.predicted_ttft_s = request.predicted_ttft_s
        if request.prefilled_s is not None:
            record.prefill_s = request.prefilled_s - request.arrival_s
            record.prefill_engine_id = self.machines[request.prefill_machine].engine_id
        return record
