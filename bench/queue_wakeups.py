"""How often a sleeping reader of vLLM's shared-memory queue misses its wake-up: vLLM's writer against ours.

Why: an engine's EngineCore and Worker pass every step through vLLM's `MessageQueue`; deployments/engine_ipc.py lets
their readers sleep (instead of vLLM's 1 s spin) and builds the writer's notification socket without ZeroMQ's send
high-water mark of 1, which drops a notification sent soon after another. This measures the difference the socket
makes, on the real queue, with the readers asleep in both rows.
1. For each writer (`vllm`: its socket as vLLM builds it; `splitserve`: the plugin's), one queue, a writer in this
   thread and a reader thread that never spins; the same seeded pattern of messages (bursts, 0.3 ms, 2 ms and 20 ms
   pauses) goes through both.
2. Each message carries its send time; the reader notes its arrival. A dropped notification shows as a wait until
   the next message's notification (late: 5 ms or more, where a woken reader takes well under one), or, with no
   next message soon, until vLLM's 5 s poll timeout (lost: 1 s or more).
3. Writes bench/results/queue_wakeups/report.md and wakeups.csv with the commit measured.

    python -m bench.queue_wakeups [--messages 3000]
"""

from __future__ import annotations

import argparse
import csv
import random
import statistics
import threading
import time
from pathlib import Path

from bench.processes import PROJECT_ROOT
from bench.result_files import measured_commit

OUT = PROJECT_ROOT / "bench" / "results" / "queue_wakeups"
PAUSES_S = (0.0, 0.0, 0.0003, 0.002, 0.02)
LOST_S = 1.0  # a wait this long is a lost wake-up, ended by vLLM's poll timeout: the pattern pauses 20 ms at most
LATE_S = 0.005  # a wait this long was not woken by its own notification: a later message's woke the reader


def _delays(writer: str, num_messages: int, seed: int) -> list[float]:
    """Each message's send-to-arrival seconds through a fresh queue with `writer`'s notification socket."""
    from vllm.distributed.device_communicators import shm_broadcast

    from deployments import engine_ipc

    condition = shm_broadcast.SpinCondition
    original_init = getattr(condition, "_vllm_init", condition.__init__)  # vLLM's, were the plugin loaded here
    patched_init = condition.__init__
    condition.__init__ = engine_ipc.lossless_init(original_init, max_spin_s=0.0)
    if writer == "vllm":  # readers asleep as ours, the writer as vLLM builds it
        ours = condition.__init__

        def vllms_writer(self, is_reader, context, notify_address, busy_loop_s=1):
            (ours if is_reader else original_init)(self, is_reader, context, notify_address, busy_loop_s)

        condition.__init__ = vllms_writer
    try:
        queue = shm_broadcast.MessageQueue(n_reader=1, n_local_reader=1)
        handle = queue.export_handle()
        rng = random.Random(seed)
        pauses = [rng.choice(PAUSES_S) for _ in range(num_messages)]
        delays: list[float] = []

        def read() -> None:
            reader = shm_broadcast.MessageQueue.create_from_handle(handle, 0)
            reader.wait_until_ready()
            for _ in pauses:
                sent = reader.dequeue(timeout=60)
                delays.append(time.perf_counter() - sent)

        thread = threading.Thread(target=read, daemon=True)
        thread.start()
        queue.wait_until_ready()
        for index, pause in enumerate(pauses):
            time.sleep(pause)
            queue.enqueue(time.perf_counter())
            if index % 500 == 0:
                print(f"  {writer}: {index}/{num_messages} messages", flush=True)
        thread.join()
        return delays
    finally:
        condition.__init__ = patched_init


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    commit = measured_commit()
    OUT.mkdir(parents=True, exist_ok=True)
    rows = []
    for writer in ("vllm", "splitserve"):
        delays = sorted(_delays(writer, args.messages, args.seed))
        rows.append({"writer": writer, "messages": len(delays),
                     "late_wakeups": sum(delay >= LATE_S for delay in delays),
                     "lost_wakeups": sum(delay >= LOST_S for delay in delays),
                     "p50_ms": round(statistics.median(delays) * 1e3, 3),
                     "p99_ms": round(delays[int(0.99 * len(delays))] * 1e3, 3),
                     "max_ms": round(delays[-1] * 1e3, 1)})
        print(rows[-1], flush=True)
    with (OUT / "wakeups.csv").open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Wake-ups of a sleeping reader of vLLM's shared-memory queue", "",
             f"Measured at commit `{commit}` with `python -m bench.queue_wakeups --messages {args.messages} "
             f"--seed {args.seed}`: one queue per writer, readers asleep (no spin), the same seeded pattern of "
             f"messages (bursts and pauses of 0.3, 2 and 20 ms). A message that waited {LATE_S * 1e3:.0f} ms or more "
             "was late: its notification was dropped and a later one woke the reader; one that waited "
             f"{LOST_S:.0f} s or more was lost until vLLM's 5 s poll timeout.", "",
             "| writer's notification socket | messages | late (≥ 5 ms) | lost (≥ 1 s) | delay p50 ms | p99 ms | max ms |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    labels = {"vllm": "vLLM's (send high-water mark 1)", "splitserve": "deployments/engine_ipc.py's (no mark)"}
    lines += [f"| {labels[row['writer']]} | {row['messages']} | {row['late_wakeups']} | {row['lost_wakeups']} | "
              f"{row['p50_ms']} | "
              f"{row['p99_ms']} | {row['max_ms']} |" for row in rows]
    (OUT / "report.md").write_text("\n".join(lines) + "\n")
    print(f"results in {OUT}")


if __name__ == "__main__":
    main()
