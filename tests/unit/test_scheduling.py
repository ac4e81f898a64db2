"""The scheduler (deployments/scheduling/) with fake loads: reports and the router's own accounting, the learned
rates, each policy's choice where it should make it, and a decision's cost with a thousand engines."""

from __future__ import annotations

import heapq
import math

import pytest
from pydantic import ValidationError

from deployments.messages import LoadReport
from deployments.scheduling import loads
from deployments.scheduling.loads import EngineLoad, LoadBook
from deployments.scheduling.policies import (
    Conditional,
    MixedPool,
    Path,
    Predictive,
    RequestFacts,
    TokenJSQ,
    make_policy,
)
from deployments.scheduling.rates import EngineLines, Rates, WeightedLine
from serve_app.config import AppConfig, SchedulingConfig


def _book(prefill: dict[str, int], decode: dict[str, int], *, decode_requests: dict[str, int] | None = None,
          prefill_requests: dict[str, int] | None = None, rates: Rates | None = None) -> LoadBook:
    """Engines with the given pending prompt tokens (and running requests)."""
    book = LoadBook(drain_time=(lambda engine_id, tokens: rates.prefill_s(engine_id, tokens)) if rates else
                    LoadBook().drain_time)
    for engine_id, tokens in prefill.items():
        book.report(EngineLoad(engine_id, "prefill", num_pending_prompt_tokens=tokens, num_waiting=int(tokens > 0),
                               num_running=(prefill_requests or {}).get(engine_id, 0)))
    for engine_id, tokens in decode.items():
        book.report(EngineLoad(engine_id, "decode", num_pending_prompt_tokens=tokens,
                               num_running=(decode_requests or {}).get(engine_id, 0)))
    return book


def _request(num_prompt_tokens: int = 500) -> RequestFacts:
    return RequestFacts(request_id="r1", num_prompt_tokens=num_prompt_tokens)


def _learned(*, prefill_ms_per_token: float = 2.5, step_ms: float = 75.0, step_ms_per_stream: float = 2.0,
             transfer_ms: float = 15.0, engines: tuple[str, ...] = ("p0", "d0")) -> Rates:
    """Rates that have seen enough of every kind: prefill 2.5 ms/token, a decode step 75 ms + 2 ms per stream."""
    rates = Rates(min_observations=4)
    for engine_id in engines:
        for tokens in (100, 400, 800, 1600):
            rates.observe_prefill(engine_id, tokens, 0.010 + prefill_ms_per_token * tokens / 1000)
        for streams in (1, 4, 8, 16):
            rates.observe_decode_step(engine_id, streams, (step_ms + step_ms_per_stream * streams) / 1000)
    for tokens in (100, 400, 800, 1600):
        rates.observe_handover("d0", tokens, 0, transfer_ms / 1000)  # on an idle decode engine: the transfer
    return rates


# The book: reports, the router's own traffic, shortest queues.

def test_reports_and_the_routers_own_traffic_make_the_estimate():
    book = _book({"p0": 0, "p1": 0}, {"d0": 0})
    # 1. The router sends dispatches 1 and 2 (500 and 200 prompt tokens) to p0: its queue is longer.
    book.dispatched("p0", 1, 500)
    book.dispatched("p0", 2, 200)
    assert book.engine("p0").num_pending_prompt_tokens == 700 and book.least_loaded("prefill") == "p1"
    # 2. A report from p0 made after it had received dispatch 1, not 2, with 300 tokens of another router's:
    #    this router's share in it (dispatch 1) gives way to what the router knows now (dispatches 1 and 2).
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=800, num_waiting=2, num_own_requests=1,
                           num_own_pending_prompt_tokens=500))
    assert book.engine("p0").num_pending_prompt_tokens == 1000 and book.engine("p0").num_requests == 3
    # 3. Dispatch 1's prompt finishes, then the request: it leaves the estimate at once, report or not.
    book.prompt_done("p0", 1)
    assert (book.engine("p0").num_pending_prompt_tokens, book.engine("p0").num_requests) == (500, 3)
    book.request_done("p0", 1)
    book.request_done("p0", 2)
    assert (book.engine("p0").num_pending_prompt_tokens, book.engine("p0").num_requests) == (300, 1)
    # 4. A report made before they finished, arriving after, brings neither back: it is still only the other
    #    router's 300 tokens (the race a one-at-a-time client ran into: its next request saw the last one).
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=1000, num_waiting=3, num_own_requests=2,
                           num_own_pending_prompt_tokens=700))
    assert (book.engine("p0").num_pending_prompt_tokens, book.engine("p0").num_requests) == (300, 1)
    # 5. Late or repeated answers change nothing; nothing goes negative.
    book.prompt_done("p0", 2)
    book.request_done("p0", 1)
    book.report(EngineLoad("p0", "prefill", num_own_requests=1, num_own_pending_prompt_tokens=50))
    assert (book.engine("p0").num_pending_prompt_tokens, book.engine("p0").num_requests) == (0, 0)
    # 6. An engine that is gone is never chosen, and the count of engines follows.
    book.remove("p1")
    assert book.least_loaded("prefill") == "p0" and book.num_engines("prefill") == 1
    book.dispatched("p1", 4, 10)  # a late answer from the removed engine changes nothing
    assert book.engine("p1") is None and book.least_loaded("prefill", skip=frozenset({"p0"})) is None


def test_an_engines_prompt_throughput_follows_its_own_count_and_fades_when_it_goes_quiet():
    book = LoadBook()
    # 1. First report: a count, no rate yet (nothing to take its growth from).
    book.report(EngineLoad("p0", "prefill", num_prompt_tokens_computed=5_000))
    assert book.prompt_tokens_per_s("p0") == 0.0
    # 2. 400 tokens a second for 60 s, reported every 0.5 s (the count is the engine's: every router's prompts).
    for step in range(1, 121):
        book.now_s = step * 0.5
        book.report(EngineLoad("p0", "prefill", num_prompt_tokens_computed=5_000 + 200 * step))
    assert book.prompt_tokens_per_s("p0") == pytest.approx(400, rel=0.03)
    # 3. Quiet: no report changes (the router only passes changed loads on), the clock alone makes it fade.
    book.now_s += loads.PROMPT_RATE_HORIZON_S
    assert book.prompt_tokens_per_s("p0") == pytest.approx(400 / math.e, rel=0.03)
    book.now_s += 4 * loads.PROMPT_RATE_HORIZON_S
    assert book.prompt_tokens_per_s("p0") < 4
    # 4. An engine that restarted under the same id (its count back near 0) adds nothing negative.
    book.report(EngineLoad("p0", "prefill", num_prompt_tokens_computed=10))
    assert 0 <= book.prompt_tokens_per_s("p0") < 4 and book.prompt_tokens_per_s("gone") == 0.0


