#!/bin/bash
cd "$(dirname "$0")/../../.."; source .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=1
for round in 1 2 3; do
  for thp in 0 1; do
    if [ $thp = 1 ]; then export THP_MEM_ALLOC_ENABLE=1; else unset THP_MEM_ALLOC_ENABLE; fi
    taskset -c 1 python bench/results/engine_memory_probe/probe.py 2>/dev/null | grep '^{' >> bench/results/engine_memory_probe/thp.jsonl
    rm -f /dev/shm/psm_* /dev/shm/sem.mp-* 2>/dev/null
  done
done
echo done >> bench/results/engine_memory_probe/thp.jsonl
