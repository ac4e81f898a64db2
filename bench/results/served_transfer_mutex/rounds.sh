#!/usr/bin/env bash
# NIXL (UCX's mutex) against the plain vLLM engine, one request at a time: two more starts of each, the order
# swapped, for the second token's spread between starts. Run from the repository root, nothing else running.
set -euo pipefail
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
orders=("nixl collocated" "collocated nixl")
for round in 1 2; do
  # shellcheck disable=SC2086
  python -m bench.served_transfer_bench --num-requests 12 --systems ${orders[$((round - 1))]} \
    --out "bench/results/served_transfer_mutex/round$round" > "bench/results/served_transfer_mutex/round$round.log" 2>&1
  rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
done
echo done
