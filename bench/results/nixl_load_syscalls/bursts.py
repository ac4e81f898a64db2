"""process_vm_readv calls from `perf script -F tid,time,event,trace` grouped into loads (bursts apart by more than
50 ms): per load its calls, bytes, wall span (first entry to last exit), time inside the kernel, and the gaps
between one call's exit and the next one's entry; then the medians over the loads."""

import re
import statistics
import sys

GAP_S = 0.05
calls, entered = [], {}
for line in open(sys.argv[1]):
    found = re.match(r"\s*(\d+)\s+(?:\[\d+\]\s+)?([\d.]+):\s+syscalls:sys_(enter|exit)_process_vm_readv:\s*(.*)", line)
    if not found:
        continue
    tid, time_s, kind, rest = int(found[1]), float(found[2]), found[3], found[4]
    if kind == "enter":
        iovcnt = re.search(r"liovcnt: (0x[0-9a-f]+)", rest)
        entered[tid] = (time_s, int(iovcnt[1], 16) if iovcnt else 0)
    elif tid in entered:
        start, iovcnt = entered.pop(tid)
        num_bytes = int(rest.split()[0], 16)
        if num_bytes < 1 << 62:  # a failed call returns a negative errno
            calls.append((start, time_s, tid, iovcnt, num_bytes))
calls.sort()
loads, current = [], [calls[0]]
for call in calls[1:]:
    if call[0] - current[-1][1] > GAP_S:
        loads.append(current)
        current = [call]
    else:
        current.append(call)
loads.append(current)
rows = []
for load in loads:
    span = load[-1][1] - load[0][0]
    kernel = sum(end - start for start, end, *_ in load)
    gaps = [b[0] - a[1] for a, b in zip(load, load[1:])]
    rows.append((len(load), sum(call[4] for call in load) / 1e6, span * 1e3, kernel * 1e3,
                 statistics.median(gaps) * 1e3 if gaps else 0.0, max(gaps, default=0.0) * 1e3))
    print(f"{len(load):4d} calls {rows[-1][1]:6.1f} MB  span {rows[-1][2]:7.2f} ms  kernel {rows[-1][3]:7.2f} ms  "
          f"gap p50 {rows[-1][4]:.3f} ms max {rows[-1][5]:.2f} ms  iovecs/call {sorted({c[3] for c in load})}  "
          f"threads {sorted({c[2] for c in load})}")
print(f"{len(rows)} loads; medians: calls {statistics.median(r[0] for r in rows)}, MB "
      f"{statistics.median(r[1] for r in rows):.1f}, span {statistics.median(r[2] for r in rows):.2f} ms, kernel "
      f"{statistics.median(r[3] for r in rows):.2f} ms, gap p50 {statistics.median(r[4] for r in rows):.3f} ms")
