#!/usr/bin/env bash
# The same A/B under load: Poisson arrivals at 0.12 requests/s (1,000-token prompts: near this host's prefill
# capacity), one start of each system. Run from the repository root, nothing else running.
set -euo pipefail
source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
python -m bench.served_transfer_bench --num-requests 16 --rate 0.12 --systems nixl nixl_ucx_spin \
  --out bench/results/nixl_mt_mutex/load > bench/results/nixl_mt_mutex/load.log 2>&1
rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null || true
echo done
