"""What one `ray.put` costs the object-store path, apart from the transfer: its fixed cost, and how the buffers of a
put decide whether Ray copies them with one thread or six.

Life cycle of one run:
1. Start a 2-CPU Ray instance and warm its object store (bench.transfer_bench's warm-up).
2. Per case, `--repeats` timed puts, each from a flushed cache, and a plain numpy copy of the same bytes:
   - `put_small`: 200 KB in one buffer (above Ray's 100 KB inline limit): the fixed cost of a put;
   - for 16 and 64 MB: one buffer, then 30, 60, 120 and 240 equal buffers in one put (the KV of 30 layers, and
     those layers cut smaller: Ray copies a buffer of 1 MiB or more with 6 threads, started afresh per buffer).
3. Write probe.csv and report.md (command, date, measured commit, host, the table) under --out; print the table.

    python -m bench.put_probe [--repeats 15] [--out bench/results/put_probe]
"""

from __future__ import annotations

import argparse
import csv
import os
import time
from pathlib import Path

import numpy as np

from bench import processes

processes.use_ray_token_auth()

import ray  # noqa: E402

from bench.result_files import measured_commit  # noqa: E402
from bench.transfer_bench import OBJECT_STORE_BYTES, CacheFlusher, warm_object_store  # noqa: E402

SMALL_BYTES = 200_000
SIZES_MB = (16, 64)
NUM_BUFFERS = (1, 30, 60, 120, 240)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "put_probe")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=OBJECT_STORE_BYTES)
    try:
        warm_object_store()
        rows = measure(args.repeats)
    finally:
        ray.shutdown()
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "probe.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| case | MB | buffers | MB a buffer | put ms | plain copy ms |", "| --- | --- | --- | --- | --- | --- |"]
    table += [f"| {r['case']} | {r['mb']} | {r['num_buffers']} | {r['buffer_mb']} | {r['put_ms']} | {r['copy_ms']} |"
              for r in rows]
    header = (f"# What a ray.put costs\n\n`python -m bench.put_probe --repeats {args.repeats} --out {args.out}`, "
              f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {measured_commit()}, on a host with "
              f"{os.cpu_count()} CPUs: medians of {args.repeats} puts (and plain numpy copies of the same bytes), "
              "each from a flushed cache, the object store warmed first.\n")
    (args.out / "report.md").write_text(header + "\n" + "\n".join(table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