def test_an_engines_load_tracker_counts_each_routers_share_until_the_request_ends():
    from deployments.engine_counters import EngineCounters
    from deployments.engine_load import LoadTracker
    from deployments.messages import Dispatch

    tracker = LoadTracker("prefill-0-x", "prefill")
    counters = EngineCounters(num_running_requests=2)
    # 1. Two routers' requests and one without a dispatch (a Python caller) are held.
    with tracker.counted(Dispatch(router_id="r1", seq=1, num_prompt_tokens=500)) as first, \
            tracker.counted(Dispatch(router_id="r2", seq=1, num_prompt_tokens=200)), tracker.counted(None):
        report = tracker.report(counters, [])
        assert (report.num_requests, report.num_pending_prompt_tokens, report.num_running) == (3, 700, 2)
        assert report.by_router == {"r1": (1, 500), "r2": (1, 200)}
        # 2. r1's prompt is computed: its tokens leave, once.
        first.prompt_done()
        first.prompt_done()
        assert tracker.report(counters, []).by_router["r1"] == (1, 0)
    # 3. However the block ends, everything is released and no router is left behind.
    assert (tracker.num_requests, tracker.num_pending_prompt_tokens, tracker.by_router) == (0, 0, {})
    with pytest.raises(RuntimeError), tracker.counted(Dispatch(router_id="r1", seq=2, num_prompt_tokens=9)):
        raise RuntimeError("the engine failed")
    assert (tracker.num_requests, tracker.num_pending_prompt_tokens, tracker.by_router) == (0, 0, {})
    # 4. A report survives Serve's routing-stats round trip.
    from deployments.messages import LoadReport
    assert LoadReport.from_routing_stats(report.to_routing_stats()) == report


def test_two_routers_each_know_their_own_requests_exactly_whatever_the_order_of_messages():
    """Two router replicas send to one engine; dispatches, the engine's answers and its reports arrive in a random
    order. At every step each router's estimate is what it has not yet heard the end of, of its own requests (never
    less than the truth), plus the other router's share as of the last report it got (all it can know of that)."""
    import contextlib
    import random

    from deployments.engine_counters import EngineCounters
    from deployments.engine_load import LoadTracker
    from deployments.scheduler import Scheduler

    tracker = LoadTracker("engine-e", "prefill")
    delivered: dict[str, tuple[int, dict]] = {}  # router -> (version, stats) it has

    def report_now() -> dict:
        return {"e": tracker.report(EngineCounters(), []).to_routing_stats()}

    def deliver(name: str, stats: dict) -> None:
        delivered[name] = (delivered.get(name, (0, {}))[0] + 1, stats)
        routers[name].refresh()

    routers = {name: Scheduler(SchedulingConfig(policy="token_jsq"), router_id=name, prefill_deployment="P",
                               decode_deployment="D", prompt_size=lambda request: 0,
                               routing_stats=lambda deployment, name=name: delivered[name] if deployment == "P"
                               else (0, {}))
               for name in ("A", "B")}
    for name in routers:
        deliver(name, report_now())
    rng = random.Random(7)
    flights: dict[str, list] = {"A": [], "B": []}
    in_transit: list = []  # (router, flight): sent, not yet at the engine
    held: list = []  # (router, flight, exit stack, counted): at the engine
    news: list = []  # (flight, "prompt" or "end"): the engine's answers, not yet at the router
    reports: dict[str, list[dict]] = {"A": [], "B": []}  # made, not yet delivered (Serve keeps their order)
    for _ in range(3000):
        move = rng.choice(["send", "arrive", "compute", "finish", "answer", "report", "deliver"])
        if move == "send":
            name = rng.choice("AB")
            flights[name].append(flight := routers[name].dispatch("e", rng.randint(1, 500)))
            in_transit.append((name, flight))
        elif move == "arrive" and in_transit:
            name, flight = in_transit.pop(rng.randrange(len(in_transit)))
            stack = contextlib.ExitStack()
            held.append((name, flight, stack, stack.enter_context(tracker.counted(flight.dispatch))))
        elif move == "compute" and held:
            _, flight, _, counted = rng.choice(held)
            if counted.num_pending_prompt_tokens:
                counted.prompt_done()
                news.append((flight, "prompt"))
        elif move == "finish" and held:
            _, flight, stack, _ = held.pop(rng.randrange(len(held)))
            stack.close()
            news.append((flight, "end"))
        elif move == "answer" and news:
            flight, what = news.pop(rng.randrange(len(news)))
            flight.prompt_done() if what == "prompt" else flight.request_done()
        elif move == "report":
            stats = report_now()
            for name in routers:
                reports[name].append(stats)
        elif move == "deliver":
            name = rng.choice("AB")
            if reports[name]:
                deliver(name, reports[name].pop(0))
        for name, other in (("A", "B"), ("B", "A")):
            estimate = routers[name].book.engine("e")
            reported_other = LoadReport.from_routing_stats(delivered[name][1]["e"]).by_router.get(other, (0, 0))
            unheard_requests = [flight for flight in flights[name] if not flight.is_done]
            unheard_tokens = sum(flight.dispatch.num_prompt_tokens for flight in flights[name]
                                 if not flight.is_prompt_done)
            true_requests, true_tokens = tracker.by_router.get(name, [0, 0])
            assert estimate.num_requests == len(unheard_requests) + reported_other[0]
            assert estimate.num_pending_prompt_tokens == unheard_tokens + reported_other[1]
            assert len(unheard_requests) >= true_requests and unheard_tokens >= true_tokens
    # Every message delivered and a fresh report at both routers: both know the truth, which is nothing.
    for _, flight in in_transit:
        flight.request_done()  # never reached the engine: the router hears of the failure
    for _, flight, stack, _ in held:
        stack.close()
        flight.request_done()
    for flight, _ in news:
        flight.request_done()
    final = report_now()
    for name in routers:
        deliver(name, final)
        engine = routers[name].book.engine("e")
        assert (engine.num_requests, engine.num_pending_prompt_tokens, tracker.num_requests) == (0, 0, 0)
    assert tracker.by_router == {}


def test_rekeying_follows_new_rates():
    book = _book({"p0": 1000, "p1": 600}, {"d0": 0})
    assert book.least_loaded("prefill") == "p1"
    seconds_per_token = {"p0": 0.001, "p1": 0.01}  # p1 turns out ten times slower
    book.drain_time = lambda engine_id, num_tokens: num_tokens * seconds_per_token[engine_id]
    book.refresh_keys()
    assert book.least_loaded("prefill") == "p0"


