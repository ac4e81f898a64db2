"""deployments/engine_ipc.py: the vLLM plugin that makes an engine's queue readers sleep instead of spinning, with
notifications that are never dropped. Walks a real vLLM shared-memory queue with the patch in place: every message
arrives, in order, and none waits for vLLM's 5 s poll timeout (the lost wake-up the plugin's writer side fixes)."""

from __future__ import annotations

import gc
import importlib.metadata
import random
import threading
import time
from pathlib import Path

import pytest
import zmq

from deployments import engine_ipc


def test_the_plugin_is_registered_for_vllm_to_load():
    plugins = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("splitserve_engine_ipc") == "deployments.engine_ipc:register"


@pytest.fixture
def patched(monkeypatch):
    """SpinCondition with the plugin registered (twice: vLLM may load a plugin twice in a process), readers never
    spinning; vLLM's own constructor is handed back for comparison and restored after the test."""
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    # vLLM's own constructor, even where vLLM already loaded the plugin in this process (an earlier test built an
    # engine config): the patch keeps it.
    original_init = getattr(condition, "_vllm_init", condition.__init__)
    monkeypatch.setattr(condition, "__init__", original_init)
    monkeypatch.delattr(condition, "_splitserve_spin_s", raising=False)
    monkeypatch.setenv(engine_ipc.SPIN_ENV, "0")
    engine_ipc.register()
    engine_ipc.register()
    return condition, original_init


def _close(*conditions) -> None:
    for condition in conditions:
        for socket in (condition.local_notify_socket, condition.read_cancel_socket, condition.write_cancel_socket):
            if socket is not None:
                socket.close(linger=0)


def test_a_writer_keeps_every_notification_and_a_reader_sleeps_at_once(patched, tmp_path):
    condition, original_init = patched
    context = zmq.Context()
    ours = condition(is_reader=False, context=context, notify_address=f"ipc://{tmp_path}/ours")
    reader = condition(is_reader=True, context=context, notify_address=f"ipc://{tmp_path}/ours")
    vllms = object.__new__(condition)
    original_init(vllms, is_reader=False, context=context, notify_address=f"ipc://{tmp_path}/vllms")
    try:
        assert vars(ours).keys() == vars(vllms).keys()  # the writer is vLLM's, field for field
        assert vllms.local_notify_socket.getsockopt(zmq.SNDHWM) == 1  # vLLM's: a second ping soon after is dropped
        assert ours.local_notify_socket.getsockopt(zmq.SNDHWM) == engine_ipc.NOTIFY_SNDHWM == 0  # no limit
        assert reader.busy_loop_s == 0 and ours.busy_loop_s == 0  # vLLM's reader spins 1 s
        assert reader.local_notify_socket.getsockopt(zmq.CONFLATE) == 1  # vLLM's reader side, unchanged
    finally:
        _close(ours, reader, vllms)
        context.term()


def test_every_message_of_a_real_vllm_queue_wakes_its_sleeping_reader(patched):
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(n_reader=1, n_local_reader=1)
    handle = writer.export_handle()
    rng = random.Random(1)
    # Bursts (notifications within the same millisecond: what vLLM's mark of 1 drops), short and long pauses.
    pauses = [rng.choice([0.0, 0.0, 0.0003, 0.002, 0.02]) for _ in range(1500)]
    arrivals: list[tuple[int, float, float]] = []
    errors: list[BaseException] = []

    def read() -> None:
        try:
            reader = MessageQueue.create_from_handle(handle, 0)
            reader.wait_until_ready()
            for _ in pauses:
                index, sent = reader.dequeue(timeout=30)
                arrivals.append((index, sent, time.perf_counter()))
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    writer.wait_until_ready()
    for index, pause in enumerate(pauses):
        time.sleep(pause)
        writer.enqueue((index, time.perf_counter()))
    thread.join(timeout=60)
    assert not thread.is_alive() and errors == []
    assert [index for index, _, _ in arrivals] == list(range(len(pauses)))
    slowest_s = max(received - sent for _, sent, received in arrivals)
    assert slowest_s < 1.0, f"a reader slept {slowest_s:.1f} s through its message: a wake-up was lost"
    segment = Path("/dev/shm") / writer.buffer.shared_memory.name
    del writer
    gc.collect()
    assert not segment.exists()  # the queue's shared memory is gone with its creator


@pytest.mark.parametrize("value", ["-1", "fast"])
def test_a_bad_spin_setting_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv(engine_ipc.SPIN_ENV, value)
    with pytest.raises(ValueError, match=f"SPLITSERVE_ENGINE_SPIN_S.*{value}"):
        engine_ipc.spin_s()


def test_cpus_sleep_by_default_gpus_and_vllm_keep_vllms_queues(monkeypatch):
    monkeypatch.delenv(engine_ipc.SPIN_ENV, raising=False)
    assert engine_ipc.spin_s(is_cpu=True) == 0.0 and engine_ipc.spin_s(is_cpu=False) is None
    monkeypatch.setenv(engine_ipc.SPIN_ENV, "vllm")
    assert engine_ipc.spin_s(is_cpu=True) is None
    monkeypatch.setenv(engine_ipc.SPIN_ENV, "0.5")
    assert engine_ipc.spin_s(is_cpu=False) == 0.5


def test_the_wakeup_benchmark_times_every_message_through_our_writer():
    from bench import queue_wakeups

    delays = queue_wakeups._delays("splitserve", num_messages=200, seed=3)
    assert len(delays) == 200 and max(delays) < queue_wakeups.LOST_S
