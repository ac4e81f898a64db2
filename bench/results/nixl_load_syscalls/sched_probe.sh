#!/usr/bin/env bash
# Who has decode's core in the gaps of an in-step NIXL load: the scheduler's switches (sched:sched_switch) beside the
# process_vm_readv tracepoints over a short one-at-a-time served run (probe.sh's part 1, 6 requests). Run from the
# repository root, nothing else running.
set -euo pipefail
out=bench/results/nixl_load_syscalls
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
perf record -q -a -e syscalls:sys_enter_process_vm_readv -e syscalls:sys_exit_process_vm_readv -e sched:sched_switch \
  -o "$out/sched.perf.data" -- \
  python -m bench.served_transfer_bench --num-requests 6 --systems nixl --out "$out/sched_served" \
  > "$out/sched_served.log" 2>&1
perf script -i "$out/sched.perf.data" -F tid,cpu,time,event,trace > "$out/sched_switches.txt"
rm -f "$out"/*.perf.data /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
python bench/results/nixl_load_syscalls/gaps.py "$out/sched_switches.txt" > "$out/sched_gaps.txt"
echo done
