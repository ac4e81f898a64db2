"""A decode step's matrix products by number of rows, as vLLM's CPU engine runs them: why a pure decode step on this
host is not a line in its sequences (bench/sim/model.py's `decode_batch_s`).

    python -m bench.gemm_rows                        # ~1 min; writes bench/results/gemm_rows/

1. The served model's linear layers from its config: every layer's qkv, o, gate_up and down projection and the LM
   head, each an oneDNN handler made as vLLM's `dispatch_cpu_unquantized_gemm` makes it on a CPU
   (`create_onednn_mm(weight.t(), 32)`), each with weights of its own (random, the model's dtype): as in the engine,
   a step reads them all from memory (0.54 GB in float32 for SmolLM2-135M, far past any cache).
2. One pass over all of them is one decode step's products for M rows (M sequences). One thread on the decode role's
   core, as vLLM binds it. Each round times every M from 1 to 8 once, in a shuffled order (so that drift reaches
   every M alike), `--rounds` rounds.
3. Per M: the median pass and its ratio to M = 4's with a 95% bootstrap interval (bench.bootstrap); results.json and
   README.md under --out, with the command, commit and host.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.bootstrap import ratio_interval
from bench.provenance import provenance

DEFAULT_OUT = Path(__file__).parent / "results" / "gemm_rows"
ROWS = tuple(range(1, 9))
BASE_ROWS = 4


def layer_shapes(model_path: str) -> list[tuple[str, int, int]]:
    """(name, out features, in features) of every linear layer a decode step runs, in order."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    hidden, heads = config.hidden_size, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    layer = [("qkv", (heads + 2 * kv_heads) * head_dim, hidden), ("o", hidden, heads * head_dim),
             ("gate_up", 2 * config.intermediate_size, hidden), ("down", hidden, config.intermediate_size)]
    return layer * config.num_hidden_layers + [("lm_head", config.vocab_size, hidden)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)

    import torch
    from vllm import _custom_ops as ops

    from bench.systems import app_config
    from deployments.engine import binding_cores

    config = app_config()
    cores = binding_cores(config.decode.cpu_binding_for(0))
    if cores:
        os.sched_setaffinity(0, cores)
    torch.set_num_threads(1)
    dtype = getattr(torch, config.model.dtype)
    shapes = layer_shapes(config.model.path)
    layers = [(ops.create_onednn_mm(torch.randn(out_features, in_features, dtype=dtype).t(), 32), in_features)
              for _, out_features, in_features in shapes]
    inputs = {(rows, width): torch.randn(rows, width, dtype=dtype) for rows in ROWS for _, _, width in shapes}

    def one_pass(rows: int) -> float:
        began = time.perf_counter()
        for handler, width in layers:
            ops.onednn_mm(handler, inputs[(rows, width)], None)
        return time.perf_counter() - began

    for rows in ROWS:  # each M's first pass builds its oneDNN primitive
        one_pass(rows)
    passes: dict[int, list[float]] = {rows: [] for rows in ROWS}
    shuffle = random.Random(0)
    for _ in tqdm(range(args.rounds), desc="rounds", unit="round"):
        order = list(ROWS)
        shuffle.shuffle(order)
        for rows in order:
            passes[rows].append(one_pass(rows))

    origin = provenance()
    weight_bytes = sum(out_features * in_features for _, out_features, in_features in shapes) * dtype.itemsize
    rows_out: list[dict[str, Any]] = []
    for rows in ROWS:
        ratio = ratio_interval(passes[rows], passes[BASE_ROWS])
        median = statistics.median(passes[rows])
        rows_out.append({"rows": rows, "median_ms": round(median * 1e3, 2),
                         "min_ms": round(min(passes[rows]) * 1e3, 2), "max_ms": round(max(passes[rows]) * 1e3, 2),
                         "weights_gb_per_s": round(weight_bytes / median / 1e9, 1),
                         f"ratio_to_{BASE_ROWS}_rows": round(ratio.ratio, 3), "low": round(ratio.low, 3),
                         "high": round(ratio.high, 3)})
    command = " ".join(["python -m bench.gemm_rows", *(sys.argv[1:] if argv is None else argv)])
    result = {**origin, "command": command, "model": config.model.served_name, "dtype": config.model.dtype,
              "cores": sorted(cores), "num_layers": len(shapes), "weight_bytes": weight_bytes,
              "rounds": args.rounds, "rows": rows_out, "passes_s": {str(rows): passes[rows] for rows in ROWS}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    lines = ["# A decode step's matrix products by number of rows", "",
             f"`{command}` at commit {origin['commit']}{' (dirty tree)' if origin['is_dirty'] else ''}, on "
             f"{origin['host'].get('cpu', 'an unrecorded host')}: {config.model.served_name}'s {len(shapes)} linear "
             f"layers ({weight_bytes / 1e9:.2f} GB of {config.model.dtype} weights) through vLLM's oneDNN handlers, "
             f"one thread on core {sorted(cores) or 'any'}, {args.rounds} rounds of every row count.", "",
             f"| rows (sequences) | median ms | min–max | weights read, GB/s | over {BASE_ROWS} rows [95%] |",
             "| --- | --- | --- | --- | --- |",
             *[f"| {row['rows']} | {row['median_ms']} | {row['min_ms']}–{row['max_ms']} | {row['weights_gb_per_s']} | "
               f"{row[f'ratio_to_{BASE_ROWS}_rows']:.2f} [{row['low']:.2f}–{row['high']:.2f}] |" for row in rows_out],
             "", "Every pass is in [results.json](results.json)."]
    (args.out / "README.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
