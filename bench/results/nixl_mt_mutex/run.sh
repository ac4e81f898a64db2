#!/usr/bin/env bash
# UCX's mutex (the default, transfer.nixl_ucx_lock) against its spinlock (nixl_ucx_spin), one request at a time, no
# tracing: two starts of each system, the order swapped between rounds. Run from the repository root.
set -euo pipefail
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
orders=("nixl nixl_ucx_spin" "nixl_ucx_spin nixl")
for round in 1 2; do
  # shellcheck disable=SC2086
  python -m bench.served_transfer_bench --num-requests 12 --systems ${orders[$((round - 1))]} \
    --out "bench/results/nixl_mt_mutex/round$round" > "bench/results/nixl_mt_mutex/round$round.log" 2>&1
  rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
done
echo done
