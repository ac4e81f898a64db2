"""A role's `scheduling_policy: shortest_first` (deployments/scheduling/prompt_order.py): the priority each engine
replica gives a prompt, walked through an engine's waiting queue as vLLM orders it (priority, then arrival)."""

from __future__ import annotations

import heapq

import pytest

from deployments.scheduling.prompt_order import shortest_first_priority


class _Engine:
    """An engine that computes one prompt at a time, from a queue ordered as vLLM's priority scheduler orders it."""

    def __init__(self, aging: float):
        self.aging = aging
        self.num_computed_tokens = 0
        self.waiting: list[tuple[int, int, str, int]] = []  # (priority, arrival, name, tokens)
        self.num_arrivals = 0
        self.started: dict[str, int] = {}  # name -> the work clock when it started

    def arrive(self, name: str, num_tokens: int) -> None:
        priority = shortest_first_priority(num_tokens, self.num_computed_tokens, self.aging)
        heapq.heappush(self.waiting, (priority, self.num_arrivals, name, num_tokens))
        self.num_arrivals += 1

    def run_one(self) -> str:
        _, _, name, num_tokens = heapq.heappop(self.waiting)
        self.started[name] = self.num_computed_tokens
        self.num_computed_tokens += num_tokens
        return name


def test_prompts_waiting_together_run_shortest_first():
    engine = _Engine(aging=1.0)
    for name, num_tokens in [("long", 700), ("short", 40), ("middle", 300)]:
        engine.arrive(name, num_tokens)
    assert [engine.run_one() for _ in range(3)] == ["short", "middle", "long"]


def test_aging_zero_is_first_come_first_served():
    engine = _Engine(aging=0.0)
    for name, num_tokens in [("long", 700), ("short", 40), ("middle", 300)]:
        engine.arrive(name, num_tokens)
    assert [engine.run_one() for _ in range(3)] == ["long", "short", "middle"]


@pytest.mark.parametrize("aging", [0.5, 1.0, 3.0])
def test_a_long_prompt_is_not_starved_by_an_endless_stream_of_short_ones(aging):
    """A 1,000-token prompt amid 50-token prompts, one arriving per short prompt computed: it starts once the
    engine has computed about `aging` times its tokens since it came, and from then on nothing passes it."""
    engine = _Engine(aging=aging)
    engine.arrive("short-0", 50)
    engine.arrive("long", 1000)
    arrived_at = engine.num_computed_tokens
    for index in range(1, 1000):
        name = engine.run_one()
        if name == "long":
            break
        engine.arrive(f"short-{index}", 50)
    else:
        pytest.fail("the long prompt never ran")
    waited = engine.started["long"] - arrived_at
    # A short one passes while the work since the long one came plus aging x 50 stays under aging x 1,000.
    assert aging * (1000 - 50) - 50 <= waited <= aging * 1000


def test_a_request_without_a_prompt_to_compute_is_passed_by_nothing_that_comes_after_it():
    engine = _Engine(aging=1.0)
    engine.arrive("decode-with-kv", 0)
    engine.arrive("tiny", 1)
    assert engine.run_one() == "decode-with-kv"


def test_priorities_are_vllms_ints_and_bad_aging_is_refused():
    assert shortest_first_priority(333, 1000, 1.5) == 1000 + 500
    assert isinstance(shortest_first_priority(3, 7, 0.3), int)
    with pytest.raises(ValueError, match="aging must be at least 0"):
        shortest_first_priority(10, 0, -1)


def test_an_engine_replica_sets_each_requests_priority_from_its_dispatch_and_its_engines_clock():
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    from deployments.engine_counters import EngineCounters
    from deployments.engine_server import EngineServer
    from deployments.messages import Dispatch

    class _FakeEngine:
        def counters(self) -> EngineCounters:
            return EngineCounters(num_prompt_tokens_computed=5000)

    request = CompletionRequest(model="m", prompt="hello", max_tokens=4, priority=-7)
    server = EngineServer()
    assert server._in_order(request, Dispatch(router_id="r", seq=1, num_prompt_tokens=300)) is request  # fcfs
    server._engine, server._shortest_first_aging = _FakeEngine(), 2.0
    ordered = server._in_order(request, Dispatch(router_id="r", seq=1, num_prompt_tokens=300))
    assert ordered.priority == 5000 + 600  # the client's own priority is replaced: the order is the operator's
    assert ordered.model_dump(exclude={"priority"}) == request.model_dump(exclude={"priority"})
    assert server._in_order(request, None).priority == 5000  # no size known: the clock
