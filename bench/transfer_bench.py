"""Transfer microbenchmark: bytes/s of each KV path for KV sizes of 1 to 64 MB, as ratios to a memory copy
measured in the same run (the ceiling for any CPU-staged path).

Paths:
- memcpy: one numpy copy between preallocated buffers, rotated through a 256 MB pool so caches do not flatter it;
- object_store: our transport as the connector uses it. This process plays prefill (open, then one `ray.put`
  per layer, 30 layers; object_store_one_send: all layers in one object); a Ray actor in another process plays
  decode (claim, map, copy into its own preallocated blocks, release). Timed from open to the receiver's copy
  being done. The object store is warm, as in a server that has run for a while: its pages were written and
  read once before timing, since a first touch of shared memory costs more than the copy
  (`--cold-object-store` skips that);
- nixl: two NIXL agents (UCX, no progress thread) in this process, one READing the other's registered DRAM
  straight into its own buffer: a single copy.

    python -m bench.transfer_bench [--sizes-mb 1 2 4 8 16 32 64] [--repeats 5] [--out bench/results/transfer]

Writes transfer.csv (every size and path) and report.md (the command, then the table) under --out, and prints
the table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import ray
from tqdm import tqdm

from bench.result_files import measured_commit

NUM_LAYERS = 30
POOL_BYTES = 256 << 20
OBJECT_STORE_BYTES = 1 << 30
WARM_UP_OBJECT_BYTES = 64 << 20


def measure_memcpy(nbytes: int, repeats: int) -> list[float]:
    count = max(2, POOL_BYTES // nbytes)
    sources = [np.random.default_rng(i).integers(0, 255, nbytes, dtype=np.uint8) for i in range(count)]
    targets = [np.ones(nbytes, dtype=np.uint8) for _ in range(count)]  # written once: no page faults timed
    seconds = []
    for repeat in range(repeats + 1):
        index = repeat % count
        started = time.perf_counter()
        np.copyto(targets[index], sources[index])
        seconds.append(time.perf_counter() - started)
    return seconds[1:]  # the first copy pays page faults on fresh memory


@ray.remote(num_cpus=0)
class Receiver:
    """Decode's side of the object-store path, in a process of its own."""

    def __init__(self, source: str, part_shape: tuple[int, ...]):
        from kv_transfer.layout import KVLayout
        from kv_transfer.object_store.transport import ObjectStoreTransport

        self._source = source
        self._transport = ObjectStoreTransport()
        self._layout = KVLayout(num_parts=NUM_LAYERS, part_shape=part_shape, dtype="uint8")
        self._blocks = [np.empty(part_shape, dtype=np.uint8) for _ in range(NUM_LAYERS)]
        for block in self._blocks:
            block.fill(0)  # fault the pages in now, as a running engine's KV cache already is

    def receive(self, key: str) -> float:
        parts = self._transport.receive(self._source, key, self._layout, timeout_s=60)
        for block, (segment,) in zip(self._blocks, parts, strict=True):
            np.copyto(block, segment)
        done = time.perf_counter()
        self._transport.release(self._source, key)
        return done

    def touch(self, wrapped_ref: list) -> None:
        payload = ray.get(wrapped_ref[0])
        if getattr(self, "_scratch", None) is None or self._scratch.shape != payload.shape:
            self._scratch = np.empty_like(payload)
        np.copyto(self._scratch, payload)