def test_a_rekey_orders_the_book_as_a_full_rebuild_would_while_pushing_only_what_changed():
    """Random reports, dispatches and rate changes on 40 engines: after every re-key the book's order must be the
    one a rebuild from scratch gives (drain time under the current rates, requests held, the order engines joined),
    though a re-key pushes only engines pushed since the last one or with prompts pending."""
    rng = __import__("random").Random(4)
    seconds_per_token = {f"e{index}": 0.001 for index in range(40)}
    book = LoadBook(drain_time=lambda engine_id, num_tokens: num_tokens * seconds_per_token[engine_id])
    for engine_id in seconds_per_token:
        book.report(EngineLoad(engine_id, "prefill", num_pending_prompt_tokens=rng.choice((0, 0, 100, 300))))
    joined = list(seconds_per_token)
    num_rekeyed = []
    for seq in range(1, 401):
        engine_id = rng.choice(joined)
        action = rng.random()
        if action < 0.3:
            book.report(EngineLoad(engine_id, "prefill", num_pending_prompt_tokens=rng.choice((0, 0, 50, 200)),
                                   num_running=rng.randint(0, 2)))
        elif action < 0.6:
            book.dispatched(engine_id, seq, rng.choice((0, 120)))
        elif action < 0.7:
            seconds_per_token[engine_id] = rng.choice((0.0005, 0.001, 0.004))  # its rate moved: no push
        if seq % 10 == 0:
            num_entries = len(book._heaps["prefill"])
            book.refresh_keys()
            num_rekeyed.append(len(book._heaps["prefill"]) - num_entries)
            expected = sorted(joined, key=lambda e: (book.drain_s(e), book.engine(e).num_requests, joined.index(e)))
            assert book.first_loaded("prefill", len(joined)) == expected, seq
    # Engines idle and untouched since the last re-key keep their entries: a re-key pushes fewer than all of them.
    assert max(num_rekeyed[1:]) < len(joined)  # (the first re-keys every engine: each was pushed on joining)


def test_jsq_ties_go_to_the_engine_unchanged_longest_and_rotate():
    book = _book({"p0": 0, "p1": 0, "p2": 0}, {"d0": 0})
    chosen = []
    for _ in range(6):
        engine_id = book.least_loaded("prefill")
        chosen.append(engine_id)
        book.dispatched(engine_id, len(chosen), 100)
    assert chosen == ["p0", "p1", "p2", "p0", "p1", "p2"]
    # Equal pending tokens: fewer requests held wins.
    book = _book({}, {"d0": 0, "d1": 0}, decode_requests={"d0": 3, "d1": 1})
    assert book.least_loaded("decode") == "d1"


def test_a_decision_costs_o_log_engines_with_a_thousand_engines(monkeypatch):
    heap_operations = []

    class CountingHeapq:
        @staticmethod
        def heappush(heap, item):
            heap_operations.append("push")
            heapq.heappush(heap, item)

        @staticmethod
        def heappop(heap):
            heap_operations.append("pop")
            return heapq.heappop(heap)

        heapify = staticmethod(heapq.heapify)

    config = SchedulingConfig(policy="mixed_pool")
    for num_engines in (100, 1000):
        book = _book({f"p{i}": (i * 37) % 1000 for i in range(num_engines)},
                     {f"d{i}": 0 for i in range(num_engines)})
        policies = [make_policy(config.model_copy(update={"policy": name})) for name in
                    ("token_jsq", "conditional", "mixed_pool", "predictive")]
        rates = _learned(engines=("p0", "d0"))
        monkeypatch.setattr(loads, "heapq", CountingHeapq)
        heap_operations.clear()
        num_decisions = 400
        for index in range(num_decisions):
            decision = policies[index % len(policies)].decide(_request(300 + index % 700), book, rates)
            if decision.prefill_engine is not None:
                book.dispatched(decision.prefill_engine, index, 300)
            if decision.decode_engine is not None:
                book.dispatched(decision.decode_engine, index, 0)
        monkeypatch.setattr(loads, "heapq", heapq)
        # Each heap operation is O(log engines); their number per decision does not grow with the engines.
        assert len(heap_operations) / num_decisions < 40, (num_engines, len(heap_operations))


# The rates.

def test_a_weighted_line_learns_a_line_and_follows_a_change():
    line = WeightedLine(half_life=8)
    for x in (100, 200, 400, 800) * 4:
        line.observe(x, 0.01 + 0.002 * x)
    assert line.intercept == pytest.approx(0.01, rel=1e-6) and line.slope == pytest.approx(0.002, rel=1e-6)
    for x in (100, 200, 400, 800) * 16:  # the engine got twice as slow: recent observations win
        line.observe(x, 0.01 + 0.004 * x)
    assert line.slope == pytest.approx(0.004, rel=0.05)
    same_x = WeightedLine()
    for _ in range(5):
        same_x.observe(3, 0.5)
    assert (same_x.slope, same_x.predict(3)) == (0.0, pytest.approx(0.5))


def test_rates_are_not_trusted_until_each_kind_was_seen_enough():
    rates = Rates(min_observations=4)
    assert not rates.is_known() and rates.prefill_s("p0", 100) == 0.0
    for tokens in (100, 200, 300, 400):
        rates.observe_prefill("p0", tokens, tokens / 1000)
    assert rates.prefill_s("p0", 500) == pytest.approx(0.5) and not rates.is_known()
    # An engine never seen prefilling (a decode engine) gets its peers' estimate.
    assert rates.prefill_s("d0", 500) == pytest.approx(0.5)
    assert _learned().is_known()


def test_an_engine_without_a_line_gets_its_peers_mean_line_without_a_pass_over_them():
    """With a thousand engines that each learned a line, an engine without one (a new replica, a decode engine
    asked for a prefill estimate) gets the mean of their lines, exactly, and as their lines move; and the estimate
    never walks the engines (a simulator of 1,000 machines spent most of its time there), so a decision stays
    O(log engines)."""
    lines = EngineLines(half_life=8, min_observations=4)
    for index in range(1000):
        for tokens in (100, 200, 400, 800):
            lines.observe(f"p{index}", tokens, 0.001 * (1 + index % 7) + 1e-6 * (1 + index % 5) * tokens)
    for tokens in (100, 200, 400, 800) * 8:  # one engine got slower: the mean line follows it
        lines.observe("p3", tokens, 0.5 + 1e-3 * tokens)
    lines.observe("p1000", 100, 9.0)  # not trusted yet: not in the mean
    expected = sum(lines.by_engine[f"p{index}"].predict(500) for index in range(1000)) / 1000

    class NoPass(dict):
        def _refused(self, *args):
            raise AssertionError("an estimate walked every engine")
        __iter__ = values = items = keys = _refused

    lines.by_engine = NoPass(lines.by_engine)
    assert lines.num_trusted == 1000
    assert lines.estimate("new", 500) == pytest.approx(expected, rel=1e-9)
    assert lines.estimate("p3", 500) == pytest.approx(0.5 + 1e-3 * 500, rel=0.05)  # its own line (old points fading)
    assert EngineLines(half_life=8, min_observations=4).estimate("new", 500) == 0.0  # no line anywhere yet


