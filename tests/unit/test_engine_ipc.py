"""deployments/engine_ipc.py: the vLLM plugin that makes an engine's queue readers nap between looks instead of
spinning. Walks a real vLLM shared-memory queue with the patch in place: every message arrives, in order, including
one written after the reader left its busy window (the case a sleeping reader once lost)."""

from __future__ import annotations

import gc
import importlib.metadata
import threading
import time
from pathlib import Path

import pytest

from deployments import engine_ipc


def test_the_plugin_is_registered_for_vllm_to_load():
    plugins = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("splitserve_engine_ipc") == "deployments.engine_ipc:register"


@pytest.fixture
def patched_condition(monkeypatch):
    """SpinCondition with the plugin registered (twice: vLLM may load a plugin twice in a process), restored after."""
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    original_wait = condition.wait
    monkeypatch.setattr(condition, "wait", original_wait)
    monkeypatch.delattr(condition, "_splitserve_poll_s", raising=False)
    monkeypatch.setenv(engine_ipc.POLL_ENV, "300")
    engine_ipc.register()
    engine_ipc.register()
    return condition, original_wait


def test_a_waiting_reader_naps_inside_vllms_window_and_waits_on_the_socket_after_it(patched_condition, monkeypatch):
    condition, original_wait = patched_condition
    assert condition._splitserve_poll_s == pytest.approx(300e-6)
    naps, socket_waits = [], []
    monkeypatch.setattr(engine_ipc.time, "sleep", naps.append)
    wait = engine_ipc.polite_wait(lambda self, timeout_ms: socket_waits.append(timeout_ms), 300e-6)

    class Reader:  # the two fields `wait` reads
        busy_loop_s = 1.0
        last_read = time.monotonic()

    reader = Reader()
    wait(reader, 5)
    assert naps == [300e-6] and socket_waits == []  # read a moment ago: nap, no sched_yield spin
    reader.last_read -= 2.0
    wait(reader, 5)
    assert naps == [300e-6] and socket_waits == [5]  # idle past the window: vLLM's own wait, unchanged


def test_every_message_of_a_real_vllm_queue_arrives_in_order_with_the_patch(patched_condition):
    from vllm.distributed.device_communicators.shm_broadcast import MessageQueue

    writer = MessageQueue(n_reader=1, n_local_reader=1)
    handle = writer.export_handle()
    received: list[int] = []
    errors: list[BaseException] = []
    pauses = [0.0, 0.002, 0.0, 0.03] * 10 + [1.2] + [0.0, 0.002] * 5  # one pause past the 1 s busy window

    def read() -> None:
        try:
            reader = MessageQueue.create_from_handle(handle, 0)
            reader.wait_until_ready()
            for _ in pauses:
                received.append(reader.dequeue(timeout=10))
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)

    thread = threading.Thread(target=read, daemon=True)
    thread.start()
    writer.wait_until_ready()
    for index, pause in enumerate(pauses):
        time.sleep(pause)
        writer.enqueue(index)
    thread.join(timeout=30)
    assert not thread.is_alive() and errors == []
    assert received == list(range(len(pauses)))
    segment = Path("/dev/shm") / writer.buffer.shared_memory.name
    del writer
    gc.collect()
    assert not segment.exists()  # the queue's shared memory is gone with its creator


@pytest.mark.parametrize("value", ["-1", "fast"])
def test_a_bad_poll_setting_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv(engine_ipc.POLL_ENV, value)
    with pytest.raises(ValueError, match=f"SPLITSERVE_ENGINE_POLL_US.*{value}"):
        engine_ipc.poll_s()


def test_cpus_nap_by_default_and_gpus_or_zero_keep_vllms_spin(monkeypatch):
    monkeypatch.delenv(engine_ipc.POLL_ENV, raising=False)
    assert engine_ipc.poll_s(is_cpu=True) == pytest.approx(engine_ipc.DEFAULT_CPU_POLL_US / 1e6)
    assert engine_ipc.poll_s(is_cpu=False) is None
    monkeypatch.setenv(engine_ipc.POLL_ENV, "0")
    assert engine_ipc.poll_s(is_cpu=True) is None
    monkeypatch.setenv(engine_ipc.POLL_ENV, "150")
    assert engine_ipc.poll_s(is_cpu=False) == pytest.approx(150e-6)
