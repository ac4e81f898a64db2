"""splitsim: a request's life through simulated machines, step by step against hand-computed times; the event
loop's invariants on a loaded trace; the live router's own policy code deciding; config errors that name the
value."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from pydantic import ValidationError

import deployments.scheduling.policies as live_policies
from bench.sim import simulator as sim_module
from bench.sim.config import ClusterConfig, MachineConfig, SimConfig
from bench.sim.machine import Machine
from bench.sim.model import PerfModel
from bench.sim.simulator import Simulator
from bench.traces import TraceRequest

# An iteration: 100 ms, plus 1 ms a prompt token, plus 10 ms a decode sequence; a hand-over 50 ms.
MODEL = PerfModel(step_s0=0.1, prompt_token_s=0.001, decode_seq_s=0.01, handover_s0=0.05)


def _config(**cluster) -> SimConfig:
    scheduling = {"policy": "always_split"} if cluster.get("mode") != "collocated" else {}
    return SimConfig(model=MODEL, cluster=ClusterConfig(**cluster), scheduling=scheduling)


def _request(request_id: int, arrival_s: float, prompt: int, output: int) -> TraceRequest:
    return TraceRequest(request_id=request_id, arrival_s=arrival_s, prompt_tokens=prompt, output_tokens=output)


def _poisson_requests(seed: int, rate_per_s: float, count: int, prompts: tuple[int, int],
                      outputs: tuple[int, int]) -> list[TraceRequest]:
    """`count` requests at Poisson arrivals, prompt and output sizes uniform in the given ranges (one seed)."""
    rng = random.Random(seed)
    arrival, requests = 0.0, []
    for request_id in range(count):
        arrival += rng.expovariate(rate_per_s)
        requests.append(_request(request_id, arrival, rng.randint(*prompts), rng.randint(*outputs)))
    return requests


def test_one_machine_runs_a_prompt_then_decodes_and_batches_a_second_prompt_with_the_first_ones_tokens():
    result = Simulator(_config(mode="collocated", num_prefill=0, num_decode=1)).run(
        [_request(0, 0.0, 100, 3), _request(1, 0.1, 50, 1)])
    first, second = result.records
    # 1. 0-0.2 s: the first prompt alone (0.1 + 100 × 0.001): its first token at 0.2 s.
    assert first.ttft_s == pytest.approx(0.2)
    # 2. 0.2-0.36 s: the first request's token and the second prompt in one iteration (0.1 + 50 × 0.001 + 0.01);
    #    the second request (one token) is done then, 0.26 s after it arrived.
    assert second.ttft_s == pytest.approx(0.26) and second.e2e_s == pytest.approx(0.26)
    # 3. 0.36-0.47 s: the first request's last token alone (0.1 + 0.01).
    assert first.tbt_s == pytest.approx([0.16, 0.11]) and first.e2e_s == pytest.approx(0.47)
    assert [record.path for record in result.records] == ["decode_local", "decode_local"]
    _assert_nothing_held(result)


def test_a_split_prefills_hands_the_kv_over_and_decodes_on_the_other_machine():
    result = Simulator(_config(num_prefill=1, num_decode=1)).run([_request(0, 0.0, 100, 3)])
    (record,) = result.records
    # 1. Prefill computes the prompt by 0.2 s; 2. its KV reaches decode at 0.25 s; 3. decode's first iteration
    # with it gives the first token at 0.36 s, then one token per 0.11 s.
    assert record.path == "split" and record.prefill_s == pytest.approx(0.2)
    assert record.prefill_engine_id == "prefill-0"
    assert record.ttft_s == pytest.approx(0.36)
    assert record.tbt_s == pytest.approx([0.11, 0.11]) and record.e2e_s == pytest.approx(0.58)
    prefill, decode = result.machines
    assert prefill.stats.num_prompt_tokens == 100 and prefill.stats.num_decode_tokens == 0
    assert decode.stats.num_prompt_tokens == 0 and decode.stats.num_decode_tokens == 3  # no prompt recomputed
    _assert_nothing_held(result)


def test_the_served_path_stretches_each_token_and_delays_the_first_by_its_measured_cost():
    """bench.profile's served terms: 5 ms more per sequence a step extends (the output path's processes on the
    same cores), 30 ms before the first token (proxy, router, replica), which holds no machine."""
    served = MODEL.model_copy(update={"served_token_s": 0.005, "served_request_s": 0.03})
    config = SimConfig(model=served, cluster=ClusterConfig(mode="collocated", num_prefill=0, num_decode=1))
    (record,) = Simulator(config).run([_request(0, 0.0, 100, 3)]).records
    # The prompt's step 0.2 s, as without the served path, then 30 ms of its latency; each decode step
    # 0.1 + 0.01 + 0.005 s.
    assert record.ttft_s == pytest.approx(0.23)
    assert record.tbt_s == pytest.approx([0.115, 0.115]) and record.e2e_s == pytest.approx(0.23 + 0.23)


def test_a_splits_served_latency_comes_between_prefills_step_and_decodes():
    """bench.profile's `served_split_s` (the router's second call, prefill's answer, decode's wait for the KV): 40 ms
    more between prefill's step and decode's, held by no engine; the collocated path does not pay it."""
    split = MODEL.model_copy(update={"served_split_s": 0.04})
    config = SimConfig(model=split, cluster=ClusterConfig(num_prefill=1, num_decode=1),
                       scheduling={"policy": "always_split"})
    result = Simulator(config).run([_request(0, 0.0, 100, 3)])
    (record,) = result.records
    # 1. Prefill computes the prompt by 0.2 s; 2. its KV reaches decode at 0.2 + 0.05 + 0.04 s; 3. decode's first
    #    iteration with it gives the first token 0.11 s later, then one token per 0.11 s.
    assert record.prefill_s == pytest.approx(0.2)
    assert record.ttft_s == pytest.approx(0.40) and record.tbt_s == pytest.approx([0.11, 0.11])
    collocated = SimConfig(model=split, cluster=ClusterConfig(mode="collocated", num_prefill=0, num_decode=1))
    assert Simulator(collocated).run([_request(0, 0.0, 100, 3)]).records[0].ttft_s == pytest.approx(0.2)
    _assert_nothing_held(result)


def test_kv_that_reaches_a_busy_decode_engine_loads_through_one_more_step_before_its_request_runs():
    """vLLM's asynchronous KV load (`kv_load_steps` 1): a split request that reaches an engine in the middle of a
    step is seen by the next step, which starts the load, and is computed in the step after it; on an idle engine
    at once. Loaded in step (`kv_load_steps` 0, the app's default), the call reaches decode without waiting for the
    hand-over, and the step that computes the request waits out its load: so do the streams in that step."""
    def run(kv_load_steps: int):
        decode = MachineConfig(kv_load_steps=kv_load_steps)
        config = SimConfig(model=MODEL, cluster=ClusterConfig(num_prefill=1, num_decode=1, decode=decode),
                           scheduling={"policy": "always_split"})
        result = Simulator(config).run([_request(0, 0.0, 100, 10), _request(1, 0.3, 50, 2)])
        _assert_nothing_held(result)
        return result.records

    # In the background:
    # 1. The first request: prefill by 0.2 s, its KV on the idle decode engine at 0.25, its first token at 0.36
    #    (as without the load step), then a token every 0.11 s: steps end at 0.47, 0.58, 0.69, ...
    # 2. The second: prefill 0.3-0.45 s, its KV on decode at 0.5, in the step 0.47-0.58. The step 0.58-0.69 loads
    #    it; the step 0.69-0.81 (two sequences) computes its first token: TTFT 0.51 s.
    first, second = run(1)
    assert (first.ttft_s, second.ttft_s) == pytest.approx((0.36, 0.51))
    assert first.tbt_s[:4] == pytest.approx([0.11, 0.11, 0.11, 0.12])
    # In step:
    # 1. The first request's call reaches the idle decode engine at 0.2 s; its step loads (0.05 s) and computes
    #    (0.11 s): its first token at 0.36 s again, then steps end at 0.47, ...
    # 2. The second's call reaches decode at 0.45 s, in the step 0.36-0.47; the step 0.47-0.64 loads it and computes
    #    both sequences (0.05 + 0.12 s): TTFT 0.34 s, and the first request's gap in that step is 0.17 s.
    first, second = run(0)
    assert (first.ttft_s, second.ttft_s) == pytest.approx((0.36, 0.34))
    assert first.tbt_s[:3] == pytest.approx([0.11, 0.17, 0.12])


def test_kv_loaded_in_step_stays_on_the_prefill_machine_until_its_load_ran_and_leaks_nowhere_when_a_client_goes():
    """The prefill machine frees a split's KV when decode's iteration that loads it ends (the READ is done), not when
    the call reaches decode; a client that gives up while its KV waits for that iteration, or during it, leaves no
    KV held on either machine."""
    # 1. One decode machine, step by step: the iteration that admits the handed-over request waits out its load
    #    (0.05 s) beside the step (0.11 s), and reports the load before the first token.
    decode = Machine(index=1, engine_id="decode-0", role="decode", config=MachineConfig(kv_load_steps=0), model=MODEL)
    request = sim_module.SimRequest(0, 0.0, 100, 3, path="split", prefill_machine=0)
    decode.add_decode(request)
    assert request.load_s == pytest.approx(0.05)
    assert decode.plan_iteration() == pytest.approx(0.16)
    outcomes = decode.finish_iteration(0.16)
    assert [outcome for outcome, _ in outcomes] == [sim_module.Outcome.LOADED, sim_module.Outcome.FIRST_TOKEN]
    # The rest, one segment of two pure decode steps, loads nothing: 0.11 s each.
    assert request.load_s == 0.0 and decode.plan_iteration() == pytest.approx(0.22)
    # 2. Through the simulator, clients that give up at every moment of a split's life (timeouts 10 ms apart over
    #    the requests' whole lives): in its prompt, during the hand-over, while its call waits on a busy decode
    #    engine, during the loading iteration, after it. Nothing stays held, whichever it was.
    requests = [_request(index, 0.05 * index, 60 + 20 * index, 3 + 4 * index) for index in range(4)]
    num_given_up = set()
    for timeout_ms in range(100, 2600, 10):  # (the last request ends at 2.49 s + its arrival)
        config = SimConfig(model=MODEL, cluster=ClusterConfig(num_prefill=1, num_decode=1,
                                                              decode=MachineConfig(kv_load_steps=0)),
                           scheduling={"policy": "always_split"}, request_timeout_s=timeout_ms / 1000)
        result = Simulator(config).run(requests)
        _assert_nothing_held(result)
        assert all(request.handover_kv_tokens == 0 for request in result.requests)
        num_given_up.add(sum(not record.is_ok for record in result.records))
    assert num_given_up == {0, 1, 2, 3, 4}


def test_a_replay_can_take_each_requests_path_as_measured_whatever_the_policy_decides():
    """`paths` (bench.sim_validate --paths-as-measured): a request takes the path its live run took, so that the
    machines' model can be checked on the live decisions where the simulated policy would go another way."""
    requests = [_request(0, 0.0, 100, 3), _request(1, 0.0, 50, 2)]
    result = Simulator(_config(num_prefill=1, num_decode=1)).run(requests, paths={0: "decode_local"})
    first, second = result.records
    # 1. always_split would split both; the first runs decode-local: the decode machine computes its prompt
    #    (0.1 + 100 × 0.001 s) and streams it, the prefill machine never sees it.
    assert (first.path, second.path) == ("decode_local", "split")
    assert first.ttft_s == pytest.approx(0.2) and first.prefill_s is None
    prefill, decode = result.machines
    assert (prefill.stats.num_prompt_tokens, decode.stats.num_prompt_tokens) == (50, 100)
    # 2. Without the paths, the policy's own decisions.
    unforced = Simulator(_config(num_prefill=1, num_decode=1)).run(requests)
    assert [record.path for record in unforced.records] == ["split", "split"]
    _assert_nothing_held(result)


def test_a_request_whose_client_gave_up_leaves_its_engine_and_frees_its_kv():
    """The client's timeout (`request_timeout_s`), as the router cancels a request whose client went: aborted
    between two iterations wherever it is, a miss, and the machine is free for the next request at once."""
    def run(cluster: ClusterConfig, requests: list[TraceRequest], timeout_s: float):
        scheduling = {"policy": "always_split"} if cluster.mode != "collocated" else {}
        config = SimConfig(model=MODEL, cluster=cluster, scheduling=scheduling, request_timeout_s=timeout_s)
        return Simulator(config).run(requests)

    one = ClusterConfig(mode="collocated", num_prefill=0, num_decode=1)
    # 1. Decoding: the prompt by 0.2 s, then a token per 0.11 s; at 0.5 s (its 3rd token's step in flight) its
    #    client goes; it leaves at that step's end, 0.53 s, and a request arriving at 0.6 s finds the machine idle.
    result = run(one, [_request(0, 0.0, 100, 50), _request(1, 0.6, 100, 1)], timeout_s=0.5)
    first, second = result.records
    assert first.error == "timeout after 0.5 s (the client gave up)" and not first.is_ok
    assert second.ttft_s == pytest.approx(0.2) and second.error is None
    assert result.machines[0].stats.num_decode_tokens == 3  # the step in flight at 0.5 s ran; none after it
    _assert_nothing_held(result)
    # 2. A prompt half computed (chunks of 60 tokens) and one not begun: both leave at once, the KV and pending
    #    tokens they held freed; one in the iteration in flight leaves at its end.
    machine = Machine(index=0, engine_id="decode-0", role="decode",
                      config=MachineConfig(max_batch_tokens=60), model=MODEL)
    half, queued, in_flight = (sim_module.SimRequest(index, 0.0, 100, 2) for index in range(3))
    machine.add_prompt(half)
    machine.plan_iteration()
    machine.finish_iteration(0.16)  # 60 of its 100 tokens
    machine.add_prompt(queued)
    machine.abort(half)
    machine.abort(queued)
    assert machine.kv_used == 0 and machine.num_pending_prompt_tokens == 0 and not machine.has_work
    machine.add_prompt(in_flight)
    machine.plan_iteration()
    machine.abort(in_flight)
    assert machine.has_work  # its chunk is computing
    assert machine.finish_iteration(0.32) == [] and machine.kv_used == 0 and not machine.has_work
    # 3. In its hand-over (prefill done at 0.2 s, KV on decode at 0.25): its client goes at 0.22; prefill's copy
    #    of the KV is freed when the transfer ends and decode never runs it.
    split = ClusterConfig(num_prefill=1, num_decode=1)
    result = run(split, [_request(0, 0.0, 100, 3)], timeout_s=0.22)
    assert not result.records[0].is_ok and result.requests[0].prefilled_s == pytest.approx(0.2)
    prefill, decode = result.machines
    assert prefill.stats.num_prompt_tokens == 100 and decode.stats.num_decode_tokens == 0
    _assert_nothing_held(result)
    # 4. Its prompt in flight on prefill: it leaves at the iteration's end, with no hand-over.
    result = run(split, [_request(0, 0.0, 100, 3)], timeout_s=0.1)
    assert not result.records[0].is_ok and result.requests[0].prefilled_s is None
    assert result.machines[1].stats.num_decode_tokens == 0
    _assert_nothing_held(result)
    with pytest.raises(ValidationError, match="request_timeout_s"):
        SimConfig(model=MODEL, request_timeout_s=0)


def test_machines_of_one_host_stretch_the_iterations_that_start_while_the_other_computes():
    """Two machines on one host (`machines_per_host: 2`), an iteration 50% longer when it starts while the other
    machine computes: two prompts arriving together take 0.3 s each instead of 0.2 s; on hosts of their own, 0.2."""
    shared = MODEL.model_copy(update={"shared_host_slowdown": 0.5})
    requests = [_request(0, 0.0, 100, 1), _request(1, 0.0, 100, 1)]

    def ttfts(machines_per_host: int) -> list[float]:
        cluster = ClusterConfig(mode="collocated", num_prefill=0, num_decode=2, machines_per_host=machines_per_host)
        return [record.ttft_s for record in Simulator(SimConfig(model=shared, cluster=cluster)).run(requests).records]

    # The first machine starts alone (0.2 s); the second starts while the first computes (0.3 s).
    assert sorted(ttfts(2)) == pytest.approx([0.2, 0.3])
    assert ttfts(1) == pytest.approx([0.2, 0.2])
    with pytest.raises(ValidationError, match="machines_per_host"):
        ClusterConfig(machines_per_host=0)


def test_machines_of_one_core_take_turns_on_it():
    """Two machines on one core (`host_cores: [0, 0]`): while both compute, each runs at half its speed, and the
    one still computing speeds up when the other stops (processor sharing), worked by hand:
    - together at 0 s, 0.2 s of work each: both end at 0.4 s (on cores of their own, 0.2 s);
    - the second at 0.1 s: the first, alone until then, has 0.1 s of work left and ends at 0.3 s (0.1 s at half
      speed); the second did 0.1 s of its work by then and does the rest alone, ending at 0.4 s (TTFT 0.3 s)."""
    def ttfts(requests: list[TraceRequest], host_cores: list[int]) -> list[float]:
        cluster = ClusterConfig(mode="collocated", num_prefill=0, num_decode=2, machines_per_host=2,
                                host_cores=host_cores)
        result = Simulator(SimConfig(model=MODEL, cluster=cluster)).run(requests)
        assert sorted(machine.stats.num_iterations for machine in result.machines) == [1, 1]  # one prompt each
        return [record.ttft_s for record in result.records]

    together = [_request(0, 0.0, 100, 1), _request(1, 0.0, 100, 1)]
    assert ttfts(together, [0, 0]) == pytest.approx([0.4, 0.4])
    assert ttfts(together, [0, 1]) == pytest.approx([0.2, 0.2])  # cores of their own (no host slowdown here)
    assert ttfts([_request(0, 0.0, 100, 1), _request(1, 0.1, 100, 1)], [0, 0]) == pytest.approx([0.3, 0.3])
    with pytest.raises(ValidationError, match="host_cores"):
        ClusterConfig(machines_per_host=2, host_cores=[0, 0, 1])


def test_a_long_prompt_runs_in_chunks_of_the_token_budget():
    small = MachineConfig(max_batch_tokens=64)
    result = Simulator(_config(mode="collocated", num_prefill=0, num_decode=1, decode=small)).run(
        [_request(0, 0.0, 200, 1)])
    # 64 + 64 + 64 + 8 tokens: four iterations of 0.1 s plus 1 ms a token.
    assert result.records[0].ttft_s == pytest.approx(4 * 0.1 + 0.2)
    assert result.machines[0].stats.num_iterations == 4


def test_a_prompts_attention_pairs_cost_the_same_whole_or_in_chunks():
    # 1 µs an attention pair: 100 tokens at once attend over 100·101/2 = 5,050 pairs; in chunks of 64 and 36, the
    # second chunk also attends to the 64 before it (64·65/2 + 36·64 + 36·37/2 = 2,080 + 2,304 + 666 = 5,050).
    model = MODEL.model_copy(update={"prompt_pair_s": 1e-6})
    whole = Simulator(SimConfig(model=model, cluster=ClusterConfig(mode="collocated", num_prefill=0, num_decode=1)))
    chunked = Simulator(SimConfig(model=model, cluster=ClusterConfig(mode="collocated", num_prefill=0, num_decode=1,
                                                                     decode=MachineConfig(max_batch_tokens=64))))
    at_once = whole.run([_request(0, 0.0, 100, 1)]).records[0].ttft_s
    in_chunks = chunked.run([_request(0, 0.0, 100, 1)]).records[0].ttft_s
    assert at_once == pytest.approx(0.1 + 0.1 + 5050e-6)
    assert in_chunks == pytest.approx(2 * 0.1 + 0.1 + 5050e-6)  # one more iteration's fixed cost, the same pairs


@pytest.mark.parametrize("policy", ["always_split", "token_jsq", "conditional", "mixed_pool", "predictive"])
def test_a_loaded_trace_keeps_the_event_loops_invariants(policy):
    """Every request completes exactly once with every token, no machine holds more KV than it has (small
    caches force preemptions), and every machine ends empty."""
    requests = _poisson_requests(7, 8.0, 300, (20, 700), (1, 80))
    tight = MachineConfig(max_batch_tokens=512, max_num_seqs=8, kv_capacity_tokens=1_500)
    config = SimConfig(model=MODEL.model_copy(update={"context_token_s": 1e-6}),
                       cluster=ClusterConfig(num_prefill=2, num_decode=2, prefill=tight, decode=tight),
                       scheduling={"policy": policy, "min_observations": 2})
    result = Simulator(config).run(requests)
    assert [record.request_id for record in result.records] == list(range(300))
    assert all(record.error is None for record in result.records)
    assert [record.output_tokens for record in result.records] == [request.output_tokens for request in requests]
    assert all(len(record.tbt_s) == record.output_tokens - 1 for record in result.records)
    assert all(0 < record.ttft_s <= record.e2e_s for record in result.records)
    # Tokens are conserved: each one came from a decode step or from the iteration that finished a prompt.
    made = sum(machine.stats.num_decode_tokens + machine.stats.num_prompt_samples for machine in result.machines)
    assert made == sum(request.output_tokens for request in requests)
    assert all(machine.stats.peak_kv_tokens <= machine.config.kv_capacity_tokens for machine in result.machines)
    assert sum(result.decisions.values()) == 300
    _assert_nothing_held(result)


@pytest.mark.parametrize("mode", ["disaggregated", "collocated"])
@pytest.mark.parametrize("decode", [MachineConfig(max_num_seqs=8, kv_capacity_tokens=3_000),
                                    MachineConfig(max_num_seqs=3, kv_capacity_tokens=1_500)], ids=["roomy", "tight"])
@pytest.mark.parametrize("slowdown", [0.0, 0.5], ids=["own-hosts", "shared-host"])
def test_decode_segments_give_the_same_times_as_iteration_by_iteration_with_fewer_events(mode, decode, slowdown,
                                                                                       monkeypatch):
    """Pure decode runs as one event per segment, also while handed-over KV waits for memory or a sequence slot
    (the tight machines); arrivals cut segments at the iteration in flight, and so does a host-mate that starts or
    stops computing (two machines a host, each step stretched while the other computes). Every request's times
    must equal the iteration-by-iteration run's (always_split: decisions that use no rates)."""
    requests = _poisson_requests(3, 3.0, 200, (10, 400), (1, 120))
    cluster = {"mode": mode, "num_prefill": 0 if mode == "collocated" else 1, "num_decode": 2, "decode": decode,
               "machines_per_host": 2}
    config = SimConfig(model=MODEL.model_copy(update={"context_token_s": 2e-5, "shared_host_slowdown": slowdown}),
                       cluster=cluster, scheduling={"policy": "always_split"})
    segments_beside_waiting_kv = []
    plan = Machine.plan_iteration

    def counting_plan(machine, *args):
        duration = plan(machine, *args)
        if machine.arrived and machine.num_steps_in_flight > 1:
            segments_beside_waiting_kv.append(machine.engine_id)
        return duration

    monkeypatch.setattr(Machine, "plan_iteration", counting_plan)
    fast, slow = Simulator(config).run(requests), Simulator(config, can_fast_forward=False).run(requests)
    assert bool(segments_beside_waiting_kv) == (mode == "disaggregated")  # collocated hands no KV over
    for quick, plain in zip(fast.records, slow.records, strict=True):
        assert quick.error is None and plain.error is None
        assert quick.ttft_s == pytest.approx(plain.ttft_s, abs=1e-9)
        assert quick.e2e_s == pytest.approx(plain.e2e_s, abs=1e-9)
        assert quick.tbt_s == pytest.approx(plain.tbt_s, abs=1e-9)
    assert sum(m.stats.num_iterations for m in fast.machines) == sum(m.stats.num_iterations for m in slow.machines)
    assert fast.num_events < slow.num_events
    _assert_nothing_held(fast)
    # Alone, a request is its arrival, its prompt's iteration (for a split also the KV's arrival and decode's
    # first token) and one segment for all its other tokens.
    alone = Simulator(config).run([_request(0, 0.0, 10, 100)])
    assert alone.num_events == (3 if mode == "collocated" else 5) and len(alone.records[0].tbt_s) == 99


@pytest.mark.parametrize("policy", ["always_split", "predictive"])
def test_a_run_without_token_gaps_is_the_same_run(policy):
    """Large runs keep no gaps (`keeps_token_gaps: false`, the scale benchmark's setting): every decision, first
    token, end and token count must be those of the run that keeps them; only the gaps themselves go."""
    requests = _poisson_requests(5, 8.0, 300, (20, 700), (1, 80))
    tight = MachineConfig(max_batch_tokens=512, max_num_seqs=8, kv_capacity_tokens=1_500)
    runs = [Simulator(SimConfig(model=MODEL.model_copy(update={"context_token_s": 1e-6}), keeps_token_gaps=keeps,
                                cluster=ClusterConfig(num_prefill=2, num_decode=2, prefill=tight, decode=tight),
                                scheduling={"policy": policy, "min_observations": 2})).run(requests)
            for keeps in (True, False)]
    kept, dropped = ([(r.path, r.prefill_engine_id, r.ttft_s, r.e2e_s, r.output_tokens) for r in run.records]
                     for run in runs)
    assert kept == dropped and runs[0].decisions == runs[1].decisions
    assert all(request.gaps_s is None for request in runs[1].requests)
    assert sum(len(record.tbt_s) for record in runs[0].records) > len(requests)
    _assert_nothing_held(runs[1])


def test_the_policy_is_the_live_routers_own_and_never_sees_an_output_length():
    assert sim_module.make_policy is live_policies.make_policy
    seen = []
    live = live_policies.make_policy(SimConfig(model=MODEL).scheduling)

    class Spy:
        name = live.name

        def decide(self, request, book, rates):
            seen.append(request)
            return live.decide(request, book, rates)

        def __getattr__(self, name):  # what else the router calls on its policy (observe_output)
            return getattr(live, name)

    requests = [_request(index, index * 0.3, 40 + index, 5 + index) for index in range(20)]
    result = Simulator(SimConfig(model=MODEL, scheduling={"min_observations": 2}), policy=Spy()).run(requests)
    assert isinstance(live, live_policies.Predictive)
    assert [int(facts.request_id) for facts in seen] == list(range(20))
    assert all(facts.max_tokens is None for facts in seen)
    assert [facts.num_prompt_tokens for facts in seen] == [request.prompt_tokens for request in requests]
    assert live.expected_output_tokens != 128.0  # it learned output lengths from finished requests, as live
    _assert_nothing_held(result)


def test_a_request_that_cannot_fit_is_an_error_not_a_hang():
    config = _config(mode="collocated", num_prefill=0, num_decode=1, decode=MachineConfig(kv_capacity_tokens=100))
    result = Simulator(config).run([_request(0, 0.0, 90, 20), _request(1, 0.0, 50, 5)])
    assert "KV capacity" in result.records[0].error and result.records[1].error is None


@pytest.mark.parametrize(("update", "named"), [
    ({"cluster": {"num_prefill": 0}}, "num_prefill is 0"),
    ({"cluster": {"num_decode": 0}}, "num_decode is 0"),
    ({"cluster": {"mode": "collocated", "num_prefill": 0}, "scheduling": {"policy": "token_jsq"}}, "'token_jsq'"),
    ({"scheduling": {"policy": "fastest"}}, "fastest"),
    ({"scheduling": {"return_tokens": 4096}}, "return_tokens (4096)"),
    ({"cluster": {"decode": {"max_num_seqs": 0}}}, "max_num_seqs"),
    ({"model": None}, "exactly one of them"),
])
def test_bad_config_is_refused_naming_the_value(update, named):
    data = {"model": MODEL.model_dump(), **update}
    with pytest.raises(ValidationError, match=named.replace("(", r"\(").replace(")", r"\)")):
        SimConfig.model_validate(data)


def test_an_unset_policy_is_the_modes_own_as_in_the_app():
    assert SimConfig(model=MODEL).scheduling.policy == "predictive"
    collocated = SimConfig.model_validate({"model": MODEL.model_dump(),
                                           "cluster": {"mode": "collocated", "num_prefill": 0}})
    assert collocated.scheduling.policy == "always_split"


def _assert_nothing_held(result) -> None:
    for machine in result.machines:
        assert machine.kv_used == 0 and not machine.has_work and not machine.is_busy, machine.engine_id


def test_the_command_writes_bench_compares_schemas_and_splitwise_sims_summary(tmp_path):
    import csv
    import json

    from bench import simulate

    config = tmp_path / "cluster.yaml"
    config.write_text("cluster: {num_prefill: 1, num_decode: 1}\n"
                      "model: {step_s0: 0.05, prompt_token_s: 0.002, decode_seq_s: 0.002, handover_s0: 0.02}\n"
                      "scheduling: {policy: token_jsq}\n")
    simulate.main(["--config", str(config), "--cell", "conv@0.6/s", "--out", str(tmp_path / "out")])
    records = simulate.read_requests_csv(tmp_path / "out" / "requests.csv")
    assert len(records) == 50 and all(record.is_ok and record.path == "split" for record in records)
    with open(tmp_path / "out" / "summary.csv", newline="") as handle:
        (row,) = list(csv.DictReader(handle))
    assert row["system"] == "splitsim" and row["num_errors"] == "0" and float(row["ttft_p50_ms"]) > 0
    with open(tmp_path / "out" / "splitwise_summary.csv", newline="") as handle:
        (splitwise,) = list(csv.DictReader(handle))
    assert {"ttft_times_p99", "tbt_times_mean", "response_times_p999", "queue_times_median"} <= set(splitwise)
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["decisions"] == {"split": 50} and 0 < run["machines"][0]["utilisation"] < 1


DECISIONS = Path(__file__).parent / "data" / "policy_decisions.json"


def _replayed_decisions() -> dict[str, list[list]]:
    """Every policy's path and engines for 400 requests through 3 prefill + 3 decode simulated machines (KV loads
    inside the step that computes the request, `kv_load_steps: 0`, as the machines ran when the fixture was made;
    predictive's TBT guard never yielding, `split_late_slowdown: null`, as it was then: with it off, every decision
    of the policy that gained it is the same)."""
    requests = _poisson_requests(11, 6.0, 400, (16, 900), (1, 90))
    model = PerfModel(step_s0=0.02, prompt_token_s=0.0004, decode_seq_s=0.003, context_token_s=2e-6,
                      handover_s0=0.01, handover_token_s=1e-5)
    decided = {}
    for policy in ("always_split", "token_jsq", "conditional", "mixed_pool", "predictive"):
        config = SimConfig(model=model, cluster=ClusterConfig(num_prefill=3, num_decode=3, decode=MachineConfig(
            max_num_seqs=8, kv_capacity_tokens=4000, kv_load_steps=0)),
            scheduling={"policy": policy, "min_observations": 3, "split_late_slowdown": None})
        result = Simulator(config).run(requests)
        decided[policy] = [[request.path, request.prefill_machine if request.path == "split" else -1,
                            request.decode_engine] for request in result.requests]
    return decided


def test_speed_changes_to_the_scheduler_keep_every_decision():
    """The fixture holds the decisions of the scheduler before its speed-only changes (cached rate lines, a
    re-key that rebuilds the heap): the same trace must get the same path and engines from every policy. After a
    change meant to alter decisions, regenerate it: json.dumps(_replayed_decisions())."""
    assert _replayed_decisions() == json.loads(DECISIONS.read_text())


def test_validation_pairs_requests_and_finds_saturation():
    from bench.load_generator import RequestRecord
    from bench.sim_validate import compare_cell, is_within, saturation

    def record(request_id, ttft, e2e):
        return RequestRecord(request_id=request_id, arrival_s=0.0, prompt_tokens=10, output_tokens=3, start_s=0.0,
                             ttft_s=ttft, e2e_s=e2e, tbt_s=[(e2e - ttft) / 2] * 2)

    measured = [record(index, 0.1 * (index + 1), 1.0 + index) for index in range(20)]
    simulated = [record(index, 0.105 * (index + 1), 1.0 + index) for index in reversed(range(20))]  # any order
    row = compare_cell(simulated, measured)
    assert row["num_requests"] == 20 and row["ttft_p50_ratio"] == pytest.approx(1.05, abs=0.01)
    assert row["e2e_p50_ratio"] == pytest.approx(1.0) and is_within(row, "ttft") and is_within(row, "e2e")
    sweep = [{"rate_per_s": rate, "measured_delivered_share": measured_share, "simulated_delivered_share": share}
             for rate, measured_share, share in ((0.5, 0.97, 0.98), (1.0, 0.93, 0.85), (2.0, 0.6, 0.5))]
    # Interpolated where the share crosses 0.9: measured 0.93 at 1/s and 0.6 at 2/s, 3/33 of the way from 1 to 2;
    # simulated 0.98 at 0.5/s and 0.85 at 1/s, 8/13 of the way from 0.5 to 1.
    measured_rate, simulated_rate = saturation(sweep, "measured"), saturation(sweep, "simulated")
    assert measured_rate.kind == simulated_rate.kind == "interpolated"
    assert measured_rate.rate_per_s == pytest.approx(1 + 3 / 33) and simulated_rate.rate_per_s == pytest.approx(
        0.5 + 0.5 * 8 / 13)
    kept_up = [{**row, "measured_delivered_share": 0.95} for row in sweep]
    assert saturation(kept_up, "measured").kind == "at_least" and saturation(kept_up, "measured").rate_per_s == 2.0
    never = [{**row, "measured_delivered_share": 0.5} for row in sweep]
    assert saturation(never, "measured").kind == "below_lowest"


def test_validation_replays_refused_requests_at_their_planned_sizes_and_times_out_as_the_client():
    """A request the app refused (503, no counts recorded) is offered to the simulator at the size the plan sent
    it, so a saturated cell offers both the same load; a simulated request past the client's timeout is a miss."""
    from bench.load_generator import RequestRecord
    from bench.sim_validate import replay

    config = SimConfig.from_yaml(Path("bench/sim/configs/host_1p1d.yaml"))
    served = RequestRecord(request_id=0, arrival_s=0.0, prompt_tokens=200, output_tokens=8, start_s=0.0,
                           ttft_s=0.5, e2e_s=1.0, tbt_s=[0.07] * 7)
    refused = RequestRecord(request_id=1, arrival_s=0.1, prompt_tokens=0, output_tokens=0, start_s=0.1,
                            error="InternalServerError: Error code: 503 - the decode role is at capacity")
    planned = {"code@9/s": {0: TraceRequest(request_id=0, arrival_s=0.0, prompt_tokens=190, output_tokens=8),
                            1: TraceRequest(request_id=1, arrival_s=0.1, prompt_tokens=700, output_tokens=20)}}
    simulated = {record.request_id: record for record in
                 replay(config, {"code@9/s": [served, refused]}, planned)["code@9/s"]}
    assert (simulated[0].prompt_tokens, simulated[0].output_tokens) == (200, 8)  # as the server counted it
    assert (simulated[1].prompt_tokens, simulated[1].output_tokens) == (700, 20)  # as the plan sent it
    assert simulated[1].is_ok  # served in the simulator, which has no admission bound
    without_plan = {record.request_id: record
                    for record in replay(config, {"code@9/s": [served, refused]})["code@9/s"]}
    assert without_plan[1].prompt_tokens == 1
    timed_out = replay(config, {"code@9/s": [served, refused]}, planned, timeout_s=0.2)["code@9/s"]
    assert not any(record.is_ok for record in timed_out) and all("timeout" in record.error for record in timed_out)


def test_validation_refuses_a_profile_from_another_host(tmp_path):
    from bench.sim_validate import host_mismatch, main

    profile = tmp_path / "profile"
    profile.mkdir()
    (profile / "model.csv").write_text("parameter,value\nstep_s0,0.03\nprompt_token_s,0.001\ndecode_seq_s,0.001\n")
    (profile / "run.json").write_text(json.dumps({"host": {"cpu": "Intel(R) Xeon(R) Processor"}}))
    compare = tmp_path / "compare"
    compare.mkdir()
    (compare / "run.json").write_text(json.dumps({"host": {"cpu": "AMD EPYC"}, "cells": [], "systems": []}))
    run = json.loads((compare / "run.json").read_text())
    assert host_mismatch(run, profile / "model.csv") == ("Intel(R) Xeon(R) Processor", "AMD EPYC")
    with pytest.raises(SystemExit, match="Intel.*AMD EPYC"):
        main(["--compare", str(compare), "--profile", str(profile / "model.csv"), "--out", str(tmp_path / "out")])
    main(["--compare", str(compare), "--profile", str(profile / "model.csv"), "--out", str(tmp_path / "out"),
          "--allow-other-host"])  # shown, and said in the report
    assert "not a validation, other hosts" in (tmp_path / "out" / "validation.md").read_text()
    assert host_mismatch({"host": {"cpu": "Intel(R) Xeon(R) Processor"}}, profile / "model.csv") is None


def test_validation_can_ask_what_a_load_inside_the_step_would_give(tmp_path):
    """`--kv-load-steps 0`: the measured system's machines, every one loading a split's KV inside the step that
    computes it, where the app's asynchronous load takes a step more (1, the default)."""
    import copy

    from bench.sim_validate import sim_config
    from bench.systems import SPLITSERVE_UPDATES, serve_config

    profile = tmp_path / "model.csv"
    profile.write_text("parameter,value\nstep_s0,0.03\nprompt_token_s,0.001\ndecode_seq_s,0.001\n")
    app = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-nixl-in-background"]))
    measured = sim_config("splitserve-nixl-in-background", app, profile)
    what_if = sim_config("splitserve-nixl-in-background", app, profile, kv_load_steps=0)
    assert (measured.cluster.decode.kv_load_steps, what_if.cluster.decode.kv_load_steps) == (1, 0)
    assert what_if.cluster.prefill.kv_load_steps == 0
    assert what_if.cluster.decode.max_num_seqs == measured.cluster.decode.max_num_seqs  # nothing else changes
    # Both backends load inside the step as the app ships them (transfer.is_load_in_step), unless set not to.
    for name, kv_load_steps in (("splitserve-object-store", 0), ("splitserve-nixl", 0),
                                ("splitserve-nixl-in-background", 1)):
        shipped = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES[name]))
        assert sim_config(name, shipped, profile).cluster.decode.kv_load_steps == kv_load_steps
    in_background = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-object-store-in-background"]))
    assert sim_config("splitserve-object-store-in-background", in_background,
                      profile).cluster.decode.kv_load_steps == 1