def test_hand_overs_timed_under_load_never_pass_for_an_idle_engines_transfer():
    """What a probe measured: after a loaded cell, one hand-over line predicted an idle engine's 0.1 s transfer at
    5-6 s and forgot it at 2% a request. The transfer is learned from idle decode engines, the wait from busy ones."""
    rates = Rates(min_observations=4)
    # 1. Before any idle hand-over, busy ones stand for both (a start under load still learns).
    for num_ahead in (2, 4, 6, 8):
        rates.observe_handover("d0", 300, num_ahead, 0.5 * num_ahead)
    assert rates.num_handovers == 4 and rates.handover_s("d0", 300, 4) == pytest.approx(2.0)
    assert rates.transfer_s(300) == 0.0 and rates.handover_s("d0", 300, 0) == pytest.approx(0.0, abs=1e-9)
    # 2. Idle hand-overs teach the transfer; the loaded ones, however many, stay in the wait.
    for tokens in (100, 200, 300, 400):
        rates.observe_handover("d0", tokens, 0, 0.1 + tokens / 10_000)
    for _ in range(200):
        rates.observe_handover("d0", 300, 8, 4.0)
    assert rates.handover_s("d0", 300, 0) == pytest.approx(0.13) == rates.transfer_s(300)
    assert rates.handover_s("d0", 300, 8) == pytest.approx(4.0, rel=0.02)
    # 3. Another decode engine not yet seen busy waits as its peers do.
    assert rates.handover_s("d1", 300, 8) == pytest.approx(rates.handover_s("d0", 300, 8))
    assert set(rates.summary()) == {"prefill_s_per_token", "decode_step_s_per_stream", "transfer_s_per_token",
                                    "handover_wait_s_per_request_ahead"}
    assert rates.summary()["transfer_s_per_token"]["pool"]["num_observations"] == 4


# The policies.

def test_token_jsq_splits_to_each_pools_shortest_queue():
    book = _book({"p0": 900, "p1": 100}, {"d0": 0, "d1": 0}, decode_requests={"d0": 5, "d1": 2})
    decision = TokenJSQ().decide(_request(), book, Rates())
    assert (decision.path, decision.prefill_engine, decision.decode_engine) == (Path.SPLIT, "p1", "d1")
    assert make_policy(SchedulingConfig(policy="always_split")).decide(_request(), book, Rates()).prefill_engine is None  # Serve's pick


def test_conditional_runs_short_prompts_and_any_prompt_behind_a_long_queue_on_decode():
    policy = Conditional(SchedulingConfig(policy="conditional", max_local_prompt_tokens=256,
                                          max_prefill_queue_requests=2))
    idle = _book({"p0": 0}, {"d0": 0})
    assert policy.decide(_request(200), idle, Rates()).path == Path.DECODE_LOCAL
    assert policy.decide(_request(1000), idle, Rates()).path == Path.SPLIT
    busy = _book({"p0": 0}, {"d0": 0})
    busy.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=3000, num_running=1, num_waiting=1))
    decision = policy.decide(_request(1000), busy, Rates())
    assert (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d0") and "2 requests" in decision.reason


def test_mixed_pool_borrows_a_decode_engine_while_prefill_is_over_its_threshold_and_returns_it():
    policy = MixedPool(SchedulingConfig(policy="mixed_pool", borrow_tokens=1000, return_tokens=200))
    book = _book({"p0": 0}, {"d0": 0, "d1": 0}, decode_requests={"d0": 1, "d1": 4})
    # 1. Under the threshold: split.
    assert policy.decide(_request(), book, Rates()).path == Path.SPLIT and not policy.borrowed_decode
    # 2. Prefill's queue passes the threshold: the least-loaded decode engine joins the mixed pool and runs prompts.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=1500, num_waiting=3))
    decision = policy.decide(_request(), book, Rates())
    assert policy.borrowed_decode == {"d0"}
    assert (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d0")
    # 3. Still over: the next decode engine is lent too, the last one included; a split then decodes on the
    #    least-loaded of the lent engines (they keep decoding), and whole requests go where prompts drain first.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=5000, num_waiting=9))
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=6000, num_running=1))
    decision = policy.decide(_request(), book, Rates())
    assert policy.borrowed_decode == {"d0", "d1"}
    assert (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d1")
    book.report(EngineLoad("d1", "decode", num_pending_prompt_tokens=7000, num_running=4))
    decision = policy.decide(_request(), book, Rates())
    assert (decision.path, decision.prefill_engine, decision.decode_engine) == (Path.SPLIT, "p0", "d0")
    # 4. Between the thresholds it stays (hysteresis); under return_tokens it goes back.
    for engine_id in ("d0", "d1"):
        book.report(EngineLoad(engine_id, "decode", num_running=1))
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=600, num_waiting=1))
    policy.decide(_request(), book, Rates())
    assert policy.borrowed_decode == {"d0", "d1"}
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=100, num_waiting=1))
    assert policy.decide(_request(), book, Rates()).path == Path.SPLIT and not policy.borrowed_decode


def test_mixed_pool_on_one_prefill_and_one_decode_engine_balances_whole_requests_under_load():
    """The smallest PD cluster: the pools lend their only engines, so under load both run whole requests
    (collocated serving's balance), and at light load every request is split again."""
    policy = MixedPool(SchedulingConfig(policy="mixed_pool", borrow_tokens=500, return_tokens=100,
                                        borrow_requests=8, return_requests=3))
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 2})
    # 1. Light load: split.
    assert policy.decide(_request(), book, Rates()).path == Path.SPLIT
    # 2. Prompts queue on prefill: the only decode engine is lent and runs the next prompt whole, while its own
    #    queue of prompts drains sooner than prefill's.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=900, num_waiting=2))
    decision = policy.decide(_request(), book, Rates())
    assert policy.borrowed_decode == {"d0"} and (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d0")
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=1200, num_running=3))
    assert policy.decide(_request(), book, Rates()).path == Path.SPLIT  # prefill's queue is now the shorter
    # 3. Streams pile up on decode too: the only prefill engine is lent and runs whole requests while it holds
    #    fewer than decode; both engines are mixed.
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=1200, num_running=10))
    decision = policy.decide(_request(), book, Rates())
    assert policy.borrowed_prefill == {"p0"} and (decision.path, decision.prefill_engine) == (Path.PREFILL_LOCAL, "p0")
    # 4. The queues drain: both engines go back, and requests are split again.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=50, num_running=0))
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=0, num_running=1))
    decision = policy.decide(_request(), book, Rates())
    assert decision.path == Path.SPLIT and not policy.borrowed_decode and not policy.borrowed_prefill


