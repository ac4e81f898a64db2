#!/usr/bin/env bash
# The in-step load with and without NIXL's progress thread: the served run one request at a time per system, under
# the process_vm_readv and sched_switch tracepoints; per system the loads' spans and the reader's preempted time
# (gaps.py). Run from the repository root, nothing else running.
set -euo pipefail
out=bench/results/nixl_load_syscalls
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
for system in nixl_no_progress_thread nixl; do
  perf record -q -a -e syscalls:sys_enter_process_vm_readv -e syscalls:sys_exit_process_vm_readv \
    -e sched:sched_switch -o "$out/$system.perf.data" -- \
    python -m bench.served_transfer_bench --num-requests 12 --systems "$system" --out "$out/progress_$system" \
    > "$out/progress_$system.log" 2>&1
  perf script -i "$out/$system.perf.data" -F tid,cpu,time,event,trace > "/tmp/$system.switches.txt"
  python bench/results/nixl_load_syscalls/gaps.py "/tmp/$system.switches.txt" > "$out/progress_${system}_gaps.txt"
  python bench/results/nixl_load_syscalls/bursts.py "/tmp/$system.switches.txt" > "$out/progress_${system}_bursts.txt"
  rm -f "$out/$system.perf.data" "/tmp/$system.switches.txt" /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
done
echo done
