"""report.md: what a comparison can and cannot claim, as ratios against the collocated baseline with intervals.

1. The header says which commit was measured, whether the tree was dirty, and which measured files have changed
   since (results older than the code they describe say so), then the versions and the host.
2. The SLO reference (one for every system) and, per trace, the rate sweep's verdicts and each system's goodput.
3. The latency table: every value with its ratio to the baseline in the same cell and a paired, request-level
   bootstrap 95% interval (bench/bootstrap.py): the same requests are drawn for both systems. A p99 is shown only
   where a cell has ≥ 200 requests on both sides; below that, p90 is the tail. A ratio whose interval crosses 1
   is marked "n.s." (not separable). Throughput has no ratio: in an open-loop cell it follows the arrival rate;
   goodput is the throughput figure that separates systems.
4. The generator's send lag per cell; a cell whose p99 lag passed 50 ms is flagged (its latencies include a
   client that fell behind its schedule).
5. The summary counts, per system, only the separable differences.
6. Where the run has a second baseline (`--second-baseline`, always_split by default) and scheduled systems, the
   same table against it: what each policy or setting buys over it, and what it costs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.bootstrap import RatioInterval, paired_ratio_interval
from bench.load_generator import MAX_SEND_LAG_P99_S, RequestRecord
from bench.provenance import MEASURED_PATHS, PLAN_PATHS, changed_since
from bench.result_files import request_values, span_s
from bench.slo import SLO_FACTORS, Goodput, Reference, goodput

# A cell measured on a host more than this much slower or faster than when the reference was measured is flagged:
# the tightest bounds (TBT and E2E P50 within 1.25x) leave little room for a host that is itself 15% slower.
MAX_HOST_DRIFT = 0.15
# summary.csv's columns of bench/host_probe.py's two probes: what each times, as the report names it.
HOST_PROBES = {"host_probe_ms": ("compute", "the CPU time of a fixed matrix product in cache"),
               "host_memory_probe_ms": ("memory", "the CPU time of a matrix-vector product over 256 MiB of weights")}
# A cell that delivered less than this share of its offered requests/s ran past the system's throughput (at light
# load the share is ~0.95-1: the span counts the last request's own latency).
SATURATED_SHARE = 0.9

MIN_REQUESTS_FOR_P99 = 200


@dataclass(frozen=True)
class Metric:
    key: str  # how a request's values are read: ttft, tpot, tbt (every gap), e2e
    heading: str
    q: float
    is_lower_better: bool = True


METRICS = [Metric("ttft", "TTFT p50", 50), Metric("ttft", "TTFT p90", 90), Metric("ttft", "TTFT p99", 99),
           Metric("tpot", "TBT p50 (per request)", 50), Metric("tbt", "TBT p90 (all gaps)", 90),
           Metric("tbt", "TBT p99 (all gaps)", 99), Metric("e2e", "E2E p50", 50), Metric("e2e", "E2E p90", 90)]


def is_shown(metric: Metric, num_requests: int) -> bool:
    """A p99 of fewer than 200 requests is little more than their maximum: left out (–) below that."""
    return metric.q < 99 or num_requests >= MIN_REQUESTS_FOR_P99


def paired(system: list[RequestRecord], baseline: list[RequestRecord], key: str) -> tuple[list, list]:
    """The values of the requests both systems served (matched by run and request id)."""
    theirs = {(r.repeat, r.request_id): request_values(r, key) for r in baseline if r.is_ok}
    pairs = [(values, theirs[(r.repeat, r.request_id)]) for r in system if r.is_ok
             if (values := request_values(r, key)) and theirs.get((r.repeat, r.request_id))]
    return [ours for ours, _ in pairs], [base for _, base in pairs]


def interval(system: list[RequestRecord], baseline: list[RequestRecord], metric: Metric) -> RatioInterval | None:
    ours, theirs = paired(system, baseline, metric.key)
    if len(ours) < 2:
        return None
    return paired_ratio_interval(ours, theirs, metric.q)


def _format_ms(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


def _cell_value(records: list[RequestRecord], metric: Metric) -> float | None:
    values = [value for record in records if record.is_ok for value in request_values(record, metric.key)]
    return float(np.percentile(values, metric.q)) * 1e3 if values else None


def _ratio_text(found: RatioInterval | None) -> str:
    if found is None:
        return ""
    text = f"{found.ratio:.2f}× [{found.low:.2f}–{found.high:.2f}]"
    return f" ({text}{'' if found.is_separable else ', n.s.'})"


def latency_table(runs: list[Any], cells: list[Any], baseline_system: str) -> tuple[str, list[dict[str, Any]]]:
    """The main table and every ratio in it (for the summary)."""
    baseline = next((run for run in runs if run.name == baseline_system), None)
    headings = [metric.heading for metric in METRICS]
    lines = ["| cell | system | n | " + " | ".join(f"{heading} ms" for heading in headings)
             + " | output tok/s | errors |", "|" + " --- |" * (len(headings) + 5)]
    ratios = []
    for cell in cells:
        base_records = baseline.records.get(cell.name, []) if baseline else []
        for run in runs:
            records = run.records.get(cell.name)
            if not records:
                continue
            texts = []
            for metric in METRICS:
                if not is_shown(metric, min(len(records), len(base_records) or len(records))):
                    texts.append("–")
                    continue
                value = _cell_value(records, metric)
                found = None if run is baseline or not base_records else interval(records, base_records, metric)
                if found is not None:
                    ratios.append({"system": run.name, "cell": cell.name, "metric": metric.heading,
                                   "is_lower_better": metric.is_lower_better, "interval": found})
                texts.append("–" if value is None else _format_ms(value) + _ratio_text(found))
            num_ok = sum(record.is_ok for record in records)
            tokens = sum(record.output_tokens for record in records if record.is_ok)
            lines.append(f"| {cell.name} | {run.name} | {num_ok} | " + " | ".join(texts)
                         + f" | {tokens / max(1e-9, span_s(records)):.3g} | {len(records) - num_ok} |")
    return "\n".join(lines), ratios


def reference_section(reference: Reference | None) -> list[str]:
    if reference is None:
        return ["No reference: the baseline was not run and no --reference was given, so no SLO verdicts."]
    lines = [f"Every system is judged against one reference: **{reference.system}**, one request at a time "
             f"(commit {reference.commit}). A request's slowdown is its latency over what the reference takes for "
             "its size; a cell meets the SLOs when the P50/P90/P99 slowdowns are within "
             + ", ".join(f"{metric.upper()} {'/'.join(f'{f:g}×' for f in bounds.values())}"
                         for metric, bounds in SLO_FACTORS.items())
             + " (all nine; a failed request is a miss). TBT here is a request's mean time between tokens.", "",
             "| trace | requests | TTFT ms = a + b·prompt | fit error (median) | TBT ms = c + d·context | fit error |",
             "| --- | --- | --- | --- | --- | --- |"]
    for trace, fit in reference.fits.items():
        lines.append(f"| {trace} | {fit.num_requests} | {fit.ttft.intercept_s * 1e3:.1f} + "
                     f"{fit.ttft.slope_s * 1e3:.3f}·p | {fit.ttft.median_abs_error:.0%} | "
                     f"{fit.tpot.intercept_s * 1e3:.1f} + {fit.tpot.slope_s * 1e3:.4f}·c | "
                     f"{fit.tpot.median_abs_error:.0%} |")
    return lines


def slo_section(rows: list[dict[str, Any]]) -> list[str]:
    """Per trace: each system's SLO margin at every rate, and its goodput."""
    lines = []
    for trace in dict.fromkeys(row["trace"] for row in rows if row["kind"] == "open"):
        sweep = [row for row in rows if row["trace"] == trace and row["kind"] == "open"]
        rates = sorted({row["rate_per_s"] for row in sweep})
        lines += [f"### {trace}", "", "| system | " + " | ".join(f"{rate:g}/s" for rate in rates)
                  + " | goodput req/s (all nine) | goodput req/s (≥ 90% attain) |", "|" + " --- |" * (len(rates) + 3)]
        for system in dict.fromkeys(row["system"] for row in sweep):
            by_rate = {row["rate_per_s"]: row for row in sweep if row["system"] == system}
            margins = []
            for rate in rates:
                row = by_rate.get(rate)
                if row is None or row.get("slo_margin") in (None, ""):
                    margins.append("–")
                else:
                    margin = float(row["slo_margin"])
                    shown = "∞" if margin == float("inf") else f"{margin:.2f}"
                    share = row.get("slo_attainment")
                    attained = "" if share in (None, "") else f" · {float(share):.0%}"
                    margins.append(f"{shown} {'✓' if margin <= 1 else '✗'}{attained}")
            goodput = next((row for row in sweep if row["system"] == system and "goodput_kind" in row), None)
            by_share = next((row for row in sweep if row["system"] == system and "attainment_goodput_kind" in row),
                            None)
            lines.append(f"| {system} | " + " | ".join(margins)
                         + f" | {_goodput_text(goodput)} | {_goodput_text(by_share, prefix='attainment_')} |")
        lines += ["", *saturation_lines(sweep, rates)]
        in_flight = {row["rate_per_s"]: row["mean_in_flight"] for row in sweep
                     if row["system"] == sweep[0]["system"] and row.get("mean_in_flight") not in (None, "")}
        if in_flight:
            lines += ["", f"Requests in flight on average ({sweep[0]['system']}, Little's law): "
                      + ", ".join(f"{float(in_flight[rate]):.2g} at {rate:g}/s" for rate in sorted(in_flight)) + "."]
        lines.append("")
    return lines


