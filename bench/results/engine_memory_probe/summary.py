"""The probes' figures side by side: `python bench/results/engine_memory_probe/summary.py` from the project root."""
import json
import statistics
from pathlib import Path

HERE = Path(__file__).parent


def runs(name: str) -> list[dict]:
    return [json.loads(line) for line in (HERE / name).read_text().splitlines() if line.startswith("{")]


def pairs(rows: list[dict], key: str, values: tuple[str | int, str | int]) -> None:
    by = [rows[index:index + 2] for index in range(0, len(rows), 2)]
    ratios = []
    for number, (first, second) in enumerate(by, start=1):
        assert (first[key], second[key]) == values
        ratio = second["step_p50_ms"] / first["step_p50_ms"]
        ratios.append(ratio)
        print(f"  start pair {number}: {key}={values[0]} step p50 {first['step_p50_ms']:.1f} ms, {key}={values[1]} "
              f"{second['step_p50_ms']:.1f} ms, ratio {ratio:.3f}; prefill p50 {statistics.median(first['prefill_s']):.2f}"
              f" / {statistics.median(second['prefill_s']):.2f} s; AnonHugePages {first['anon_huge_kb']} / "
              f"{second['anon_huge_kb']} kB")
    pooled = [[step for row in rows if row[key] == value for step in row["step_ms"]] for value in values]
    print(f"  pooled step medians {statistics.median(pooled[0]):.1f} / {statistics.median(pooled[1]):.1f} ms "
          f"({len(pooled[0])} steps' means each); pair ratios {min(ratios):.3f}-{max(ratios):.3f}")


print("THP_MEM_ALLOC_ENABLE unset (0) then 1, engine bound to core 1:")
pairs(runs("thp.jsonl"), "thp", ("0", "1"))
print("core 0 then core 1, no THP:")
pairs(runs("cores.jsonl"), "core", (0, 1))
