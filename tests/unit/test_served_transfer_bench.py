"""The served-app transfer benchmark's arithmetic: medians, ratios to the collocated baseline, transfer share."""

from __future__ import annotations

import csv

from bench.served_transfer_bench import _arrivals, _summary


def test_summary_puts_each_system_next_to_the_collocated_baseline():
    rows = {
        "collocated": [{"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 1.3},
                       {"prompt_tokens": 1000, "ttft_s": 3.0, "second_token_s": 0.04, "e2e_s": 3.3}],
        "object_store": [{"prompt_tokens": 1000, "ttft_s": 2.2, "second_token_s": 0.03, "e2e_s": 2.5,
                          "transfer_s": 0.025, "num_kv_bytes": 40e6},
                         {"prompt_tokens": 1000, "ttft_s": 2.2, "second_token_s": 0.03, "e2e_s": 2.5,
                          "transfer_s": 0.05, "num_kv_bytes": 40e6}],
    }
    baseline, split = _summary(rows)
    intervals = {key: baseline.pop(key) for key in list(baseline) if key.endswith("_95")}
    assert baseline == {"system": "collocated", "num_requests": 2, "prompt_tokens": 1000, "ttft_ms": 2000.0,
                        "ttft_vs_collocated": 1.0, "second_token_ms": 30.0, "second_token_vs_collocated": 1.0,
                        "e2e_ms": 2300.0, "e2e_vs_collocated": 1.0}
    assert set(intervals) == {"ttft_vs_collocated_95", "second_token_vs_collocated_95", "e2e_vs_collocated_95"}
    assert split["ttft_vs_collocated"] == 1.1 and split["second_token_vs_collocated"] == 1.0
    # Two baseline requests of 1 s and 3 s: a resampled median is 1, 2 or 3 s, so the interval spans 2.2/3-2.2/1.
    assert split["ttft_vs_collocated_95"] == "0.733-2.200"
    assert split["transfer_ms"] == 37.5
    assert split["transfer_share_of_e2e"] == 0.015  # median of 0.01 and 0.02
    assert split["kv_mb"] == 40.0


def test_arrivals_are_one_at_a_time_or_a_seeded_poisson_process():
    assert _arrivals(5, None) == []
    times = _arrivals(2000, 0.5)
    assert times == _arrivals(2000, 0.5) and times[0] == 0.0 and times == sorted(times)
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert 1.9 < sum(gaps) / len(gaps) < 2.1  # mean gap 1/rate


def test_under_load_the_share_is_mean_over_mean_and_each_load_keeps_its_tail():
    rows = {
        "collocated": [{"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 2.0}] * 2,
        "nixl": [{"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 1.0, "first_chunk_s": 0.1,
                  "transfer_s": 0.01, "num_kv_bytes": 1e6},
                 {"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 3.0, "first_chunk_s": 0.3,
                  "transfer_s": 0.03, "num_kv_bytes": 1e6}],
    }
    _, split = _summary(rows, {"collocated": [], "nixl": [0.01] * 9 + [0.1]}, is_loaded=True)
    assert split["transfer_share_of_e2e"] == 0.01  # 0.02 s mean over 2 s mean (the per-request median: 0.01)
    assert (split["first_chunk_p50_ms"], split["first_chunk_p90_ms"]) == (200.0, 280.0)
    assert split["load_p50_ms"] == 10.0 and split["load_p90_ms"] == 19.0  # numpy's interpolated p90


def test_with_serve_path_each_system_is_also_put_next_to_the_same_app_without_a_hand_over():
    from bench.served_transfer_bench import _summary

    row = {"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 1.3}
    rows = {"collocated": [row] * 3, "serve_path": [{**row, "second_token_s": 0.025}] * 3,
            "nixl": [{**row, "second_token_s": 0.03}] * 3}
    collocated, serve_path, nixl = _summary(rows)
    assert "second_token_vs_serve_path" not in collocated  # the plain engine is not measured against Serve's path
    assert serve_path["second_token_vs_collocated"] == 1.25 and serve_path["second_token_vs_serve_path"] == 1.0
    assert nixl["second_token_vs_collocated"] == 1.5 and nixl["second_token_vs_serve_path"] == 1.2
    assert nixl["second_token_vs_serve_path_95"] == "1.200-1.200"


def test_the_engine_step_is_the_time_between_two_decode_steps_and_reaches_the_summary(tmp_path):
    from bench.served_transfer_bench import _summary, generation_step_seconds
    from deployments.step_trace import COLUMNS

    def step(wall_s, num_prompts_finished, num_generation_tokens):
        return f"{wall_s}\t{num_prompts_finished}\t0\t{num_generation_tokens}\t1\t0\t0.1\t0"

    trace = tmp_path / "decode-x.steps.tsv"
    trace.write_text("\n".join(["\t".join(COLUMNS),
                                step(10.0, 0, 0),     # idle polling while the KV loads: not a decode step
                                step(10.5, 1, 1),     # the first token (a prompt finished): its gap not counted
                                step(10.56, 0, 1),    # decode steps, 60 then 70 ms apart
                                step(10.63, 0, 1),
                                step(11.0, 0, 0),     # idle
                                step(12.0, 0, 1)]) + "\n")  # after an idle step: no previous decode step
    assert [round(seconds, 3) for seconds in generation_step_seconds(trace)] == [0.06, 0.07]

    row = {"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.02, "e2e_s": 1.3}
    (entry,) = _summary({"nixl": [row]}, decode_steps_by_system={"nixl": [0.06, 0.07]})
    assert entry["engine_step_p50_ms"] == 65.0 and entry["engine_step_p90_ms"] == 69.0


def test_the_second_tokens_step_follows_the_step_that_finished_the_prompt_or_load(tmp_path):
    from bench.served_transfer_bench import _summary, second_token_step_seconds
    from deployments.step_trace import COLUMNS

    def step(wall_s, num_prompts_finished, num_generation_tokens):
        return f"{wall_s}\t{num_prompts_finished}\t0\t{num_generation_tokens}\t1\t0\t0.1\t0"

    trace = tmp_path / "decode-x.steps.tsv"
    trace.write_text("\n".join(["\t".join(COLUMNS),
                                step(10.0, 0, 0),     # the KV loading
                                step(10.5, 1, 1),     # first token: the load finished
                                step(10.562, 0, 1),   # second token: 62 ms later
                                step(10.617, 0, 1),   # a steady step: not a second token
                                step(11.0, 0, 0),     # idle
                                step(12.0, 1, 1),     # another request's first token...
                                step(12.05, 1, 1),    # ...followed by a third's: no second token for it
                                step(12.11, 0, 1)]) + "\n")  # the third's second token: 60 ms
    assert [round(seconds, 3) for seconds in second_token_step_seconds(trace)] == [0.062, 0.06]

    row = {"prompt_tokens": 1000, "ttft_s": 1.0, "second_token_s": 0.07, "e2e_s": 1.3}
    (entry,) = _summary({"nixl": [row]}, second_token_steps_by_system={"nixl": [0.062, 0.06]})
    assert entry["second_token_step_p50_ms"] == 61.0


def test_second_token_steps_reads_a_runs_traces_and_leaves_the_warm_ups_out(tmp_path):
    from bench import second_token_steps
    from deployments.step_trace import COLUMNS

    def step(wall_s, num_prompts_finished, num_generation_tokens):
        return f"{wall_s}\t{num_prompts_finished}\t0\t{num_generation_tokens}\t1\t0\t0.1\t0"

    lines, wall_s = ["\t".join(COLUMNS)], 0.0
    for second_token_s in (0.2, 0.2, 0.06, 0.06, 0.06):  # two warm-ups (slow), then three measured requests
        wall_s += 1.0
        lines += [step(wall_s, 1, 1), step(wall_s + second_token_s, 0, 1), step(wall_s + second_token_s + 0.05, 0, 1),
                  step(wall_s + second_token_s + 0.1, 0, 1)]
    (tmp_path / "run" / "steps" / "nixl").mkdir(parents=True)
    (tmp_path / "run" / "steps" / "nixl" / "decode-d.steps.tsv").write_text("\n".join(lines) + "\n")
    (tmp_path / "run" / "steps" / "nixl" / "prefill-p.steps.tsv").write_text("\t".join(COLUMNS) + "\n")
    second_token_steps.main([str(tmp_path / "run"), "--out", str(tmp_path / "out")])
    (row,) = list(csv.DictReader(open(tmp_path / "out" / "second_token_steps.csv")))
    assert (row["system"], row["num_requests"], row["steady_step_p50_ms"], row["second_token_step_p50_ms"]) == \
        ("nixl", "3", "50.0", "60.0")
    assert float(row["ratio"]) == 1.2