def test_planning_designs_and_the_cheapest_pools():
    import argparse

    from bench.sim_plan import design_config, plan_lines
    from bench.slo import Reference

    base = SimConfig(model=MODEL)
    collocated = design_config(base, "collocated", 4, 0)
    assert (collocated.cluster.mode, collocated.cluster.num_decode, collocated.scheduling.policy) == \
        ("collocated", 4, "always_split")
    split = design_config(base, "token_jsq", 5, 2)
    assert (split.cluster.num_prefill, split.cluster.num_decode, split.scheduling.policy) == (2, 3, "token_jsq")
    rows = [{"design": "collocated", "num_machines": 2, "num_prefill": 0, "num_decode": 2, "margin_at_rate": 1.4,
             "meets_at_rate": False, "goodput_req_s": 0.8},
            {"design": "collocated", "num_machines": 4, "num_prefill": 0, "num_decode": 4, "margin_at_rate": 0.7,
             "meets_at_rate": True, "goodput_req_s": 1.9},
            {"design": "predictive", "num_machines": 2, "num_prefill": 1, "num_decode": 1, "margin_at_rate": 0.9,
             "meets_at_rate": True, "goodput_req_s": 1.1},
            {"design": "predictive", "num_machines": 4, "num_prefill": 1, "num_decode": 3, "margin_at_rate": 0.5,
             "meets_at_rate": True, "goodput_req_s": 2.6}]
    args = argparse.Namespace(trace="conv", rate=1.0, duration=60.0, config="host.yaml")
    lines = plan_lines(rows, args, Reference(system="x", commit="y", fits={}), 0.0)
    assert "| collocated | 4 | both phases | 0.7 |" in lines and "| predictive | 2 | 1:1 | 0.9 |" in lines
    assert "| predictive | 1.1 | 2.6 |" in lines


