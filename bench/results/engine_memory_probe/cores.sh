#!/bin/bash
cd "$(dirname "$0")/../../.."; source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_CPU_KVCACHE_SPACE=1
unset THP_MEM_ALLOC_ENABLE
for round in 1 2 3; do
  for core in 0 1; do
    VLLM_CPU_OMP_THREADS_BIND=$core taskset -c $core python bench/results/engine_memory_probe/probe.py 2>/dev/null | grep '^{' | sed "s/^{/{\"core\": $core, \"round\": $round, /" >> bench/results/engine_memory_probe/cores.jsonl
    rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null
  done
done
echo done >> bench/results/engine_memory_probe/cores.jsonl
