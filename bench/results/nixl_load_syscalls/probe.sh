#!/usr/bin/env bash
# Where an in-step NIXL load's time goes in the served app, against the microbenchmark's READ of the same bytes:
# every process_vm_readv (UCX's cma copy) on the host, from the kernel's own syscall tracepoints (perf record -a: no
# ptrace stop, unlike strace, which added ~20 ms to each 48 MB READ: strace/), during a one-at-a-time served run;
# then the same over transfer_bench's nixl and kernel_read rows at 48 MB. Run from the repository root, nothing else
# running.
set -euo pipefail
out=bench/results/nixl_load_syscalls
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
events=(-e syscalls:sys_enter_process_vm_readv -e syscalls:sys_exit_process_vm_readv)

# 1. The served app, NIXL, one request at a time (only decode's engine reads with process_vm_readv there).
perf record -q -a "${events[@]}" -o "$out/served.perf.data" -- \
  python -m bench.served_transfer_bench --num-requests 12 --systems nixl --out "$out/served" > "$out/served.log" 2>&1
perf script -i "$out/served.perf.data" -F tid,time,event,trace > "$out/served_syscalls.txt"

# 2. The microbenchmark's nixl and kernel_read rows at 48 MB (about one 1,000-token prompt's KV).
perf record -q -a "${events[@]}" -o "$out/microbench.perf.data" -- \
  python -m bench.transfer_bench --sizes-mb 48 --repeats 10 --paths nixl kernel_read --out "$out/microbench" \
  > "$out/microbench.log" 2>&1
perf script -i "$out/microbench.perf.data" -F tid,time,event,trace > "$out/microbench_syscalls.txt"
rm -f "$out"/*.perf.data /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
python bench/results/nixl_load_syscalls/bursts.py "$out/served_syscalls.txt" > "$out/served_bursts.txt"
python bench/results/nixl_load_syscalls/bursts.py "$out/microbench_syscalls.txt" > "$out/microbench_bursts.txt"
echo done