def first_saturated_rate(delivered_share_by_rate: dict[float, float]) -> float | None:
    """The lowest rate whose delivered share of the offered requests/s is below SATURATED_SHARE; None: none is."""
    return next((rate for rate in sorted(delivered_share_by_rate)
                 if delivered_share_by_rate[rate] < SATURATED_SHARE), None)


def saturation_rate(delivered_share_by_rate: dict[float, float]) -> Goodput:
    """Where a sweep's delivered share of the offered requests/s falls to SATURATED_SHARE: interpolated linearly
    between the last rate that keeps up and the first that does not (slo.goodput's rule, on the share), so that two
    sweeps of the same rates can be compared closer than their spacing; `at_least` the top rate where every rate
    kept up, `below_lowest` where the lowest did not."""
    # As a margin that is at most 1 exactly while the share reaches SATURATED_SHARE (rounded, as attainment's).
    return goodput({rate: round(1 + SATURATED_SHARE - share, 12) for rate, share in delivered_share_by_rate.items()})


def saturation_lines(sweep: list[dict[str, Any]], rates: list[float]) -> list[str]:
    """Delivered over offered requests/s per system and rate: where it falls below SATURATED_SHARE the system
    no longer keeps up (its queue grows for as long as the cell lasts), i.e. the sweep went past its throughput."""
    lines = [f"Delivered over offered requests/s (below {SATURATED_SHARE:g}: past the system's throughput):", "",
             "| system | " + " | ".join(f"{rate:g}/s" for rate in rates) + " | past its throughput from |",
             "|" + " --- |" * (len(rates) + 2)]
    for system in dict.fromkeys(row["system"] for row in sweep):
        shares = {row["rate_per_s"]: float(row["throughput_req_s"]) / row["rate_per_s"] for row in sweep
                  if row["system"] == system and row.get("throughput_req_s") not in (None, "")}
        past = first_saturated_rate(shares)
        lines.append(f"| {system} | " + " | ".join(f"{shares[rate]:.2f}" if rate in shares else "–" for rate in rates)
                     + f" | {'not reached' if past is None else f'{past:g}/s'} |")
    return lines