def test_planning_over_windows_of_the_trace_meets_only_where_every_window_does():
    import argparse

    from bench.sim_plan import design_row, plan_lines
    from bench.simulate import trace_requests
    from bench.slo import Reference

    # Windows are different stretches of the trace, each at the asked rate; window 0 is the single-window replay.
    windows = [trace_requests("conv", rate_per_s=1.0, duration_s=60.0, window=window, num_windows=3)
               for window in range(3)]
    assert windows[0] == trace_requests("conv", rate_per_s=1.0, duration_s=60.0)
    assert all(55 <= len(requests) <= 65 for requests in windows)
    assert len({tuple(request.prompt_tokens for request in requests[:10]) for requests in windows}) == 3
    row = design_row(("predictive", 4, 1), margins=[0.8, 1.2, 0.9], goodputs=[1.5, 0.9, 1.2])
    assert (row["meets_at_rate"], row["num_windows_meeting"], row["margin_at_rate"]) == (False, 2, 0.9)
    assert (row["goodput_req_s"], row["goodput_min_req_s"], row["goodput_max_req_s"]) == (1.2, 0.9, 1.5)
    assert row["goodput_by_window"] == "1.500;0.900;1.200"
    collocated = design_row(("collocated", 4, 0), margins=[0.8, 0.7, 0.9], goodputs=[1.0, 1.1, 0.8])
    args = argparse.Namespace(trace="conv", rate=1.0, duration=60.0, config="host.yaml", windows=3)
    lines = plan_lines([row, collocated], args, Reference(system="x", commit="y", fits={}), 0.0)
    assert "| collocated | 4 | both phases | 0.8 |" in lines and "| predictive | none of [4] | – | – |" in lines
    assert "| predictive | 1.2 [0.9-1.5] |" in lines and "| collocated | 1 [0.8-1.1] |" in lines