def test_mixed_pool_lends_a_prefill_engine_to_an_overloaded_decode_pool():
    policy = MixedPool(SchedulingConfig(policy="mixed_pool", borrow_requests=8, return_requests=3))
    book = _book({"p0": 0, "p1": 0}, {"d0": 0}, decode_requests={"d0": 12})
    decision = policy.decide(_request(), book, Rates())
    assert (decision.path, decision.prefill_engine) == (Path.PREFILL_LOCAL, "p0")
    book.report(EngineLoad("d0", "decode", num_running=2))
    assert policy.decide(_request(), book, Rates()).path == Path.SPLIT and not policy.borrowed_prefill


def test_predictive_learns_first_then_takes_the_lowest_predicted_ttft():
    policy = Predictive(SchedulingConfig(policy="predictive"), chunk_tokens=256, expected_output_tokens=128)
    book = _book({"p0": 0}, {"d0": 0})
    # 1. Nothing learned yet: token JSQ, which is how the rates get observed.
    assert policy.decide(_request(), book, Rates()).reason.startswith("learning")
    rates = _learned()
    book = _book({"p0": 0}, {"d0": 0}, rates=rates)
    # 2. Both idle, a short prompt: decode-local saves the transfer and its chunks barely touch decode's streams.
    decision = policy.decide(_request(64), book, rates)
    assert decision.path == Path.DECODE_LOCAL and decision.predicted_ttft_s == pytest.approx(0.17, abs=0.01)
    # 3. Prefill has 4,000 tokens queued: a short prompt still goes to decode, now by a wide margin.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=4000, num_waiting=4))
    assert policy.decide(_request(64), book, rates).path == Path.DECODE_LOCAL


def test_the_tbt_guard_refuses_decode_local_when_its_chunks_would_slow_decodes_streams():
    config = SchedulingConfig(policy="predictive", tbt_mean_slowdown=1.25, tbt_gap_slowdown=5.0)
    rates = _learned()  # one stream's step 77 ms; with 9 streams 93 ms; a 256-token chunk 0.65 s, 64 tokens 0.17 s
    # Prefill holds 10 streams, its own mean bound (an 11th would step 97 ms, over 1.25x 77 ms): no prefill-local.
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 8}, prefill_requests={"p0": 10}, rates=rates)
    # 1. The gap bound: a step carrying a 256-token chunk takes 0.74 s, over 5x 77 ms: split.
    decision = Predictive(config, chunk_tokens=256, expected_output_tokens=4000).decide(_request(1500), book, rates)
    assert (decision.path, decision.prefill_engine, decision.decode_engine) == (Path.SPLIT, "p0", "d0")
    # 2. The mean bound: 64-token chunks pass the gap bound (0.26 s), but the prompt's 3.76 s of compute spread
    #    over a running request's 32 tokens adds 117 ms to its mean gap, over 1.25x 77 ms: split.
    short_outputs = Predictive(config, chunk_tokens=64, expected_output_tokens=32)
    assert short_outputs.decide(_request(1500), book, rates).path == Path.SPLIT
    # 3. Spread over 4,000 tokens it adds 1 ms: the guard lets it pass. Its 24 chunks ride 24 steps of the 8
    #    streams (2.2 s more than on an idle engine), so it runs there only while prefill's queue costs more.
    long_outputs = Predictive(config, chunk_tokens=64, expected_output_tokens=4000)
    assert long_outputs.decide(_request(1500), book, rates).path == Path.SPLIT
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=1000, num_waiting=1, num_running=10))
    decision = long_outputs.decide(_request(1500), book, rates)
    assert decision.path == Path.DECODE_LOCAL and decision.predicted_ttft_s == pytest.approx(3.76 + 24 * 0.091, 0.01)
    # 4. An idle decode engine has no stream to slow down: the guard that refused 1. lets the prompt run there,
    #    which saves the transfer and a step.
    idle = _book({"p0": 0}, {"d0": 0}, prefill_requests={"p0": 10}, rates=rates)
    assert Predictive(config, chunk_tokens=256, expected_output_tokens=4000).decide(
        _request(1500), idle, rates).path == Path.DECODE_LOCAL


def test_predictive_runs_a_prompt_on_an_idle_decode_engine_after_a_loaded_spell():
    """anchor-c1 in the probe at 6f4b016: after the code cells every request was split, predicted at 5-6 s."""
    policy = Predictive(SchedulingConfig(policy="predictive"), chunk_tokens=2048, expected_output_tokens=32)
    rates = _learned()
    for _ in range(100):  # 1. A loaded spell: hand-overs to a busy decode engine took seconds.
        rates.observe_handover("d0", 1500, 12, 4.0)
    book = _book({"p0": 0}, {"d0": 0}, rates=rates)
    # 2. One request at a time again: decode is idle, so its prompt runs there at the cost of its own prefill.
    decision = policy.decide(_request(300), book, rates)
    assert decision.path == Path.DECODE_LOCAL and decision.predicted_ttft_s == pytest.approx(0.76, abs=0.01)
    # 3. Had decode been busy, the split's predicted wait would count: 12 ahead cost 4 s more than idle.
    book.report(EngineLoad("d0", "decode", num_running=12))
    split = policy.decide(_request(300), book, rates)
    assert split.path != Path.SPLIT or split.predicted_ttft_s > 4.0


def test_predictive_sends_a_short_prompt_to_busy_decode_when_prefill_is_queued():
    """The TBT guard weighs the prompt's own compute, not a whole chunk's: 23 tokens beside 4 streams cost their
    tokens 2 ms each, within the bound, while prefill has 4,000 tokens ahead of it."""
    config = SchedulingConfig(policy="predictive")
    rates = _learned()
    book = _book({"p0": 4000}, {"d0": 0}, decode_requests={"d0": 4}, rates=rates)
    decision = Predictive(config, chunk_tokens=2048, expected_output_tokens=32).decide(_request(23), book, rates)
    assert (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d0")
    # A long prompt there would cost every running token far more: it is split while prefill's queue leaves its
    # TTFT within its bound (the next test: past it, the guard yields).
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=1000, num_waiting=1))
    assert Predictive(config, chunk_tokens=2048, expected_output_tokens=32).decide(
        _request(1500), book, rates).path == Path.SPLIT


