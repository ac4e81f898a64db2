#!/usr/bin/env bash
# NIXL with and without its progress thread, one request at a time, no tracing: two starts of each system,
# alternated (nixl, nixl_no_progress_thread, nixl, nixl_no_progress_thread). Run from the repository root.
set -euo pipefail
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
for round in 1 2; do
  python -m bench.served_transfer_bench --num-requests 12 --systems nixl nixl_no_progress_thread \
    --out "bench/results/nixl_progress_ab/round$round" > "bench/results/nixl_progress_ab/round$round.log" 2>&1
  rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
done
echo done