def test_planning_refuses_no_windows_before_starting_ray(capsys):
    from bench import sim_plan

    with pytest.raises(SystemExit):
        sim_plan.main(["--config", "bench/sim/configs/host_1p1d.yaml", "--rate", "1", "--windows", "0"])
    assert "--windows must be at least 1, not 0" in capsys.readouterr().err


def test_a_comparison_measured_before_a_setting_existed_is_replayed_with_its_former_value(monkeypatch):
    """A recorded config names only what serve_config.yaml and its system set: a comparison measured before the
    TBT guard could yield (`split_late_slowdown`, added in dcd0b91) replays with it never yielding, one measured
    since with the default, and a config that names the setting keeps its own value."""
    import copy

    from bench import sim_validate
    from bench.systems import SPLITSERVE_UPDATES, serve_config

    app = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-predictive"]))
    app["applications"][0]["args"]["scheduling"] = {"policy": "predictive"}  # as older run.json files hold it
    monkeypatch.setattr(sim_validate, "is_ancestor", lambda commit, of: of != "before")

    def scheduling(config):
        return config["applications"][0]["args"]["scheduling"]

    assert scheduling(sim_validate.as_measured(app, "before")) == {"policy": "predictive", "split_late_slowdown": None}
    assert scheduling(sim_validate.as_measured(app, "since")) == {"policy": "predictive"}
    assert scheduling(app) == {"policy": "predictive"}  # the recorded config itself is left as it was
    named = copy.deepcopy(app)
    scheduling(named)["split_late_slowdown"] = 4.0
    assert scheduling(sim_validate.as_measured(named, "before"))["split_late_slowdown"] == 4.0
    monkeypatch.setattr(sim_validate, "is_ancestor", lambda commit, of: None)  # git cannot tell: left as it is
    assert scheduling(sim_validate.as_measured(app, "before")) == {"policy": "predictive"}