def _goodput_text(row: dict[str, Any] | None, *, prefix: str = "") -> str:
    if row is None:
        return "–"
    kind = row[f"{prefix}goodput_kind"]
    if kind == "below_lowest":
        return "below the lowest rate"
    return ("≥ " if kind == "at_least" else "") + f"{float(row[f'{prefix}goodput_req_s']):.3g}"


def generator_section(rows: list[dict[str, Any]]) -> list[str]:
    late = [row for row in rows if row.get("is_generator_late") in (True, "True")]
    worst = max((float(row["send_lag_p99_ms"]) for row in rows if row.get("send_lag_p99_ms") != ""), default=0.0)
    nice = {row.get("generator_nice") for row in rows if row.get("generator_nice") not in (None, "")}
    group = {row.get("generator_autogroup_nice") for row in rows
             if row.get("generator_autogroup_nice") not in (None, "")}
    steals = [float(row["host_steal_share"]) for row in rows if row.get("host_steal_share") not in (None, "")]
    stolen = (f" The hypervisor took {min(steals):.1%}-{max(steals):.1%} of this machine's CPU while the cells ran "
              "(Linux's steal time): a paused virtual CPU delays whatever it runs, at any priority, the generator "
              "and the servers alike." if steals else "")
    session = f", its session's group nice {', '.join(map(str, sorted(group)))}" if group else ""
    lines = [f"The load generator ran in its own process (nice {', '.join(map(str, sorted(nice))) or '?'}{session}); "
             f"its worst p99 send lag over all cells was {worst:.1f} ms (limit {MAX_SEND_LAG_P99_S * 1e3:.0f} ms)."
             + stolen]
    if late:
        lines += ["", "Cells whose generator fell behind (their latencies include the lag):", "",
                  "| cell | system | send lag p50 / p99 / max ms | loop stalls s (longest ms) | run-queue wait s "
                  "| host steal |", "| --- | --- | --- | --- | --- | --- |"]
        lines += [f"| {row['workload']} | {row['system']} | {row['send_lag_p50_ms']} / {row['send_lag_p99_ms']} / "
                  f"{row['send_lag_max_ms']} | {_or_dash(row.get('generator_loop_stall_s'))} "
                  f"({_or_dash(row.get('generator_loop_stall_max_ms'))}) | "
                  f"{_or_dash(row.get('generator_run_queue_wait_s'))} | {_share(row.get('host_steal_share'))} |"
                  for row in late]
        lines += ["", "A loop stall with little run-queue wait is not CPU contention: the generator's thread was not "
                  "waiting for a core, its wake-up came late (on this host's kernel, built without preemption, a "
                  "long kernel path of another process on that core delays it at any priority)."]
    else:
        lines.append("No cell was flagged.")
    return lines


