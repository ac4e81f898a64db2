"""The gaps inside in-step NIXL loads, from `perf script -F tid,cpu,time,event,trace` of process_vm_readv and
sched:sched_switch: for every gap over 0.1 ms between two reads of one load, whether the reading thread slept (it
switched out in state S: it waited on purpose) or was preempted (state R: runnable, its core given to another
thread), and which threads ran on its core meanwhile; then the totals over every load."""

import collections
import re
import sys

LONG_GAP_S, LOAD_GAP_S = 1e-4, 0.05
reads, entered, switches = [], {}, []
pattern = re.compile(r"\s*(\d+)\s+\[(\d+)\]\s+([\d.]+):\s+(\S+):\s*(.*)")
for line in open(sys.argv[1]):
    found = pattern.match(line)
    if not found:
        continue
    tid, cpu, time_s, event, rest = int(found[1]), int(found[2]), float(found[3]), found[4], found[5]
    if event.endswith("sys_enter_process_vm_readv"):
        entered[tid] = time_s
    elif event.endswith("sys_exit_process_vm_readv") and tid in entered:
        if int(rest.split()[0], 16) == 524288:  # UCX's fragments of a READ
            reads.append((entered.pop(tid), time_s, tid, cpu))
    elif event.endswith("sched_switch"):
        fields = dict(re.findall(r"(\w+)=(\S+)", rest))
        switches.append((time_s, cpu, fields))
reads.sort()
reader = collections.Counter(tid for *_, tid, _ in reads).most_common(1)[0][0]
reads = [read for read in reads if read[2] == reader]
switches.sort(key=lambda switch: switch[0])

num_loads = 1 + sum(1 for a, b in zip(reads, reads[1:]) if b[0] - a[1] > LOAD_GAP_S)
by_state, gap_s_by_state, ran = collections.Counter(), collections.Counter(), collections.Counter()
for a, b in zip(reads, reads[1:]):
    gap = b[0] - a[1]
    if not LONG_GAP_S < gap <= LOAD_GAP_S:
        continue
    inside = [s for s in switches if a[1] <= s[0] <= b[0]]
    out = [s for s in inside if s[2].get("prev_pid") == str(reader)]
    state = out[0][2].get("prev_state", "?") if out else "on core"
    by_state[state] += 1
    gap_s_by_state[state] += gap
    cpu = out[0][1] if out else a[3]
    # Who had that core from the reader's switch-out to its switch-in: each switch's next thread, until the next.
    on_cpu = [s for s in inside if s[1] == cpu]
    for current, following in zip(on_cpu, on_cpu[1:] + [(b[0], cpu, {})]):
        name = current[2].get("next_comm", "?")
        if current[2].get("next_pid") != str(reader):
            ran[re.sub(r"\d+$", "", name)] += following[0] - current[0]
print(f"reader thread {reader}: {len(reads)} reads of 512 KiB in {num_loads} loads")
for state, count in by_state.most_common():
    print(f"gaps where the reader {'slept' if state.startswith('S') else 'was preempted' if state.startswith('R') else state}"
          f" ({state}): {count}, {gap_s_by_state[state] * 1e3:.1f} ms in all, "
          f"{gap_s_by_state[state] * 1e3 / num_loads:.1f} ms a load")
print("threads on the reader's core during those gaps (ms in all):")
for name, seconds in ran.most_common(12):
    print(f"  {name}: {seconds * 1e3:.1f}")