def test_a_nixl_comparison_measured_before_nixl_loaded_in_step_is_replayed_loading_in_the_background(monkeypatch):
    """`transfer.is_load_in_step` covered the object store only until NIXL could load in step too (666a193): a NIXL
    comparison measured before that replays with the setting off even where its recorded config says true (serve_config.yaml's
    default since e80d35d); one measured since, and the object store, as recorded."""
    import copy

    from bench import sim_validate
    from bench.systems import SPLITSERVE_UPDATES, serve_config

    def transfer(name, measured):
        app = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES[name]))
        return sim_validate.as_measured(app, measured)["applications"][0]["args"]["transfer"]

    monkeypatch.setattr(sim_validate, "is_ancestor", lambda commit, of: of == "since")
    assert transfer("splitserve-nixl", "before")["is_load_in_step"] is False
    assert transfer("splitserve-nixl-in-step", "since")["is_load_in_step"] is True  # as recorded
    monkeypatch.setattr(sim_validate, "is_ancestor",
                        lambda commit, of: of == "since" or commit == sim_validate.FORMER_DEFAULTS[
                            ("transfer", "is_load_in_step")][0])
    assert transfer("splitserve-object-store", "before")["is_load_in_step"] is True  # serve_config.yaml's, as recorded

    # Recorded as null (19b28e4 until both loaded in step by default): the object store in step, NIXL in the background.
    for name, is_in_step in (("splitserve-object-store", True), ("splitserve-nixl", False)):
        app = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES[name]))
        app["applications"][0]["args"]["transfer"]["is_load_in_step"] = None
        assert sim_validate.as_measured(app, "since")["applications"][0]["args"]["transfer"]["is_load_in_step"] \
            is is_in_step