def host_section(rows: list[dict[str, Any]], baseline: str) -> list[str]:
    """The host's speed before each cell (bench/host_probe.py), by each probe, against its speed when the reference
    was measured; a cell is flagged when either probe is more than MAX_HOST_DRIFT off."""
    lines, drifted = [], []
    for column, (kind, what) in HOST_PROBES.items():
        probes = [(row, float(row[column])) for row in rows if row.get(column) not in (None, "")]
        if not probes:
            continue
        lowest, highest = min(probe for _, probe in probes), max(probe for _, probe in probes)
        line = (f"The host's {kind} speed (bench/host_probe.py: {what}, on one thread, timed before each cell, the "
                f"engines idle) was {lowest:.1f}-{highest:.1f} ms per probe.")
        at_reference = [probe for row, probe in probes if row["system"] == baseline and row["kind"] == "uncontended"]
        if at_reference:
            reference_ms = float(np.mean(at_reference))
            line += f" When the reference's uncontended cells were measured: {reference_ms:.1f} ms."
            drifted += [(row, kind, probe, probe / reference_ms) for row, probe in probes
                        if abs(probe / reference_ms - 1) > MAX_HOST_DRIFT]
        lines += [line, ""]
    if not lines:
        return ["No cell recorded the host's speed (cells measured before the probe existed)."]
    if not drifted:
        return [*lines, f"No cell ran on a host more than {MAX_HOST_DRIFT:.0%} off the reference's speed."]
    return [*lines, f"Cells measured on a host more than {MAX_HOST_DRIFT:.0%} off the reference's speed (their "
            "slowdowns mix the system's with the host's):", "",
            "| cell | system | probe | ms | against the reference's |", "| --- | --- | --- | --- | --- |",
            *(f"| {row['workload']} | {row['system']} | {kind} | {probe:.1f} | {ratio:.2f}× |"
              for row, kind, probe, ratio in drifted)]


def _or_dash(value: Any) -> str:
    return "–" if value in (None, "") else str(value)