def test_the_tbt_guard_yields_a_prompt_the_split_would_make_late_to_a_decode_engine_that_would_not():
    """xeon_split_term's sweep (code 2.4-4.2/s): the guard kept long prompts off decode while prefill's queue grew
    to tens of seconds, and predictive delivered 0.62-0.84 of the offered rate where collocated kept up."""
    config = SchedulingConfig(policy="predictive")  # split_late_slowdown 3: Splitwise's P90 TTFT bound
    rates = _learned()  # a 1,500-token prompt: 3.76 s of prefill; idle, the split's first token comes at 3.85 s
    policy = Predictive(config, chunk_tokens=2048, expected_output_tokens=32)
    # 1. Prefill holds 1,000 tokens: the split's first token is due at 6.4 s, within 3x 3.85 s. The guard holds
    #    (the prompt's compute would add 118 ms to each of decode's running tokens): split.
    book = _book({"p0": 1000}, {"d0": 0}, decode_requests={"d0": 4}, rates=rates)
    assert policy.decide(_request(1500), book, rates).path == Path.SPLIT
    # 2. Prefill holds 4,000 tokens: the split is due at 13.9 s, past 11.6 s, and decode would start the prompt at
    #    once (3.85 s): the guard yields, and the decision says so.
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=4000, num_waiting=4))
    decision = policy.decide(_request(1500), book, rates)
    assert (decision.path, decision.decode_engine, decision.reason) == (
        Path.DECODE_LOCAL, "d0", "split late, TBT guard yields")
    assert decision.predicted_ttft_s == pytest.approx(3.76 + 0.083, abs=0.01)
    # 3. Decode has a prompt of its own queued (4,000 tokens): the prompt would be late there too, so nothing is
    #    saved by slowing the streams: the guard holds, and the split (the earlier of the two) is taken.
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=4000, num_running=4))
    assert policy.decide(_request(1500), book, rates).path == Path.SPLIT
    # 4. `split_late_slowdown: null`: the guard never yields.
    book.report(EngineLoad("d0", "decode", num_running=4))
    never = Predictive(SchedulingConfig(policy="predictive", split_late_slowdown=None), chunk_tokens=2048,
                       expected_output_tokens=32)
    assert policy.decide(_request(1500), book, rates).path == Path.DECODE_LOCAL
    assert never.decide(_request(1500), book, rates).path == Path.SPLIT


def test_the_yield_can_keep_the_gap_bound_so_that_long_prompts_stay_off_a_busy_decode_engine():
    """xeon_in_step, code 2.4/s: the yield sent long prompts to decode, its steps took 1-2 s, every split waited
    for one of them and so was predicted late, and the yield took more long prompts (docs/benchmarks.md).
    `is_gap_bound_kept_on_yield` lets it lift the mean bound only."""
    rates = _learned()  # prefill 10 ms + 2.5 ms a token; decode's step 77 ms alone, 85 ms with 5 streams
    book = _book({"p0": 4000}, {"d0": 0}, decode_requests={"d0": 4}, rates=rates)
    shipped = Predictive(SchedulingConfig(policy="predictive"), chunk_tokens=2048, expected_output_tokens=8)
    kept = Predictive(SchedulingConfig(policy="predictive", is_gap_bound_kept_on_yield=True), chunk_tokens=2048,
                      expected_output_tokens=8)
    # 1. 1,500 tokens, the split late behind prefill's 4,000: on decode its step would take 85 ms + 3.76 s, past
    #    5x 77 ms. Shipped, the guard yields all the same; with the gap bound kept, it is split.
    assert shipped.decide(_request(1500), book, rates).path == Path.DECODE_LOCAL
    assert kept.decide(_request(1500), book, rates).path == Path.SPLIT
    # 2. 80 tokens: the mean bound refuses it (0.21 s over 8 expected tokens, 26 ms a token, past a quarter of
    #    77 ms), the gap bound does not (85 + 210 ms within 385): both yield.
    for policy in (shipped, kept):
        decision = policy.decide(_request(80), book, rates)
        assert (decision.path, decision.reason) == (Path.DECODE_LOCAL, "split late, TBT guard yields")
    # 3. 200 tokens already waiting on decode join the prompt's step (vLLM batches them): 85 ms + 0.71 s. With the
    #    gap bound kept, the prompt is split; shipped, it still goes to decode (TTFT 0.8 s within its 0.9 s bound).
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=200, num_running=4))
    assert kept.decide(_request(80), book, rates).path == Path.SPLIT
    assert shipped.decide(_request(80), book, rates).path == Path.DECODE_LOCAL


def test_the_guard_charges_the_prompt_not_the_stream_that_joins_decode_on_every_path():
    """In the policies run (f5fcfff) every code request whose TTFT passed 3x its reference was a 9-88 token prompt,
    split, waiting behind a long prompt on prefill: decode's batch alone stepped past 1.25x its single-stream step,
    and the guard charged that batch to the local path, though the split's stream joins the same batch. (The guard
    alone: it never yields here, `split_late_slowdown: null`.)"""
    policy = Predictive(SchedulingConfig(policy="predictive", split_late_slowdown=None), chunk_tokens=256,
                        expected_output_tokens=32)
    rates = _learned(step_ms_per_stream=10.0)  # 12 streams step 205 ms, 2.4x one stream's 85 ms
    book = _book({"p0": 4000}, {"d0": 0}, decode_requests={"d0": 12}, rates=rates)
    # 1. A 9-token prompt adds 1 ms to a running request's mean gap (its 33 ms over 32 tokens), within a quarter of
    #    85 ms: it runs on decode, instead of waiting 10 s behind prefill's 4,000 tokens.
    decision = policy.decide(_request(9), book, rates)
    assert (decision.path, decision.decode_engine) == (Path.DECODE_LOCAL, "d0")
    # 2. A 1,500-token prompt would add 117 ms to each: split, however busy prefill is.
    assert policy.decide(_request(1500), book, rates).path == Path.SPLIT


