"""The comparison's figures, as PNG files (matplotlib, no display needed).

- cdf_<cell>.png: CDFs of TTFT and of every inter-token gap (TBT), one line per system, for each loaded cell.
- latency_vs_load_<trace>.png: the goodput curves: P90 TTFT, TBT (a request's mean gap) and E2E, and the SLO
  margin (the worst of the nine slowdown percentiles over its bound; at or below 1 the SLOs hold), against the
  open-loop rate; goodput is where the margin crosses 1.
- timeline_<cell>.png: every request of a cell on a time axis, one panel per system, split into its phases:
  prefill, KV hand-over + first decode step, decode (from splitserve's Server-Timing header); systems that do not
  report phases show time to first token and decode. Requests are grouped by the prefill replica that ran them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)
import numpy as np  # noqa: E402

PHASE_COLORS = {"prefill": "tab:blue", "KV hand-over + 1st decode step": "tab:red", "to first token": "tab:gray",
                "decode": "tab:green"}


def file_name(cell: str) -> str:
    return cell.replace("@", "_").replace("/s", "rps").replace(".", "_")  # conv@0.5/s -> conv_0_5rps


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if values:
        ordered = np.sort(values)
        ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label, drawstyle="steps-post")


def draw_cdfs(runs: list[Any], cell: str, path: Path) -> None:
    fig, (ttft_ax, tbt_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        ok = [record for record in run.records.get(cell, []) if record.is_ok]
        _cdf(ttft_ax, [record.ttft_s for record in ok], run.name)
        _cdf(tbt_ax, [gap for record in ok for gap in record.tbt_s], run.name)
    for ax, metric in ((ttft_ax, "TTFT"), (tbt_ax, "time between tokens")):
        ax.set(xlabel=f"{metric} (s)", ylabel="fraction of " + ("requests" if metric == "TTFT" else "gaps"),
               title=f"{cell}: {metric}")
        ax.grid(alpha=0.3)
    tbt_ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_latency_vs_load(rows: list[dict[str, Any]], trace: str, path: Path) -> None:
    panels = [("ttft_p90_ms", "P90 TTFT (ms)"), ("tpot_p90_ms", "P90 TBT, per request (ms)"),
              ("e2e_p90_ms", "P90 E2E (ms)"), ("slo_margin", "SLO margin (≤ 1 meets all nine)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.8))
    systems = list(dict.fromkeys(row["system"] for row in rows))
    for system in systems:
        cells = sorted((row for row in rows if row["system"] == system and row["trace"] == trace
                        and row["kind"] == "open"), key=lambda row: row["rate_per_s"])
        for ax, (key, _) in zip(axes, panels, strict=True):
            points = [(row["rate_per_s"], min(float(row[key]), 1e3)) for row in cells
                      if row.get(key) not in (None, "")]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=system)
    for ax, (key, label) in zip(axes, panels, strict=True):
        ax.set(xlabel="requests/s (open loop)", ylabel=label, title=f"{trace}: {label}")
        ax.grid(alpha=0.3)
    axes[-1].axhline(1.0, color="black", linestyle=":", linewidth=1)
    axes[-1].set_yscale("log")
    axes[-1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _phases(record: Any) -> list[tuple[str, float, float]]:
    """From the request's arrival (TTFT and E2E count from there); a server's phases from when it was sent."""
    if record.prefill_s is not None and record.first_chunk_s is not None:
        sent = record.start_s
        handover_end = sent + record.prefill_s + record.first_chunk_s
        phases = [("prefill", sent, record.prefill_s),
                  ("KV hand-over + 1st decode step", sent + record.prefill_s, record.first_chunk_s)]
    else:
        handover_end = record.arrival_s + record.ttft_s
        phases = [("to first token", record.arrival_s, record.ttft_s)]
    return phases + [("decode", handover_end, max(0.0, record.arrival_s + record.e2e_s - handover_end))]


def draw_timeline(runs: list[Any], cell: str, path: Path) -> None:
    shown = [run for run in runs if any(record.is_ok for record in run.records.get(cell, []))]
    if not shown:
        return
    fig, axes = plt.subplots(len(shown), 1, figsize=(12, 2.2 + 1.6 * len(shown)), sharex=True, squeeze=False)
    for ax, run in zip(axes[:, 0], shown, strict=True):
        ok = sorted((record for record in run.records[cell] if record.is_ok and record.repeat == 0),  # one run
                    key=lambda record: (record.prefill_engine_id, record.repeat, record.arrival_s))
        for row, record in enumerate(ok):
            for phase, begin, width in _phases(record):
                ax.barh(row, width, left=begin, height=0.8, color=PHASE_COLORS[phase])
        engines = list(dict.fromkeys(record.prefill_engine_id for record in ok if record.prefill_engine_id))
        lanes = f" (prefill replicas: {', '.join(engines)})" if engines else ""
        ax.set(ylabel="request", title=f"{run.name}{lanes}")
        ax.title.set_fontsize(9)
    handles = [plt.Rectangle((0, 0), 1, 1, color=color) for color in PHASE_COLORS.values()]
    axes[0, 0].legend(handles, list(PHASE_COLORS), fontsize=7, loc="upper left", ncols=4)
    axes[-1, 0].set_xlabel(f"{cell}: seconds since the cell started")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def draw_all(runs: list[Any], cells: list[Any], rows: list[dict[str, Any]], out: Path) -> list[tuple[str, str]]:
    """Every figure; returns (title, file name) pairs for the report."""
    figures = []
    loaded = [cell for cell in cells if cell.kind != "uncontended"]
    for trace in dict.fromkeys(cell.trace for cell in loaded if cell.kind == "open"):
        name = f"latency_vs_load_{trace}.png"
        draw_latency_vs_load(rows, trace, out / name)
        figures.append((f"{trace}: latency and SLO margin vs load (goodput curves)", name))
    for cell in loaded:
        name = f"cdf_{file_name(cell.name)}.png"
        draw_cdfs(runs, cell.name, out / name)
        figures.append((f"{cell.name}: CDFs of TTFT and TBT", name))
    # The timeline of each trace's heaviest cell (and of the closed-loop anchor), where queues show.
    heaviest = {}
    for cell in loaded:
        if cell.trace not in heaviest or len(cell.requests) > len(heaviest[cell.trace].requests):
            heaviest[cell.trace] = cell
    for cell in heaviest.values():
        name = f"timeline_{file_name(cell.name)}.png"
        draw_timeline(runs, cell.name, out / name)
        if (out / name).exists():
            figures.append((f"{cell.name}: requests over time, by phase and prefill replica", name))
    return figures
