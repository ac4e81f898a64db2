#!/usr/bin/env bash
# Where an in-step NIXL load's time goes in the served app, against the microbenchmark's READ of the same bytes:
# every process_vm_readv (UCX's cma copy) of decode's engine processes, with its iovec counts and its time in the
# kernel (strace -T), during a one-at-a-time served run; then the same for transfer_bench's nixl and kernel_read rows
# at 48 MB (the bench process is the reader there). Run from the repository root, nothing else running.
set -euo pipefail
out=bench/results/nixl_load_syscalls/strace
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1

# 1. The served app, NIXL, one request at a time; strace attaches to decode's engine processes once they exist.
python -m bench.served_transfer_bench --num-requests 12 --systems nixl --out "$out/served" > "$out/served.log" 2>&1 &
bench_pid=$!
decode_pids=""
for _ in $(seq 600); do
  decode_pids=$(for pid in $(pgrep -f VLLM || true); do
    if tr '\0' '\n' < /proc/$pid/environ 2>/dev/null | grep -qx 'VLLM_CPU_OMP_THREADS_BIND=1'; then echo "$pid"; fi
  done | sort -u | tr '\n' ' ')
  if [ "$(echo $decode_pids | wc -w)" -ge 2 ]; then break; fi
  sleep 1
done
echo "decode's engine processes: $decode_pids"
ps -o pid,args -p "$(echo $decode_pids | tr ' ' ',')" | cut -c1-120 || true
sleep 20  # past their start-up
args=(); for pid in $decode_pids; do args+=(-p "$pid"); done
strace -f -T -tt -e trace=process_vm_readv -o "$out/strace_served.txt" "${args[@]}" &
strace_pid=$!
wait "$bench_pid"
kill "$strace_pid" 2>/dev/null || true
wait "$strace_pid" 2>/dev/null || true

# 2. The microbenchmark's nixl and kernel_read rows at 48 MB (about one 1,000-token prompt's KV), under strace.
strace -f --seccomp-bpf -T -tt -e trace=process_vm_readv -o "$out/strace_microbench.txt" \
  python -m bench.transfer_bench --sizes-mb 48 --repeats 10 --paths nixl kernel_read --out "$out/microbench" \
  > "$out/microbench.log" 2>&1
rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
echo done
