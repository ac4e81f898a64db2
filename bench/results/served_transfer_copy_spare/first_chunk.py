"""Per round and system: decode's first chunk (prefill's answer -> decode's first chunk, the router's timing: the
hand-over plus the step that loads and computes the prompt's last token), the KV load, and prompt tokens decode
recomputed. `python bench/results/served_transfer_copy_spare/first_chunk.py` from the project root."""
import csv
import statistics
from pathlib import Path

HERE = Path(__file__).parent
for run in ("round1", "round2"):
    rows = list(csv.DictReader(open(HERE / run / "requests.csv")))
    for system in ("object_store", "object_store_copy_own"):
        mine = [row for row in rows if row["system"] == system]
        first_chunk = sorted(float(row["first_chunk_s"]) * 1e3 for row in mine)
        load = sorted(float(row["transfer_s"]) * 1e3 for row in mine)
        recomputed = sorted({row["num_prompt_tokens_recomputed"] for row in mine})
        print(f"{run} {system}: first chunk p50 {statistics.median(first_chunk):.1f} ms "
              f"(min {first_chunk[0]:.0f}, max {first_chunk[-1]:.0f}), load p50 {statistics.median(load):.1f} ms, "
              f"prompt tokens decode recomputed per request {recomputed}")
