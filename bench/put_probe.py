"""What one `ray.put` costs the object-store path, apart from the transfer: its fixed cost, and how the buffers of a
put decide whether Ray copies them with one thread or six.

Life cycle of one run:
1. Start a 2-CPU Ray instance and warm its object store (bench.transfer_bench's warm-up).
2. Per case, `--repeats` timed puts, each from a flushed cache, and a plain numpy copy of the same bytes:
   - `put_small`: 200 KB in one buffer (above Ray's 100 KB inline limit): the fixed cost of a put;
   - for 16 and 64 MB: one buffer, then 30, 60, 120 and 240 equal buffers in one put (the KV of 30 layers, and
     those layers cut smaller: Ray copies a buffer of 1 MiB or more with 6 threads, started afresh per buffer).
3. Where one send of the object-store path goes (`--stages`): the transport as the connector uses it (30 layers in
   one send, a receiver in another process, bench.transfer_bench's), each stage timed on its own, from a flushed
   cache before each transfer: prefill's `open` (the store's announcement), `send` (the put of every layer, the
   parts' message to the store, the receipt written), `take_receipt`; decode's `receive` by the receipt (the
   references rebuilt and the objects mapped) and its copy into its blocks. Beside them Ray's own floors: a
   fire-and-forget actor call, and a put of the same segments.
4. Write probe.csv, stages.csv and report.md (command, date, measured commit, host, the tables) under --out; print
   the tables.

    python -m bench.put_probe [--repeats 15] [--stages] [--out bench/results/put_probe]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
import uuid
from pathlib import Path

import numpy as np

from bench import processes

processes.use_ray_token_auth()

import ray  # noqa: E402

from bench.result_files import measured_commit  # noqa: E402
from bench.transfer_bench import NUM_LAYERS, OBJECT_STORE_BYTES, CacheFlusher, Receiver, warm_object_store  # noqa: E402

SMALL_BYTES = 200_000
SIZES_MB = (16, 64)
NUM_BUFFERS = (1, 30, 60, 120, 240)
# The transfer's stages (prefill's, then decode's), then Ray's floors measured beside them.
STAGES = ("open_ms", "send_ms", "take_receipt_ms", "receive_ms", "copy_ms", "ray_actor_call_ms", "ray_put_ms")


def _median_ms(action, repeats: int, flush) -> float:
    seconds = []
    for _ in range(repeats):
        flush()
        started = time.perf_counter()
        result = action()
        seconds.append(time.perf_counter() - started)
        del result
    return round(float(np.median(seconds)) * 1e3, 3)


def measure(repeats: int) -> list[dict]:
    flush, rows = CacheFlusher(), []
    small = np.ones(SMALL_BYTES, dtype=np.uint8)
    rows.append({"case": "put_small", "mb": round(SMALL_BYTES / 2**20, 2), "num_buffers": 1, "buffer_mb": 0.19,
                 "put_ms": _median_ms(lambda: ray.put(small), repeats, flush),
                 "copy_ms": _median_ms(lambda: small.copy(), repeats, flush)})
    for size_mb in SIZES_MB:
        data = np.random.default_rng(0).integers(0, 255, size_mb << 20, dtype=np.uint8)
        target = np.ones_like(data)  # written once: the copy pays no page faults
        copy_ms = _median_ms(lambda: np.copyto(target, data), repeats, flush)
        for num_buffers in NUM_BUFFERS:
            buffers = np.split(data[: data.size // num_buffers * num_buffers], num_buffers)
            value = buffers[0] if num_buffers == 1 else buffers
            rows.append({"case": f"put_{size_mb}mb", "mb": size_mb, "num_buffers": num_buffers,
                         "buffer_mb": round(buffers[0].nbytes / 2**20, 2),
                         "put_ms": _median_ms(lambda: ray.put(value), repeats, flush), "copy_ms": copy_ms})
    return rows


def measure_stages(repeats: int) -> list[dict]:
    """Per size, the median ms of each stage of one send of 30 layers (life cycle step 3)."""
    from kv_transfer.layout import KVLayout
    from kv_transfer.object_store.store import create_store
    from kv_transfer.object_store.transport import (RAY_PARALLEL_COPY_THREADS, ObjectStoreTransport,
                                                    cut_below_parallel_copy)

    flush, rows = CacheFlusher(), []
    for size_mb in SIZES_MB:
        part_shape = ((size_mb << 20) // NUM_LAYERS,)
        layout = KVLayout(num_parts=NUM_LAYERS, part_shape=part_shape, dtype="uint8")
        name = f"probe-store-{uuid.uuid4().hex[:6]}"
        store = create_store(name=name, capacity_bytes=1 << 31, lease_s=60)
        receiver = Receiver.remote(name, part_shape)
        warm_object_store(reader=receiver)
        transport = ObjectStoreTransport(home_store=name)
        parts = [np.random.default_rng(i).integers(0, 255, part_shape, dtype=np.uint8) for i in range(NUM_LAYERS)]
        is_cutting = len(os.sched_getaffinity(0)) < RAY_PARALLEL_COPY_THREADS  # as the transport decides
        segments = [cut_below_parallel_copy([part], 0) if is_cutting else [part] for part in parts]
        stages: dict[str, list[float]] = {stage: [] for stage in STAGES}
        for repeat in range(repeats + 1):  # the first pays the actors' first calls
            key = f"probe-{repeat}"
            flush()
            started = time.perf_counter()
            ticket = transport.open(key, layout)
            opened = time.perf_counter()
            transport.send(ticket, 0, parts)
            sent = time.perf_counter()
            receipt = transport.take_receipt(key)
            taken = time.perf_counter()
            decode_started, mapped, copied = ray.get(receiver.receive.remote(key, receipt))
            flush()
            call_started = time.perf_counter()
            store.counters.remote()  # a fire-and-forget actor call, as `open` and the parts' message are
            called = time.perf_counter()
            flush()
            put_started = time.perf_counter()
            ref = ray.put(segments)
            put = time.perf_counter()
            del ref
            if repeat:
                for stage, seconds in zip(STAGES, (opened - started, sent - opened, taken - sent,
                                                   mapped - decode_started, copied - mapped,
                                                   called - call_started, put - put_started)):
                    stages[stage].append(seconds)
        ray.kill(receiver)
        ray.kill(store)
        medians = {stage: round(float(np.median(seconds)) * 1e3, 3) for stage, seconds in stages.items()}
        transfer = sum(medians[stage] for stage in STAGES[:5])
        rows.append({"mb": size_mb, "num_segments": sum(map(len, segments)), **medians,
                     "transfer_ms": round(transfer, 3)})
    return rows


def _write_csv(path: Path, rows: list[dict]) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stages", action="store_true", help="also time each stage of one object-store send")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "put_probe")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=OBJECT_STORE_BYTES)
    try:
        warm_object_store()
        rows = measure(args.repeats)
        stage_rows = measure_stages(args.repeats) if args.stages else []
    finally:
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    _write_csv(args.out / "probe.csv", rows)
    table = ["| case | MB | buffers | MB a buffer | put ms | plain copy ms |", "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['case']} | {r['mb']} | {r['num_buffers']} | {r['buffer_mb']} | {r['put_ms']} | {r['copy_ms']} |"
              for r in rows]
    if stage_rows:
        _write_csv(args.out / "stages.csv", stage_rows)
        table += ["", "One send of 30 layers, stage by stage (ms, medians; the transfer is the first five):", "",
                  "| MB | segments | " + " | ".join(STAGES) + " | transfer_ms |",
                  "| --- | --- | " + " | ".join("---" for _ in STAGES) + " | --- |"]
        table += [f"| {r['mb']} | {r['num_segments']} | " + " | ".join(str(r[stage]) for stage in STAGES)
                  + f" | {r['transfer_ms']} |" for r in stage_rows]
    stages_flag = " --stages" if args.stages else ""
    header = (f"# What a ray.put costs\n\n`python -m bench.put_probe --repeats {args.repeats}{stages_flag} "
              f"--out {args.out}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured_commit()}, on a host with "
              f"{os.cpu_count()} CPUs: medians of {args.repeats} puts (and plain numpy copies of the same bytes), "
              "each from a flushed cache, the object store warmed first.\n")
    (args.out / "report.md").write_text(header + "\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
