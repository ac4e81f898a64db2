"""What-ifs on a measured comparison: the same requests, replayed in the simulator under variants of its systems.

    python -m bench.sim_whatif --compare bench/results/xeon_split_term/compare_1p1d \
        --profile bench/results/xeon_split_term/profile/model.csv \
        --variant collocated=collocated --variant shipped=splitserve-predictive \
        --variant guard-holds=splitserve-predictive:split_late_slowdown=null

1. Each `--variant LABEL=SYSTEM[:key=value,...]` is a system of the comparison's run.json as it was measured
   (its config, with settings added since at their former values: bench.sim_validate's `as_measured`), with
   `scheduling` keys overridden (values read as YAML: `null`, numbers).
   The app's own config validation applies, so a bad key or value is refused with its name.
2. Every variant replays the same requests: those the comparison recorded for `--requests-of` (the first
   variant's system by default), at their arrival times, token counts and the client's timeout, as sim_validate
   replays them. So two variants differ by their decisions and machines alone, never by their traffic.
3. Per cell, each variant's simulated summary row as bench.compare writes one (SLO slowdowns and margin against the
   comparison's reference.json, the mix of paths), and the share of the offered rate it delivered; per trace, the
   rate at which that share falls to 0.9 (interpolated). The simulator is deterministic: a difference between two
   variants is not a sample, and has no interval; what it is worth live is what a comparison measures.
4. whatif.csv and whatif.md under --out, with the command and commit.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from bench.provenance import provenance
from bench.result_files import span_s, summary_row
from bench.sim_validate import (
    as_measured,
    planned_requests,
    recorded_requests,
    replay,
    saturation,
    saturation_text,
    sim_config,
)
from bench.slo import Reference

COLUMNS = ("delivered_share", "slo_margin", "slo_attainment", "ttft_p50_ms", "slowdown_ttft_p90",
           "slowdown_tbt_p50", "slowdown_tbt_p90", "share_split", "share_decode_local", "share_prefill_local")


def parse_variant(text: str) -> tuple[str, str, dict[str, Any]]:
    """`LABEL=SYSTEM[:key=value,...]` -> (label, system, scheduling overrides)."""
    label, sep, rest = text.partition("=")
    if not sep or not label or not rest:
        raise argparse.ArgumentTypeError(f"a variant is LABEL=SYSTEM[:key=value,...], got {text!r}")
    system, _, settings = rest.partition(":")
    overrides: dict[str, Any] = {}
    for setting in filter(None, settings.split(",")):
        key, sep, value = setting.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"a scheduling setting is key=value, got {setting!r} in {text!r}")
        overrides[key] = yaml.safe_load(value)
    return label, system, overrides


def variant_config(run: dict[str, Any], system: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The system's serve config from run.json with its scheduling section overridden."""
    configs = {entry["name"]: entry["config"] for entry in run["systems"]}
    config = as_measured(configs[system], run.get("measured_commit"))
    args = config["applications"][0]["args"]
    args["scheduling"] = {**(args.get("scheduling") or {}), **overrides}
    return config


def whatif_rows(compare: Path, run: dict[str, Any], profile: Path, variants: list[tuple[str, str, dict[str, Any]]],
                requests_of: str | None = None) -> list[dict[str, Any]]:
    reference = Reference.model_validate_json((compare / "reference.json").read_text())
    cells = {cell["name"]: cell for cell in run["cells"]}
    systems = {entry["name"] for entry in run["systems"]}
    for _, system, _ in variants:
        if system not in systems:
            raise SystemExit(f"no system {system!r} in the comparison: it ran {', '.join(sorted(systems))}")
    measured = recorded_requests(compare / f"requests_{requests_of or variants[0][1]}.csv", list(cells))
    planned = planned_requests(run)
    rows: list[dict[str, Any]] = []
    for label, system, overrides in variants:
        config = sim_config(system, variant_config(run, system, overrides), profile)
        if config is None:
            raise SystemExit(f"the simulator has no cluster for {system!r}")
        simulated = replay(config, measured, planned, run.get("request_timeout_s"))
        for name, records in simulated.items():
            cell = cells[name]
            row = summary_row(label, records, span_s(records), reference.for_trace(cell["trace"]))
            rate = cell.get("rate_per_s")
            rows.append({"variant": label, "system": system, "overrides": json.dumps(overrides), "cell": name,
                         "trace": cell["trace"], "kind": cell["kind"], "rate_per_s": rate,
                         "delivered_share": round(row["throughput_req_s"] / rate, 3) if rate else "",
                         **{key: row.get(key, "") for key in COLUMNS if key != "delivered_share"}})
    return rows


