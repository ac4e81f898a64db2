"""Start-up probe for `transfer.backend: auto`: can NIXL move bytes on this host?

Two NIXL agents (UCX backend, no busy progress thread) in one short-lived process register 1 MiB of DRAM each;
one READs the other's buffer and the bytes are compared. It runs as a subprocess (`python -m
kv_transfer.nixl.probe`), so a UCX crash or hang costs the builder a clear "no", not the app.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator

PROBE_BYTES = 1 << 20
PROBE_TIMEOUT_S = 60.0


def read_until_done(reader_agent, source_agent, handle, timeout_s: float) -> str:
    """Start a prepared NIXL transfer and poll it to an end: "DONE", "ERR", or the last state at the deadline.
    Without a progress thread, both agents are progressed by polling."""
    deadline = time.monotonic() + timeout_s
    state = reader_agent.transfer(handle)
    while state not in ("DONE", "ERR") and time.monotonic() < deadline:
        state = reader_agent.check_xfer_state(handle)
        source_agent.get_new_notifs()
    return state


@contextlib.contextmanager
def loopback_reader(nbytes: int, name: str) -> Iterator[Callable[[float], None]]:
    """Two NIXL agents in this process (UCX, no busy progress thread) and `nbytes` of registered DRAM each.
    Yields `read(timeout_s)`, which READs the source buffer into the reader's, raising unless it is DONE.
    On a clean exit, checks that the bytes arrived intact; always deregisters everything."""
    import torch
    from nixl._api import nixl_agent, nixl_agent_config

    config = nixl_agent_config(enable_prog_thread=False, backends=["UCX"])
    suffix = uuid.uuid4().hex[:6]
    source_agent = nixl_agent(f"{name}-source-{suffix}", config)
    reader_agent = nixl_agent(f"{name}-reader-{suffix}", config)
    source = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    target = torch.zeros(nbytes, dtype=torch.uint8)
    source_reg, target_reg = source_agent.register_memory(source), reader_agent.register_memory(target)
    remote = reader_agent.add_remote_agent(source_agent.get_agent_metadata())
    local_descs, remote_descs = reader_agent.get_xfer_descs(target), source_agent.get_xfer_descs(source)

    def read(timeout_s: float) -> None:
        handle = reader_agent.initialize_xfer("READ", local_descs, remote_descs, remote, name.encode())
        try:
            state = read_until_done(reader_agent, source_agent, handle, timeout_s)
        finally:
            reader_agent.release_xfer_handle(handle)
        if state != "DONE":
            raise RuntimeError(f"NIXL READ ended in state {state}")

    try:
        yield read
        if not torch.equal(source, target):
            raise RuntimeError("NIXL READ completed but the bytes differ")
    finally:
        reader_agent.remove_remote_agent(remote)
        source_agent.deregister_memory(source_reg)
        reader_agent.deregister_memory(target_reg)


def _probe_in_process() -> None:
    with loopback_reader(PROBE_BYTES, "probe") as read:
        read(10)


def can_use_nixl() -> tuple[bool, str]:
    """(True, why) if NIXL imports and moved the probe's bytes correctly; (False, why) otherwise."""
    try:
        result = subprocess.run([sys.executable, "-m", "kv_transfer.nixl.probe"], capture_output=True, text=True,
                                timeout=PROBE_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        return False, f"the NIXL probe did not finish within {PROBE_TIMEOUT_S:.0f} s"
    last_line = (result.stdout.strip().splitlines() or [""])[-1]
    if result.returncode == 0 and last_line.startswith("ok"):
        return True, last_line
    return False, last_line or result.stderr.strip()[-500:] or f"probe exited with {result.returncode}"


if __name__ == "__main__":
    try:
        import nixl._api  # noqa: F401
    except Exception as exc:
        print(f"NIXL does not import: {exc!r}")
        sys.exit(1)
    try:
        started = time.perf_counter()
        _probe_in_process()
    except Exception as exc:
        print(f"NIXL probe failed: {exc!r}")
        sys.exit(1)
    print(f"ok: NIXL/UCX moved {PROBE_BYTES} bytes DRAM to DRAM in {time.perf_counter() - started:.3f} s")