def decisions_section(rows: list[dict[str, Any]]) -> list[str]:
    """Per cell and scheduled system: the mix of paths its scheduler chose, and its TTFT predictions' error."""
    scheduled = [row for row in rows if row.get("share_split") not in (None, "")]
    if not scheduled:
        return ["No system said which path its requests took."]
    lines = ["The path splitserve's scheduler chose for each answered request (its `Server-Timing`), and, where the "
             "policy predicts, the median of |measured TTFT from the send / predicted - 1|.", "",
             "| cell | system | split | decode-local | prefill-local | TTFT prediction error p50 (n) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for row in scheduled:
        error = (f"{float(row['ttft_prediction_error_p50']):.0%} ({row.get('num_ttft_predictions')})"
                 if row.get("ttft_prediction_error_p50") not in (None, "") else "–")
        lines.append(f"| {row['workload']} | {row['system']} | {_share(row['share_split'])} | "
                     f"{_share(row['share_decode_local'])} | {_share(row['share_prefill_local'])} | {error} |")
    return lines


def _share(value: Any) -> str:
    return "–" if value in (None, "") else f"{float(value):.1%}"


def findings(ratios: list[dict[str, Any]]) -> list[str]:
    """Per system: how many ratios are separably better, separably worse, or not separable; then, per cell, the
    separable ones (better first)."""
    lines = []
    for system in dict.fromkeys(ratio["system"] for ratio in ratios):
        mine = [ratio for ratio in ratios if ratio["system"] == system]
        is_better = {id(r): (r["interval"].high < 1) == r["is_lower_better"] for r in mine}
        separable = [r for r in mine if r["interval"].is_separable]
        num_better = sum(is_better[id(r)] for r in separable)
        lines.append(f"- **{system}**: of {len(mine)} ratios, {num_better} separably better, "
                     f"{len(separable) - num_better} separably worse, {len(mine) - len(separable)} not separable.")
        for cell in dict.fromkeys(r["cell"] for r in separable):
            found = sorted((r for r in separable if r["cell"] == cell), key=lambda r: not is_better[id(r)])
            lines.append(f"  - {cell}: " + "; ".join(
                f"{'better' if is_better[id(r)] else 'worse'} {r['metric']} {r['interval'].ratio:.2f}×"
                for r in found))
    return lines


def second_baseline_section(runs: list[Any], cells: list[Any], second_baseline: str | None) -> list[str]:
    """Every scheduled system against a second baseline in the same run (by default the one that splits every
    request): what a policy or setting buys over it, and what it costs, with the same paired intervals."""
    scheduled = [run for run in runs if run.name != second_baseline
                 and any(record.path for records in run.records.values() for record in records)]
    baseline = next((run for run in runs if run.name == second_baseline), None)
    if baseline is None or not scheduled:
        return []
    table, ratios = latency_table([baseline, *scheduled], cells, second_baseline)
    return ["", f"## Against {second_baseline}", "",
            f"The same cells, each splitserve system's ratio against **{second_baseline}** on the same requests.", "",
            table, "", *findings(ratios)]


def sweep_section(meta: dict[str, Any]) -> list[str]:
    """Where the sweep's rates came from: loads of the reference at this host's unit rates, or given."""
    unit_rates = meta.get("unit_rates_per_s") or {}
    if not unit_rates:
        return []
    loads = meta.get("plan", {}).get("loads", {})
    rates = meta.get("sweep_rates_per_s", {})
    def listed(values: list[float]) -> str:
        return ", ".join(f"{value:g}" for value in values)

    described = "; ".join(
        f"{trace}: one request in flight at {unit:.3f}/s (a mean uncontended E2E of {1 / unit:.2f} s), loads "
        f"{listed(loads.get(trace, []))} → {listed(rates.get(trace, []))} requests/s"
        for trace, unit in unit_rates.items())
    return [f"The rate sweep is set in loads of the reference (its mean requests in flight: rate × its mean "
            f"uncontended E2E over the trace's first requests, by its fit), at this host's unit rates: {described}.",
            ""]


def write(runs: list[Any], cells: list[Any], rows: list[dict[str, Any]], meta: dict[str, Any],
          reference: Reference | None, figures: list[tuple[str, str]], path: Path,
          second_baseline: str | None = None) -> str:
    """`second_baseline`: a system (always_split by default) against which scheduled systems get a table too."""
    table, ratios = latency_table(runs, cells, meta["baseline"])
    host, versions = meta["host"], meta["versions"]
    are_cells_checked = bool(meta.get("are_cells_digested"))
    changed = changed_since(meta["measured_commit"], paths=tuple(
        path for path in MEASURED_PATHS if not (are_cells_checked and path in PLAN_PATHS)))
    checked = (" Every cell sent what this plan's cell of its name sends (a digest per cell)."
               if are_cells_checked else "")
    if changed is None:
        freshness = "Whether the code changed since cannot be told here (no git history of that commit)."
    elif changed:
        freshness = (f"**These results are older than the code**: {len(changed)} measured files changed since "
                     f"(`{'`, `'.join(changed[:8])}`{', …' if len(changed) > 8 else ''}).")
    else:
        freshness = "No measured file (app, config, pins, the benchmark's client and arithmetic) changed since."
    dirty = " with uncommitted changes" if meta["is_dirty"] and not meta.get("is_report_only") else ""
    window = meta.get("cells_finished_between")
    when = f" Its cells finished between {window[0]} and {window[1]}." if window else ""
    # The raw cells' commit, which a report rebuilt later (`--report-only`) at another commit must still name.
    measured = meta.get("measured_commit") or meta["commit"]
    measured_at = [commit for commit in meta.get("cells_measured_at", []) if commit != measured]
    also = (f" (some cells at `{'`, `'.join(measured_at)}`, where no measured file differs from it)"
            if measured_at else "")
    rebuilt = (f" This report was rebuilt from its raw files at commit `{meta['commit']}`."
               if meta.get("is_report_only") and not measured.startswith(meta["commit"]) else "")
    lines = [f"# Comparison, {meta['started_at']}", "",
             f"Measured at commit `{measured}`{dirty}{also}.{when}{rebuilt} {freshness}{checked}", "",
             f"Model {meta['model']} on {host['num_cores']} cores ({host['cpu']}, {host['memory_gib']} GiB); "
             + ", ".join(f"{package} {found}" for package, found in versions.items())
             + f". This invocation took {meta['wall_s'] / 60:.1f} min; {meta['repeats']} run(s) of every cell. Latencies count "
             "from each request's scheduled arrival (the send-time view is in summary.csv). Ratios are against "
             f"**{meta['baseline']}** in the same cell, on the same requests, with paired bootstrap 95% intervals; "
             "below 1 is better.", "", "## Systems", "", "| system | what | start-up s | status |",
             "| --- | --- | --- | --- |"]
    for system in meta["systems"]:
        startup = "–" if system["startup_s"] is None else f"{system['startup_s']:.0f}"
        status = "ok" if not system["error"] else f"failed: {system['error'][:200]}"
        lines.append(f"| {system['name']} | {system['description']} | {startup} | {status} |")
    lines += ["", "Each system's full config is in run.json.", "", "## Cells", "", *sweep_section(meta),
              "| cell | kind | requests | scaling |", "| --- | --- | --- | --- |"]
    for cell in meta["cells"]:
        scaling = cell.get("scaling") or {}
        described = ", ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                              for key, value in scaling.items() if value not in (None, 1.0, 0.0))
        load = f"{cell['rate_per_s']:g} req/s" if cell.get("rate_per_s") else f"concurrency {cell.get('concurrency')}"
        lines.append(f"| {cell['name']} | {cell['kind']}, {load} | {cell['num_requests']} | {described or '–'} |")
    lines += ["", "## SLOs and goodput", "", *reference_section(reference), "",
              "SLO margin per rate (the worst of the nine slowdown percentiles over its bound; ✓ at or below 1), and "
              "goodput: the highest rate that meets them, interpolated between the last rate that does and the "
              "first that does not. After the dot, the SLO attainment (DistServe's view): the share of requests "
              "within the P90 bounds on TTFT, TBT and E2E at once; its goodput is the highest rate at which at least "
              "90% are.", "", *slo_section(rows),
              "## Latency and throughput", "", table, "", "## What the intervals support", "", *findings(ratios),
              "", "## The scheduler's decisions", "", *decisions_section(rows),
              *second_baseline_section(runs, cells, second_baseline),
              "", "## The load generator", "", *generator_section(rows),
              "", "## The host", "", *host_section(rows, meta["baseline"]), "", "## Figures", ""]
    lines += [f"### {title}\n\n![{title}]({name})\n" for title, name in figures]
    path.write_text("\n".join(lines) + "\n")
    return table