def report_lines(rows: list[dict[str, Any]], command: str, origin: dict[str, Any], run: dict[str, Any]) -> list[str]:
    variants = list(dict.fromkeys(row["variant"] for row in rows))
    lines = ["# What-ifs in the simulator on a measured comparison's requests", "",
             f"`{command}` at commit {origin['commit']}: the requests of the comparison measured at "
             f"{run.get('measured_commit')} ({run.get('started_at')}), replayed under each variant. Deterministic "
             "replays of the same requests: differences between variants have no sampling interval.", "",
             "| variant | system | scheduling overrides |", "| --- | --- | --- |"]
    for label in variants:
        first = next(row for row in rows if row["variant"] == label)
        lines.append(f"| {label} | {first['system']} | {first['overrides']} |")
    lines += ["", "Per cell: delivered share of the offered rate, SLO margin (≤ 1 meets all nine), attainment, "
              "TTFT p50 (ms), TTFT p90 and TBT p50 / p90 slowdowns, and the mix of paths (split / decode-local / "
              "prefill-local).", "", "| cell | variant | delivered | margin | attainment | TTFT p50 | TTFT p90 sd | "
              "TBT p50 sd | TBT p90 sd | mix |", "|" + " --- |" * 10]
    for cell in dict.fromkeys(row["cell"] for row in rows):
        for row in (row for row in rows if row["cell"] == cell):
            mix = " / ".join(f"{row[key]:.2f}" if row[key] != "" else "–"
                             for key in ("share_split", "share_decode_local", "share_prefill_local"))
            lines.append(f"| {cell} | {row['variant']} | {row['delivered_share'] or '–'} | {row['slo_margin']} | "
                         f"{row['slo_attainment']} | {row['ttft_p50_ms']} | {row['slowdown_ttft_p90']} | "
                         f"{row['slowdown_tbt_p50']} | {row['slowdown_tbt_p90']} | {mix} |")
    lines += ["", "Saturation (where the delivered share falls to 0.9 of the offered rate, interpolated):", "",
              "| variant | " + " | ".join(traces := sorted({row["trace"] for row in rows if row["kind"] == "open"}))
              + " |", "|" + " --- |" * (len(traces) + 1)]
    for label in variants:
        found = [saturation_text(saturation([{"rate_per_s": row["rate_per_s"],
                                              "sim_delivered_share": row["delivered_share"]}
                                             for row in rows if row["variant"] == label and row["trace"] == trace
                                             and row["kind"] == "open"], "sim")) for trace in traces]
        lines.append(f"| {label} | " + " | ".join(found) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compare", type=Path, required=True, help="a bench.compare results folder")
    parser.add_argument("--profile", type=Path, required=True, help="bench.profile's model.csv")
    parser.add_argument("--variant", type=parse_variant, action="append", required=True,
                        help="LABEL=SYSTEM[:key=value,...]: a system of the comparison, scheduling keys overridden")
    parser.add_argument("--requests-of", help="whose recorded requests every variant replays (default: the first "
                                              "variant's system)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    run = json.loads((args.compare / "run.json").read_text())
    rows = whatif_rows(args.compare, run, args.profile, args.variant, args.requests_of)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "whatif.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    command = "python -m bench.sim_whatif " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = report_lines(rows, command, provenance(), run)
    (args.out / "whatif.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
