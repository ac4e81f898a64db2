"""Where a host's CPU goes while a command runs: every process's CPU time, sampled, summed by what the process is.

    python -m bench.process_cpu --out bench/results/x/cpu -- python -m bench.compare --systems splitserve-nixl ...

1. Every `--every-s` seconds (5) a sample of every process on the host: its user + system CPU seconds from
   /proc/<pid>/stat, and what it is (`name`: the command line's first words for Python and Ray processes, which
   all share one `comm`, a Ray actor's without the method it runs now, which Ray writes into its title; `comm`
   otherwise: vLLM's `VLLM::Worker`, `VLLM::EngineCore`, `raylet`, ...).
2. The command runs meanwhile, its output passed through; when it ends, the last sample is taken.
3. The window: the `--window-s` seconds (85, a loaded cell of bench.compare) in which the host used the most CPU,
   i.e. the one under the most load. CPU seconds per name over it, against the window's capacity (its seconds
   times the cores), into cpu.csv and cpu.md (the command, the commit, the window); samples.jsonl.gz keeps every
   sample, run.json the command and its commit (`--report-only` reports from them again).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.provenance import provenance

TICKS_PER_S = os.sysconf("SC_CLK_TCK")
NAME_WORDS = 70  # characters of a Python or Ray process's command line that name it


def sample() -> dict[str, tuple[str, float]]:
    """1. pid -> (what the process is, its CPU seconds so far)."""
    found: dict[str, tuple[str, float]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone since the listing
            continue
        comm = stat[stat.index("(") + 1: stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        cpu_s = (int(fields[11]) + int(fields[12])) / TICKS_PER_S
        found[pid] = (process_name(comm, command), cpu_s)
    return found


def process_name(comm: str, command: str) -> str:
    is_python = "python" in comm or command.startswith("ray::")
    return without_method(command.strip()[:NAME_WORDS] if is_python else comm)


def without_method(name: str) -> str:
    """A Ray actor's name without the method Ray wrote into its title ("ray::ServeReplica:app:Router.handle_request"
    while it runs that one), so that one process keeps one name."""
    return name.split()[0].split(".")[0] if name.startswith("ray::") else name


def used(first: dict[str, Any], last: dict[str, Any]) -> dict[str, float]:
    """CPU seconds per name (the later one: vLLM's processes rename themselves once started) between two samples;
    a process born between them counts from zero (as does a pid reused by one with less CPU time)."""
    by_name: dict[str, float] = defaultdict(float)
    for pid, (name, cpu_s) in last["processes"].items():
        earlier = first["processes"].get(pid)
        by_name[name] += cpu_s - (earlier[1] if earlier and earlier[1] <= cpu_s else 0.0)
    return dict(by_name)


def busiest_window(samples: list[dict[str, Any]], window_s: float) -> tuple[int, int] | None:
    """3. (first, last) sample indices spanning at least `window_s` with the most CPU used; None if the run was
    shorter."""
    best: tuple[float, int, int] | None = None
    for first in range(len(samples)):
        last = next((index for index in range(first + 1, len(samples))
                     if samples[index]["t"] - samples[first]["t"] >= window_s), None)
        if last is None:
            break
        total = sum(used(samples[first], samples[last]).values())
        if best is None or total > best[0]:
            best = (total, first, last)
    return None if best is None else (best[1], best[2])


def report_lines(samples: list[dict[str, Any]], window: tuple[int, int], run: dict[str, Any],
                 num_shown: int = 15) -> tuple[list[str], list[dict[str, Any]]]:
    first, last = samples[window[0]], samples[window[1]]
    seconds = last["t"] - first["t"]
    num_cores = run.get("num_cores") or os.cpu_count() or 1  # the measured host's (runs before it was kept: this)
    capacity = seconds * num_cores
    rows = [{"name": name, "cpu_s": round(cpu_s, 2), "share_of_host": round(cpu_s / capacity, 4)}
            for name, cpu_s in sorted(used(first, last).items(), key=lambda item: -item[1]) if cpu_s > 0]
    lines = ["# Where the host's CPU went", "",
             f"`python -m bench.process_cpu -- {' '.join(run['command'])}` at commit {run['commit']}, "
             f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(samples[0]['t']))} UTC: the busiest "
             f"{seconds:.1f} s ({sum(row['cpu_s'] for row in rows):.1f} of {capacity:.1f} CPU-seconds on "
             f"{num_cores} cores), the processes that used most of it:", "",
             "| process | CPU s | share of the host |", "| --- | --- | --- |"]
    lines += [f"| `{row['name']}` | {row['cpu_s']:.1f} | {row['share_of_host']:.1%} |" for row in rows[:num_shown]]
    lines += ["", "Every process is in [cpu.csv](cpu.csv), every sample in samples.jsonl.gz."]
    return lines, rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--every-s", type=float, default=5.0)
    parser.add_argument("--window-s", type=float, default=85.0)
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: report again from --out's samples.jsonl.gz and run.json")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="after --: the command to run while sampling")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.report_only:
        with gzip.open(args.out / "samples.jsonl.gz", "rt") as handle:
            samples = [json.loads(line) for line in handle]
        write_report(args, samples, json.loads((args.out / "run.json").read_text()))
        return
    if not command:
        parser.error("give the command to run after --")
    args.out.mkdir(parents=True, exist_ok=True)
    run = {"command": command, "num_cores": os.cpu_count(), **provenance()}  # what ran, where, at which commit
    (args.out / "run.json").write_text(json.dumps(run, indent=2))
    samples: list[dict[str, Any]] = []
    done = threading.Event()

    def take() -> None:  # 1., until the command is over
        while True:
            samples.append({"t": time.time(), "processes": sample()})
            if done.wait(args.every_s):
                samples.append({"t": time.time(), "processes": sample()})
                return

    sampler = threading.Thread(target=take, daemon=True)
    sampler.start()
    status = subprocess.run(command).returncode  # 2.
    done.set()
    sampler.join()
    with gzip.open(args.out / "samples.jsonl.gz", "wt") as handle:
        handle.writelines(json.dumps(one) + "\n" for one in samples)
    write_report(args, samples, run)
    raise SystemExit(status)


def write_report(args: argparse.Namespace, samples: list[dict[str, Any]], run: dict[str, Any]) -> None:
    for one in samples:  # samples taken before names dropped the method, named as now
        one["processes"] = {pid: (without_method(name), cpu_s) for pid, (name, cpu_s) in one["processes"].items()}
    window = busiest_window(samples, args.window_s)
    if window is None:
        raise SystemExit(f"the command ran under --window-s ({args.window_s:g} s): nothing to report")
    lines, rows = report_lines(samples, window, run)
    with open(args.out / "cpu.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["name", "cpu_s", "share_of_host"])
        writer.writeheader()
        writer.writerows(rows)
    (args.out / "cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
