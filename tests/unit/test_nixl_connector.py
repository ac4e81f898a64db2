"""Our NIXL connector builds vLLM's agent with a progress thread that sleeps (kv_transfer/nixl/connector.py).

Why it matters: without a progress thread a READ from prefill's KV cache moves only when prefill's engine loop
polls NIXL, between steps, so under load every hand-over waited out one of prefill's forward passes. The life cycle
checked here, with two real agents in two processes as the app has them:
1. the source registers memory inside the guard, exactly as vLLM's worker builds its agent, and hands its metadata
   over;
2. the source computes without touching NIXL (a forward pass), the reader READs meanwhile;
3. with the progress thread the READ is DONE (bytes intact) before the computation ends; without it, only after;
4. the guard hands vLLM back its own functions.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import time

import pytest

from kv_transfer.config import TransferConfig
from kv_transfer.nixl.connector import _agent_progress

pytest.importorskip("nixl._api")

NUM_BYTES = 8 << 20
BUSY_S = 3.0


def _source(conn, interval_us: int | None) -> None:
    import torch
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    torch.set_num_threads(1)
    with _agent_progress(interval_us, TransferConfig().nixl_ucx_lock):  # 1. as vLLM's NixlConnectorWorker builds it
        agent = base_worker.NixlWrapper("source", base_worker.nixl_agent_config(capture_telemetry=True))
    source = torch.arange(NUM_BYTES, dtype=torch.int64).to(torch.uint8)
    agent.register_memory(source)
    before, started = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    time.sleep(1.0)
    after = resource.getrusage(resource.RUSAGE_SELF)
    idle_cores = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / (time.monotonic() - started)
    conn.send((agent.get_agent_metadata(), agent.get_serialized_descs(agent.get_xfer_descs(source)), idle_cores))
    conn.recv()
    matrix, started = torch.randn(256, 256), time.monotonic()
    conn.send(started)
    while time.monotonic() - started < BUSY_S:  # 2. a forward pass: compute, never a NIXL call
        matrix = (matrix @ matrix).clamp_(-1, 1)
    conn.send(time.monotonic())
    while not conn.poll(0.005):  # the engine loop's polls once the step is over
        agent.get_new_notifs()


def _read_while_busy(interval_us: int | None) -> tuple[float, float, float]:
    """(when the READ was DONE, when the source's computation ended) on one monotonic clock, and the cores the
    idle source used."""
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    context = multiprocessing.get_context("spawn")
    ours, theirs = context.Pipe()
    source = context.Process(target=_source, args=(theirs, interval_us), daemon=True)
    source.start()
    try:
        reader = nixl_agent("reader", nixl_agent_config(enable_prog_thread=False))
        target = torch.zeros(NUM_BYTES, dtype=torch.uint8)
        reader.register_memory(target)
        metadata, descs, idle_cores = ours.recv()
        remote = reader.add_remote_agent(metadata)
        ours.send("go")
        ours.recv()  # the source is computing
        time.sleep(0.2)
        handle = reader.initialize_xfer("READ", reader.get_xfer_descs(target), reader.deserialize_descs(descs),
                                        remote, b"read")
        state = reader.transfer(handle)
        while state not in ("DONE", "ERR"):
            state = reader.check_xfer_state(handle)
            time.sleep(0.001)
        done_at = time.monotonic()
        assert state == "DONE"
        assert torch.equal(target, torch.arange(NUM_BYTES, dtype=torch.int64).to(torch.uint8))
        reader.release_xfer_handle(handle)
        busy_ended_at = ours.recv()
        ours.send("bye")
        return done_at, busy_ended_at, idle_cores
    finally:
        source.join(10)
        if source.is_alive():
            source.kill()


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores, as the app has")
def test_a_read_completes_while_the_source_computes_only_with_the_progress_thread():
    done_at, busy_ended_at, idle_cores = _read_while_busy(interval_us=TransferConfig().nixl_progress_interval_us)
    assert done_at < busy_ended_at  # 3. moved during the forward pass
    assert idle_cores < 0.3  # and the thread sleeps: NIXL's own (delay 0) busy-polls a whole core
    done_at, busy_ended_at, _ = _read_while_busy(interval_us=None)
    assert done_at >= busy_ended_at  # without the thread it waits the pass out: why the thread is there


def test_the_guard_sets_the_thread_and_restores_vllm():
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    original = base_worker.nixl_agent_config
    with _agent_progress(None, "mutex"):
        assert base_worker.nixl_agent_config(num_threads=4).enable_pthread is False
    with _agent_progress(500, "mutex"):
        config = base_worker.nixl_agent_config(num_threads=4, capture_telemetry=True)
        assert config.enable_pthread is True and config.num_threads == 4
    assert base_worker.nixl_agent_config is original  # 4.


def test_the_guard_gives_ucx_its_lock_kind_while_the_agent_is_built_and_leaves_the_users_own(monkeypatch):
    from nixl._api import nixl_agent
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl import base_worker

    from kv_transfer.nixl import connector

    monkeypatch.delenv(connector.UCX_LOCK_ENV, raising=False)
    for kind, value in (("mutex", "y"), ("spin", "n")):
        with _agent_progress(500, kind):
            assert os.environ[connector.UCX_LOCK_ENV] == value
        assert connector.UCX_LOCK_ENV not in os.environ  # only while vLLM builds the agent
    # UCX reads it when NIXL makes the agent's UCX context, inside the guard: a value UCX refuses fails the build.
    monkeypatch.setattr(connector, "_UCX_LOCK_VALUES", {"mutex": "not-a-lock"})
    with pytest.raises(Exception, match="BACKEND"), _agent_progress(500, "mutex"):
        nixl_agent("lock-probe", base_worker.nixl_agent_config(backends=["UCX"]))
    # A UCX_USE_MT_MUTEX the user set is theirs.
    monkeypatch.setenv(connector.UCX_LOCK_ENV, "n")
    with _agent_progress(500, "mutex"):
        assert os.environ[connector.UCX_LOCK_ENV] == "n"
    assert os.environ[connector.UCX_LOCK_ENV] == "n"
