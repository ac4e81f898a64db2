"""`bench.engines.wait_idle`, on fake counters: no Ray, no engines."""

from __future__ import annotations

import time
from types import SimpleNamespace

import pytest

from bench import engines
from deployments.engine_counters import EngineCounters

IDLE = EngineCounters()


def _store(num_open: int = 0, num_bytes_in_use: int = 0) -> SimpleNamespace:
    return SimpleNamespace(num_open=num_open, num_bytes_in_use=num_bytes_in_use, num_expired=0)


class FakeApp:
    """Answers `counters(role)` and `store_counters()` from scripted sequences; the last entry repeats."""

    def __init__(self, per_role: dict[str, list[EngineCounters]], store: list[SimpleNamespace] | None = None):
        self._per_role, self._store = per_role, store
        self.num_polls = {role: 0 for role in per_role} | {"store": 0}

    def counters(self, role: str) -> EngineCounters:
        return self._next(role, self._per_role[role])

    def store_counters(self) -> SimpleNamespace:
        assert self._store is not None, "the store was polled though is_object_store is False"
        return self._next("store", self._store)

    def _next(self, name: str, sequence: list):
        index = self.num_polls[name]
        self.num_polls[name] += 1
        return sequence[min(index, len(sequence) - 1)]


@pytest.fixture
def patch(monkeypatch):
    def install(app: FakeApp) -> FakeApp:
        monkeypatch.setattr(engines, "counters", app.counters)
        monkeypatch.setattr(engines, "store_counters", app.store_counters)
        return app
    return install


def test_waits_until_every_engine_and_the_store_are_idle(patch):
    running = EngineCounters(num_running_requests=1, kv_cache_usage=0.25)
    app = patch(FakeApp({"prefill": [IDLE], "decode": [running, running, IDLE]},
                        store=[_store(1, 4096)] * 3 + [_store()]))
    state = engines.wait_idle(is_object_store=True, timeout_s=10, poll_s=0.001)
    assert state.is_idle, state
    assert state.busy == []
    assert app.num_polls == {"prefill": 4, "decode": 4, "store": 4}  # the store was the last to empty
    assert state.counters == {"prefill": IDLE, "decode": IDLE}
    assert state.store == _store()


@pytest.mark.parametrize("busy", [
    {"decode": EngineCounters(num_running_requests=1)},
    {"prefill": EngineCounters(num_waiting_requests=1)},  # queued only: still busy
    {"decode": EngineCounters(kv_cache_usage=0.01)},  # blocks held for no request: a leak
    {"store": _store(num_open=1, num_bytes_in_use=4096)},
    {"store": _store(num_bytes_in_use=4096)},
])
def test_never_idle_returns_a_busy_state_at_the_timeout_without_raising(patch, busy):
    app = patch(FakeApp({"prefill": [busy.get("prefill", IDLE)], "decode": [busy.get("decode", IDLE)]},
                        store=[busy.get("store", _store())]))
    started = time.monotonic()
    state = engines.wait_idle(is_object_store=True, timeout_s=0.2, poll_s=0.01)
    assert not state.is_idle
    assert 0.2 <= time.monotonic() - started < 2
    assert app.num_polls["decode"] >= 3  # polled until the deadline, not given up at once
    (line,) = state.busy
    assert line.startswith("kv store" if "store" in busy else next(iter(busy)))


def test_without_the_object_store_the_store_is_not_polled(patch):
    app = patch(FakeApp({"prefill": [IDLE], "decode": [IDLE]}))
    state = engines.wait_idle(is_object_store=False, timeout_s=1, poll_s=0.001)
    assert state.is_idle and state.store is None
    assert app.num_polls == {"prefill": 1, "decode": 1, "store": 0}


def test_only_the_roles_asked_for_are_polled(patch):
    app = patch(FakeApp({"prefill": [EngineCounters(num_running_requests=1)], "decode": [IDLE]}))
    state = engines.wait_idle(("decode",), is_object_store=False, timeout_s=1, poll_s=0.001)
    assert state.is_idle and list(state.counters) == ["decode"]
    assert app.num_polls["prefill"] == 0


def test_a_zero_timeout_still_polls_once(patch):
    patch(FakeApp({"prefill": [IDLE], "decode": [EngineCounters(num_running_requests=2)]}))
    state = engines.wait_idle(is_object_store=False, timeout_s=0)
    assert not state.is_idle
    assert state.counters["decode"].num_running_requests == 2