def test_the_guard_charges_a_local_chunk_a_requests_fixed_cost_or_only_its_compute_as_configured():
    """As served here a prefill line has a large intercept (a request's calls and its own forward pass): a 23-token
    prompt costs 0.21 s alone, of which 0.06 s is compute. Charged as a request, it would add 26 ms to each of a
    running request's 8 tokens, over a quarter of the 77 ms step (the 1.25x bound); charged its compute (it rides a
    step that runs anyway), 7 ms. (The guard alone: it never yields here, `split_late_slowdown: null`.)"""
    rates = Rates(min_observations=4)
    for tokens in (100, 400, 800, 1600):
        rates.observe_prefill("p0", tokens, 0.150 + 0.0025 * tokens)
        rates.observe_prefill("d0", tokens, 0.150 + 0.0025 * tokens)
    for streams in (1, 4, 8, 16):
        rates.observe_decode_step("d0", streams, (75.0 + 2.0 * streams) / 1000)
    for tokens in (100, 400, 800, 1600):
        rates.observe_handover("d0", tokens, 0, 0.015)
    assert rates.prompt_compute_s("d0", 23) == pytest.approx(0.0575)
    book = _book({"p0": 4000}, {"d0": 0}, decode_requests={"d0": 4}, rates=rates)
    as_request = Predictive(SchedulingConfig(policy="predictive", split_late_slowdown=None), chunk_tokens=2048,
                            expected_output_tokens=8)
    assert as_request.decide(_request(23), book, rates).path == Path.SPLIT
    as_compute = Predictive(SchedulingConfig(policy="predictive", tbt_guard_charge="compute",
                                             split_late_slowdown=None), chunk_tokens=2048, expected_output_tokens=8)
    assert as_compute.decide(_request(23), book, rates).path == Path.DECODE_LOCAL
    # A long prompt is still refused either way: 1,500 tokens of compute is 0.47 s on each of 8 tokens.
    assert as_compute.decide(_request(1500), book, rates).path == Path.SPLIT


def test_at_light_load_the_two_engines_share_the_streams_and_each_prompt_starts_where_it_starts_soonest():
    """With prefill-local allowed only while decode could take no more streams, the light rates left prefill idle:
    66-78% of prompts ran on decode beside its streams (TTFT p50 1.08-1.35x, TBT p50 1.13-1.16x collocated's at
    conv 0.39/s and code 0.42/s, bench/results/asleep_light)."""
    # A step 75 ms + 10 ms per stream on either engine; a 100-token prompt's 0.26 s spread over 128 output tokens
    # adds 2 ms to a running stream's mean gap, and a step that carries it takes 0.36 s: decode's guards pass it.
    policy = Predictive(SchedulingConfig(policy="predictive"), chunk_tokens=2048, expected_output_tokens=128)
    rates = _learned(step_ms_per_stream=10.0)
    book = _book({"p0": 0}, {"d0": 0}, rates=rates)
    # 1. Both idle: the prompt runs on decode (a tie, and decode is where streams belong).
    assert policy.decide(_request(100), book, rates).path == Path.DECODE_LOCAL
    # 2. Decode streams one request: a prompt there rides a step of it, on idle prefill it does not: prefill-local.
    book.report(EngineLoad("d0", "decode", num_running=1))
    decision = policy.decide(_request(100), book, rates)
    assert (decision.path, decision.prefill_engine) == (Path.PREFILL_LOCAL, "p0")
    assert decision.predicted_ttft_s == pytest.approx(rates.prefill_s("p0", 100))
    # 3. One stream each: a tie again; decode's turn.
    book.report(EngineLoad("p0", "prefill", num_running=1))
    assert policy.decide(_request(100), book, rates).path == Path.DECODE_LOCAL
    # 4. Prefill computes a prompt now: a stream there would wait it out, so it gets none.
    book.report(EngineLoad("d0", "decode", num_running=2))
    book.report(EngineLoad("p0", "prefill", num_pending_prompt_tokens=800, num_waiting=1, num_running=1))
    assert policy.decide(_request(100), book, rates).path != Path.PREFILL_LOCAL


def test_prefill_local_can_be_kept_for_when_decode_takes_no_more_streams():
    """`prefill_local: decode_full`, the rule before ebcbefc, held against the current one in benchmarks."""
    config = SchedulingConfig(policy="predictive", prefill_local="decode_full")
    policy = Predictive(config, chunk_tokens=2048, expected_output_tokens=128)
    rates = _learned(step_ms_per_stream=10.0)  # one stream 85 ms; the bound 1.25x is 106 ms: 3 streams step 105
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 1}, rates=rates)
    # 1. Decode can take more streams: the short prompt runs there, though idle prefill would start it sooner.
    assert policy.decide(_request(100), book, rates).path == Path.DECODE_LOCAL
    # 2. Decode is at its bound: idle prefill takes the whole request.
    book.report(EngineLoad("d0", "decode", num_running=3))
    assert policy.decide(_request(100), book, rates).path == Path.PREFILL_LOCAL
    with pytest.raises(ValidationError, match="prefill_local"):
        SchedulingConfig(policy="predictive", prefill_local="sometimes")


def test_a_prefill_engine_takes_streams_up_to_its_own_mean_bound():
    policy = Predictive(SchedulingConfig(policy="predictive", tbt_mean_slowdown=1.25), expected_output_tokens=32)
    rates = _learned(step_ms_per_stream=10.0)  # one stream 85 ms; the bound 1.25x is 106 ms: 3 streams step 105
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 12}, prefill_requests={"p0": 2}, rates=rates)
    decision = policy.decide(_request(1500), book, rates)
    assert (decision.path, decision.prefill_engine) == (Path.PREFILL_LOCAL, "p0")
    book.report(EngineLoad("p0", "prefill", num_running=3))  # a 4th would step 115 ms: not again
    assert policy.decide(_request(1500), book, rates).path == Path.SPLIT


def test_the_prefill_guard_keeps_a_stream_off_a_prefill_engine_whose_prompts_would_stretch_its_gaps():
    """A stream on a prefill engine waits out every prompt the engine computes during its life: in the default run
    (3eb988b) the worst streams were prefill-local (per-request mean gaps 0.86-0.92 s at code 0.48-0.9/s)."""
    policy = Predictive(SchedulingConfig(policy="predictive", tbt_mean_slowdown=1.25), expected_output_tokens=32)
    rates = _learned(step_ms_per_stream=10.0)  # a prompt token adds 2.5 ms of compute on p0
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 12}, rates=rates)

    def prompts_lately(tokens_per_s: float) -> None:  # p0 computed prompts at this rate for a minute, now idle
        for step in range(1, 121):
            book.now_s += 0.5
            book.report(EngineLoad("p0", "prefill", num_prompt_tokens_computed=int(
                book.engine("p0").reported.num_prompt_tokens_computed + tokens_per_s / 2)))

    # 1. 40 tokens/s: p0's prompts took 10% of its time, a stream there gets ~1.11x its step: within 1.25x.
    prompts_lately(40)
    assert Predictive.prompt_busy_share("p0", book, rates) == pytest.approx(0.10, rel=0.05)
    assert policy.decide(_request(1500), book, rates).path == Path.PREFILL_LOCAL
    # 2. 120 tokens/s: 30% of its time, ~1.43x: the request splits (and waits for decode) instead.
    prompts_lately(120)
    assert Predictive.prompt_busy_share("p0", book, rates) == pytest.approx(0.30, rel=0.05)
    assert policy.decide(_request(1500), book, rates).path == Path.SPLIT
    # 3. A looser mean bound (2x, up to 50% busy) lets it decode there again.
    looser = Predictive(SchedulingConfig(policy="predictive", tbt_mean_slowdown=2.0), expected_output_tokens=32)
    assert looser.decide(_request(1500), book, rates).path == Path.PREFILL_LOCAL


