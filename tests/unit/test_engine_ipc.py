"""deployments/engine_ipc.py: the vLLM plugin that makes an engine's queue readers sleep instead of spinning."""

from __future__ import annotations

import importlib.metadata

import pytest
import zmq

from deployments import engine_ipc


def test_the_plugin_is_registered_for_vllm_to_load():
    plugins = {entry.name: entry.value for entry in importlib.metadata.entry_points(group="vllm.general_plugins")}
    assert plugins.get("splitserve_engine_ipc") == "deployments.engine_ipc:register"


def test_readers_built_after_registering_sleep_instead_of_spinning(monkeypatch, tmp_path):
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    monkeypatch.setattr(condition, "__init__", condition.__init__)  # restored after the test
    monkeypatch.delattr(condition, "_splitserve_spin_s", raising=False)
    monkeypatch.setenv(engine_ipc.SPIN_ENV, "0.002")
    engine_ipc.register()
    engine_ipc.register()  # vLLM may load a plugin twice in one process: one patch
    context = zmq.Context()
    address = f"ipc://{tmp_path}/notify"
    writer = condition(is_reader=False, context=context, notify_address=address)
    reader = condition(is_reader=True, context=context, notify_address=address)
    try:
        assert reader.busy_loop_s == 0.002  # vLLM's default is 1 s
        assert writer.busy_loop_s == 0  # a writer never waits
    finally:
        for socket in (reader.local_notify_socket, reader.read_cancel_socket, reader.write_cancel_socket,
                       writer.local_notify_socket):
            socket.close(linger=0)
        context.term()


@pytest.mark.parametrize("value", ["-1", "fast"])
def test_a_bad_spin_setting_is_refused_naming_it(monkeypatch, value):
    monkeypatch.setenv(engine_ipc.SPIN_ENV, value)
    with pytest.raises(ValueError, match=f"SPLITSERVE_ENGINE_SPIN_S.*{value}"):
        engine_ipc.spin_s()


def test_cpus_sleep_by_default_and_gpus_keep_vllms_spin(monkeypatch):
    monkeypatch.delenv(engine_ipc.SPIN_ENV, raising=False)
    assert engine_ipc.spin_s(is_cpu=True) == 0.0 and engine_ipc.spin_s(is_cpu=False) is None
    monkeypatch.setenv(engine_ipc.SPIN_ENV, "1")
    assert engine_ipc.spin_s(is_cpu=False) == 1.0