def warm_object_store() -> None:
    """Write and read every page of the object store once, in this process and in a reader's, as a server's
    steady state has; freed objects leave their pages mapped for the next ones."""
    reader = Receiver.remote("none", (1,))
    payload = np.ones(WARM_UP_OBJECT_BYTES, dtype=np.uint8)
    for _ in range(2 * OBJECT_STORE_BYTES // WARM_UP_OBJECT_BYTES):
        ref = ray.put(payload)
        ray.get(reader.touch.remote([ref]))
        del ref
    ray.kill(reader)


def measure_object_store(nbytes: int, repeats: int, is_layer_by_layer: bool = True) -> list[float]:
    from kv_transfer.layout import KVLayout
    from kv_transfer.object_store.store import create_store
    from kv_transfer.object_store.transport import ObjectStoreTransport

    part_shape = (nbytes // NUM_LAYERS,)
    layout = KVLayout(num_parts=NUM_LAYERS, part_shape=part_shape, dtype="uint8")
    name = f"bench-store-{uuid.uuid4().hex[:6]}"
    store = create_store(name=name, capacity_bytes=1 << 31, lease_s=60)
    receiver = Receiver.remote(name, part_shape)
    transport = ObjectStoreTransport(home_store=name)
    parts = [np.random.default_rng(i).integers(0, 255, part_shape, dtype=np.uint8) for i in range(NUM_LAYERS)]
    seconds = []
    for repeat in range(repeats + 1):
        key = f"bench-{repeat}"
        started = time.perf_counter()
        ticket = transport.open(key, layout)
        done = receiver.receive.remote(key)  # decode asks while prefill is still sending, as in the app
        if is_layer_by_layer:  # one send per layer, back to back: no compute to hide the per-call cost
            for index, part in enumerate(parts):
                transport.send(ticket, index, [part])
        else:  # every layer in one send (one store call)
            transport.send(ticket, 0, parts)
        finished = ray.get(done)  # both processes share this host's perf_counter clock
        seconds.append(finished - started)
    ray.kill(receiver)
    ray.kill(store)
    return seconds[1:]


def measure_nixl(nbytes: int, repeats: int) -> list[float]:
    from kv_transfer.nixl.probe import loopback_reader

    seconds = []
    with loopback_reader(nbytes, "bench") as read:
        for _ in range(repeats + 1):
            started = time.perf_counter()
            read(30)
            seconds.append(time.perf_counter() - started)
    return seconds[1:]


PATHS = {
    "memcpy": measure_memcpy,
    "object_store": measure_object_store,
    "object_store_one_send": lambda nbytes, repeats: measure_object_store(nbytes, repeats, is_layer_by_layer=False),
    "nixl": measure_nixl,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes-mb", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "transfer")
    parser.add_argument("--cold-object-store", action="store_true", help="do not warm the object store first")
    args = parser.parse_args()

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False,
             object_store_memory=OBJECT_STORE_BYTES, namespace=f"transfer-bench-{uuid.uuid4().hex[:6]}")
    if not args.cold_object_store:
        warm_object_store()
    rows = []
    with tqdm(total=len(args.sizes_mb) * len(PATHS), desc="transfer bench", unit="cell") as progress:
        for size_mb in args.sizes_mb:
            nbytes = (size_mb << 20) // NUM_LAYERS * NUM_LAYERS
            medians = {}
            for path, measure in PATHS.items():
                progress.set_postfix_str(f"{size_mb} MB {path}")
                medians[path] = statistics.median(measure(nbytes, args.repeats))
                progress.update()
            for path, seconds in medians.items():
                rows.append({"size_mb": size_mb, "path": path, "median_ms": round(seconds * 1e3, 3),
                             "gb_per_s": round(nbytes / seconds / 1e9, 3),
                             "ratio_to_memcpy": round(medians["memcpy"] / seconds, 3)})
    ray.shutdown()

    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "transfer.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    table = ["| size | path | median ms | GB/s | ratio to memcpy |", "| --- | --- | --- | --- | --- |"]
    table += [f"| {r['size_mb']} MB | {r['path']} | {r['median_ms']} | {r['gb_per_s']} | {r['ratio_to_memcpy']} |"
              for r in rows]
    command = " ".join(["python -m bench.transfer_bench", *sys.argv[1:]])
    warmth = "cold" if args.cold_object_store else "warmed first"
    header = ["# KV transfer paths", "",
              f"`{command}`, {time.strftime('%Y-%m-%d %H:%M %Z')}, commit {measured_commit()}, on this host: "
              f"each KV path's median over "
              f"{args.repeats} repeats, as a ratio to a memory copy in the same run (object store {warmth}).", ""]
    (args.out / "report.md").write_text("\n".join(header + table) + "\n")
    print("\n".join(table))


if __name__ == "__main__":
    main()