def test_a_splits_first_token_is_predicted_behind_the_prompts_decode_is_computing():
    """At code 0.32/s (3eb988b) two 9-token prompts were prefilled in 0.15-0.26 s, then waited 1.6-1.85 s for
    decode's first token while decode computed a long local prompt; the split was predicted at 0.8 s."""
    policy = Predictive(SchedulingConfig(policy="predictive"), expected_output_tokens=32)
    rates = _learned()
    book = _book({"p0": 0}, {"d0": 0}, decode_requests={"d0": 1}, rates=rates)
    # 1. Decode computes nothing but its stream: a short prompt's TTFT is a short prefill and a hand-over.
    assert policy.decide(_request(9), book, rates).predicted_ttft_s < 0.5
    # 2. Decode holds a 1,600-token local prompt (4 s of compute here): on decode's paths the short prompt's first
    #    token is predicted behind that prompt (the split's KV arrives early, decode's next step does not), so it
    #    runs whole on idle prefill.
    book.report(EngineLoad("d0", "decode", num_pending_prompt_tokens=1600, num_running=2))
    assert policy.decide(_request(9), book, rates).path == Path.PREFILL_LOCAL
    # 3. With prefill at its streams' bound, whichever of decode's paths it takes is predicted behind that prompt.
    book.report(EngineLoad("p0", "prefill", num_running=10))
    decision = policy.decide(_request(9), book, rates)
    assert decision.path in (Path.SPLIT, Path.DECODE_LOCAL)
    assert decision.predicted_ttft_s >= rates.prefill_s("d0", 1600)


# The config, validated at the edge.

@pytest.mark.parametrize(("section", "message"), [
    ({"policy": "fastest"}, "always_split"),
    ({"borrow_tokens": -1}, "borrow_tokens"),
    ({"borrow_tokens": 100, "return_tokens": 100}, "return_tokens (100) must be below borrow_tokens (100)"),
    ({"return_requests": 20}, "return_requests (20) must be below borrow_requests (12)"),
    ({"tbt_mean_slowdown": 0.9}, "tbt_mean_slowdown"),
    ({"tbt_mean_slowdown": 3, "tbt_gap_slowdown": 2}, "tbt_gap_slowdown (2.0) is below tbt_mean_slowdown (3.0)"),
    ({"split_late_slowdown": 1}, "split_late_slowdown"),
])
def test_bad_scheduling_config_is_refused_with_the_value_named(section, message):
    with pytest.raises(ValidationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        AppConfig.model_validate({"scheduling": section})


def test_a_pool_policy_in_collocated_mode_is_refused():
    with pytest.raises(ValidationError, match="'token_jsq' .* mode 'collocated' has one pool: leave it unset"):
        AppConfig.model_validate({"mode": "collocated", "scheduling": {"policy": "token_jsq"}})
    with pytest.raises(ValidationError, match="'predictive' .* mode 'collocated' has one pool"):
        AppConfig(mode="collocated", scheduling=SchedulingConfig(policy="predictive"))


@pytest.mark.parametrize("scheduling", [None, {}, {"policy": None}, {"policy": None, "borrow_tokens": 4096}])
def test_an_unset_policy_is_the_modes_own(scheduling):
    """Predictive where there are two pools; always_split in collocated mode, so that flipping `mode` in
    serve_config.yaml (which leaves the policy null) needs no other change."""
    args = {} if scheduling is None else {"scheduling": scheduling}
    assert AppConfig.model_validate(args).scheduling.policy == "predictive"
    collocated = AppConfig.model_validate({"mode": "collocated", **args})
    assert collocated.scheduling.policy == "always_split"
    if scheduling and "borrow_tokens" in scheduling:  # the rest of the section is kept
        assert collocated.scheduling.borrow_tokens == 4096
    assert AppConfig().scheduling.policy == "predictive"
    assert AppConfig(mode="collocated").scheduling.policy == "always_split"
    kept = AppConfig(mode="collocated", scheduling=SchedulingConfig(return_tokens=7)).scheduling
    assert (kept.policy, kept.return_tokens) == ("always_split", 7)


def test_the_shipped_config_runs_predictive_and_flips_to_collocated_as_it_is():
    import yaml

    from serve_app.config import PROJECT_ROOT

    args = yaml.safe_load((PROJECT_ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]
    assert args["scheduling"]["policy"] is None
    assert AppConfig.model_validate(args).scheduling.policy == "predictive"
    assert AppConfig.model_validate({**args, "mode": "collocated"}).scheduling.policy == "always_split"


@pytest.mark.parametrize("policy", ["always_split", "token_jsq", "mixed_pool", "conditional", "predictive"])
def test_every_policy_builds_an_app_whose_engines_route_by_the_chosen_replica(policy):
    from serve_app.builder import build_app

    app = build_app({"scheduling": {"policy": policy, "load_report_period_s": 0.25},
                     "transfer": {"backend": "object_store"}})
    router = app._bound_deployment
    assert router.init_args[0].scheduling.policy == policy
    for role in ("prefill", "decode"):
        config = router.init_kwargs[role]._bound_deployment._deployment_config.request_router_config
        assert config.request_router_class == "deployments.replica_choice.ChosenReplicaRouter"
        assert config.request_routing_stats_period_s == 0.25


@pytest.mark.parametrize("args, named", [({"scheduling": {"policy": "nope"}}, "nope"),
                                         ({"prefill": {"num_gpus": -1}}, "num_gpus")])
def test_a_config_that_cannot_start_fails_the_build_as_one_error_serve_does_not_retry(args, named):
    """Serve retries a build that raises (three more times, each importing vLLM again) unless the exception is a
    RayServeException: a bad config is one, and still a ValueError, with the value named."""
    from ray.serve.exceptions import RayServeException

    from serve_app.builder import AppConfigError, build_app

    with pytest.raises(AppConfigError, match=f"(?s)cannot start with this config: .*{named}") as raised:
        build_app({**args, "transfer": {"backend": "object_store"}})
    assert isinstance(raised.value, RayServeException) and isinstance(raised.value, ValueError)
