"""How fast the simulator runs: SplitwiseSim's scale (1,000 machines, 1,000,000 requests) on one core.

    python -m bench.sim_scale                                  # the target: 1,000 machines, 1,000,000 requests
    python -m bench.sim_scale --machines 100 --requests 100000 --profile   # where the time goes (cProfile)
    python -m bench.sim_scale --compiled                       # the same run, compiled by mypyc (bench/sim_compile.py)

1. A Poisson trace of `--requests` requests with the conv trace's prompt and output sizes (clipped to the
   model's window), at the rate that keeps the cluster at `--load` of its prompt capacity under the profile's
   model (bench/results/profile/model.csv).
2. A disaggregated cluster of `--machines` machines (a quarter prefill), the default policy (predictive), token
   gaps not kept (only each request's first, last and count: what SplitwiseSim keeps).
3. Prints and writes (bench/results/sim/scale.json, scale.md): wall seconds, events, events per second,
   requests done, simulated seconds, the commit, which modules ran compiled; with `--profile`, the 15 functions
   that took the most time. `--compiled` runs all of it from bench.sim_compile's compiled copy of the sources.
Not a test: a benchmark that prints the time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

from bench.provenance import provenance
from bench.sim_compile import add_compiled_argument, compiled_modules, run_compiled_instead
from bench.sim.config import ClusterConfig, SimConfig
from bench.sim.model import PerfModel
from bench.sim.simulator import Simulator
from bench.traces import poisson_trace, read_trace
from bench.workloads import TRACE_FILES, TRACES_DIR

DEFAULT_PROFILE = Path(__file__).parent / "results" / "profile" / "model.csv"
DEFAULT_OUT = Path(__file__).parent / "results" / "sim"
MAX_MODEL_LEN = 2048


def scale_trace(num_requests: int, num_prefill: int, model: PerfModel, load: float, seed: int = 0):
    sizes = [request.model_copy(update={"prompt_tokens": min(request.prompt_tokens, MAX_MODEL_LEN // 2),
                                        "output_tokens": min(request.output_tokens, MAX_MODEL_LEN // 4)})
             for request in read_trace(TRACES_DIR / TRACE_FILES["conv"])]
    mean_prompt = sum(request.prompt_tokens for request in sizes) / len(sizes)
    prefill_s = model.step_s(round(mean_prompt), 0, 0)
    rate = load * num_prefill / prefill_s  # requests/s the prefill pool computes at `load` of its time
    return poisson_trace(rate_per_s=rate, num_requests=num_requests, sizes_from=sizes, seed=seed), rate


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--machines", type=int, default=1000)
    parser.add_argument("--requests", type=int, default=1_000_000)
    parser.add_argument("--load", type=float, default=0.7, help="share of the prefill pool's capacity offered")
    parser.add_argument("--policy", default="predictive")
    parser.add_argument("--profile-csv", type=Path, default=DEFAULT_PROFILE, help="bench.profile's model.csv")
    parser.add_argument("--profile", action="store_true", help="cProfile the run and print where the time goes")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    add_compiled_argument(parser)
    args = parser.parse_args(argv)
    if args.compiled:
        run_compiled_instead("bench.sim_scale", argv)
    num_prefill = max(1, args.machines // 4)
    config = SimConfig(profile=args.profile_csv, keeps_token_gaps=False, scheduling={"policy": args.policy},
                       cluster=ClusterConfig(num_prefill=num_prefill, num_decode=args.machines - num_prefill))
    model = config.perf_model()
    began = time.perf_counter()
    requests, rate = scale_trace(args.requests, num_prefill, model, args.load)
    trace_s = time.perf_counter() - began
    simulator = Simulator(config, model=model)
    profiler = cProfile.Profile() if args.profile else None
    if profiler is not None:
        profiler.enable()
    result = simulator.run(requests, is_progress_shown=True)
    if profiler is not None:
        profiler.disable()
    num_done = sum(request.done_s is not None for request in result.requests)
    facts = {"machines": args.machines, "num_prefill": num_prefill, "requests": args.requests,
             "policy": args.policy, "rate_per_s": round(rate, 3), "load": args.load,
             "wall_s": round(result.wall_s, 2), "trace_build_s": round(trace_s, 2), "num_events": result.num_events,
             "events_per_s": round(result.num_events / result.wall_s), "num_done": num_done,
             "simulated_s": round(result.simulated_s, 1), "decisions": dict(result.decisions),
             "is_profiled": profiler is not None, "compiled_modules": compiled_modules(), **provenance()}
    print(json.dumps(facts, indent=2))
    command = " ".join(["python -m bench.sim_scale", *(sys.argv[1:] if argv is None else argv),
                        *(["--compiled"] if facts["compiled_modules"] else [])])
    lines = ["# Simulator scale", "", f"`{command}`",
             f"at commit {facts['commit']}: {args.machines} machines ({num_prefill} prefill), {args.requests:,} "
             f"requests at {rate:.1f} req/s, policy {args.policy}: **{result.wall_s:.1f} s** on one core"
             f"{' (compiled: ' + ', '.join(facts['compiled_modules']) + ')' if facts['compiled_modules'] else ''} "
             f"({result.num_events:,} events, {facts['events_per_s']:,}/s; {num_done:,} requests done in "
             f"{result.simulated_s:,.0f} simulated s).", ""]
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(15)
        print(text.getvalue())
        lines += ["Where the time goes (cProfile, own time; profiling slows the run):", "", "```",
                  *text.getvalue().strip().splitlines()[-20:], "```"]
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_profiled" if profiler is not None else ""
    (args.out / f"scale{suffix}.json").write_text(json.dumps(facts, indent=2))
    (args.out / f"scale{suffix}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
