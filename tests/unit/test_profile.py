"""bench.profile's arithmetic: the step fit recovers a known model, leaves out a term that would come out below 0,
and the hand-over line per backend; the simulator reads the model it writes."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from bench.profile import Step, fit_errors, fit_handovers, fit_steps, pairs
from bench.sim.model import PerfModel


def _steps(step_s0=0.02, prompt_token_s=0.0019, decode_seq_s=0.003, context_token_s=2e-6,
           decode_step_s0=0.015, prompt_pair_s=4e-7) -> list[Step]:
    steps = []
    for prompt, seqs, context in [(512, 0, 0), (2048, 0, 0), (64, 0, 0), (0, 1, 300), (0, 8, 4000), (0, 16, 9000),
                                  (256, 4, 600), (1024, 16, 2100), (0, 2, 2100), (1536, 0, 0)]:
        seconds = step_s0 + prompt_token_s * prompt + prompt_pair_s * pairs(prompt) + decode_seq_s * seqs \
            + context_token_s * context + (decode_step_s0 if seqs else 0.0)
        steps.append(Step("mixed" if prompt and seqs else "prefill" if prompt else "decode", prompt, seqs, context,
                          seconds, pairs(prompt)))
    return steps


def test_the_step_fit_recovers_a_known_model_exactly():
    fitted = fit_steps(_steps())
    assert fitted == pytest.approx({"step_s0": 0.02, "decode_step_s0": 0.015, "prompt_token_s": 0.0019,
                                    "prompt_pair_s": 4e-7, "decode_seq_s": 0.003, "context_token_s": 2e-6},
                                   rel=1e-6)
    assert all(error["median"] < 1e-6 for error in fit_errors(_steps(), fitted).values())


def test_a_term_that_would_be_negative_is_left_out():
    steps = [Step(s.kind, s.num_prompt_tokens, s.num_decode_seqs, s.num_context_tokens,
                  s.seconds - 1e-6 * s.num_context_tokens, s.num_prompt_pairs) for s in _steps(context_token_s=0.0)]
    fitted = fit_steps(steps)
    assert fitted["context_token_s"] == 0.0 and all(value >= 0 for value in fitted.values())


def test_hand_overs_are_a_line_per_backend_and_the_simulator_reads_the_model(tmp_path):
    rows = [{"backend": backend, "num_prompt_tokens": tokens, "seconds": base + per_token * tokens}
            for backend, base, per_token in (("nixl", 0.004, 1e-5), ("object_store", 0.006, 2e-5))
            for tokens in (128, 512, 2048)]
    model = fit_steps(_steps()) | fit_handovers(rows)
    assert model["handover_s0@nixl"] == pytest.approx(0.004) and model["handover_token_s@object_store"] == \
        pytest.approx(2e-5)
    path = tmp_path / "model.csv"
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["parameter", "value"])
        writer.writeheader()
        writer.writerows({"parameter": name, "value": value} for name, value in model.items())
    read = PerfModel.from_profile(path, backend="object_store")
    assert read.handover_s(1000) == pytest.approx(0.006 + 0.02) and read.step_s0 == pytest.approx(0.02)
    assert read.step_s(0, 1, 0) == pytest.approx(0.02 + 0.015 + 0.003)  # a decode step pays its own floor
    # A 1,000-token prompt: its tokens and its 500,500 attention pairs.
    assert read.step_s(1000, 0, 0, pairs(1000)) == pytest.approx(0.02 + 1.9 + 4e-7 * 500_500)


def test_served_steps_are_read_back_from_the_cores_outputs():
    from bench.profile import ServedSteps

    served = ServedSteps()
    served.sent("a", 100, at=0.0)
    served.ran(0.20, [("a", 1, False)])  # a's prompt, from when it was sent (the core was idle)
    served.ran(0.25, [("a", 1, False)])  # a decodes: the loop went straight on from the last end
    served.sent("b", 50, at=0.26)
    served.ran(0.35, [("a", 1, False), ("b", 1, False)])  # b's prompt rides in a's decode step
    served.ran(0.40, [("a", 1, True), ("b", 1, False)])
    served.ran(0.45, [("b", 1, True)])
    served.sent("c", 100, at=1.0)  # idle in between: the next step begins when its last request was sent
    served.sent("d", 50, at=1.001)
    served.ran(1.30, [("c", 1, False), ("d", 1, True)])
    served.is_recording = False  # a warm-up: state kept, steps not
    served.ran(1.35, [("c", 1, True)])
    steps = [(step.kind, step.num_prompt_tokens, step.num_decode_seqs, step.num_context_tokens,
              round(step.seconds, 3)) for step in served.steps]
    assert steps == [("prefill", 100, 0, 0, 0.2), ("decode", 0, 1, 100, 0.05), ("mixed", 50, 1, 101, 0.1),
                     ("decode", 0, 2, 102 + 50, 0.05), ("decode", 0, 1, 51, 0.05),
                     ("batched_prefill", 150, 0, 0, 0.299)]
    assert [step.num_prompt_pairs for step in served.steps] == [5050, 0, 1275, 0, 0, 5050 + 1275]
    assert served.in_flight == set()  # every request finished


def test_the_served_paths_cost_is_what_a_client_sees_beyond_the_fitted_engine(tmp_path):
    """One request at a time through the app: a client's gap over the engine's step for the same sequence is the
    served output path's cost per token, its TTFT over the prompt's step the path's latency (medians)."""
    from bench.profile import SERVED_OUTPUT_TOKENS, fit_served, fitted_s

    model = fit_steps(_steps())
    rows = []
    for n, token_extra, request_extra in ((128, 0.006, 0.030), (512, 0.005, 0.020), (1024, 0.007, 0.025)):
        engine_gaps = [fitted_s(model, Step("decode", 0, 1, n + i, 0.0)) for i in range(1, SERVED_OUTPUT_TOKENS)]
        rows.append({"num_prompt_tokens": n, "num_output_tokens": SERVED_OUTPUT_TOKENS,
                     "ttft_s": fitted_s(model, Step("prefill", n, 0, 0, 0.0, pairs(n))) + request_extra,
                     "mean_gap_s": sum(engine_gaps) / len(engine_gaps) + token_extra})
    assert fit_served(rows, model) == pytest.approx({"served_token_s": 0.006, "served_request_s": 0.025})
    assert fit_served([], model) == {}
    # Two at a time, one stream per engine: their gaps 20% over the one-at-a-time gap of the same prompt size.
    rows += [{**rows[0], "concurrency": 2, "mean_gap_s": rows[0]["mean_gap_s"] * 1.2} for _ in range(3)]
    served = fit_served(rows, model)
    assert served == pytest.approx({"served_token_s": 0.006, "served_request_s": 0.025,
                                    "shared_host_slowdown": 0.2})
    # The simulator's step pays it per sequence it extends; a prompt alone does not.
    read = PerfModel(**{**model, **served})
    assert read.step_s(0, 4, 0) - PerfModel(**model).step_s(0, 4, 0) == pytest.approx(4 * 0.006)
    assert read.step_s(512, 0, 0) == pytest.approx(PerfModel(**model).step_s(512, 0, 0))


def test_a_split_served_one_at_a_time_gives_what_the_split_path_adds_beyond_its_engine_parts():
    """The split app's TTFT over the prompt's step, the NIXL hand-over, decode's step and the served path's terms
    is `served_split_s` (median); the router's phases place it before and after prefill's answer."""
    from bench.profile import SERVED_OUTPUT_TOKENS, fit_served, fitted_s, split_breakdown, split_parts_s

    model = fit_steps(_steps()) | {"handover_s0@nixl": 0.004, "handover_token_s@nixl": 1e-5}
    collocated = [{"system": "collocated", "concurrency": 1, "num_prompt_tokens": n,
                   "num_output_tokens": SERVED_OUTPUT_TOKENS,
                   "ttft_s": fitted_s(model, Step("prefill", n, 0, 0, 0.0, pairs(n))) + 0.025,
                   "mean_gap_s": float(np.mean([fitted_s(model, Step("decode", 0, 1, n + i, 0.0))
                                                for i in range(1, SERVED_OUTPUT_TOKENS)])) + 0.006}
                  for n in (128, 512, 1024)]
    served = fit_served(collocated, model)
    assert "served_split_s" not in served
    split = []
    for n, before, after in ((128, 0.010, 0.030), (512, 0.012, 0.028), (1024, 0.011, 0.034)):
        parts = split_parts_s(model | served, n)
        # The router's phases: prefill's answer `before` beyond its step, decode's first chunk `after` beyond
        # the hand-over and its step; the client sees the served path's latency beside them.
        split.append({"system": "split", "concurrency": 1, "num_prompt_tokens": n,
                      "num_output_tokens": SERVED_OUTPUT_TOKENS, "ttft_s": parts["total"] + before + after,
                      "mean_gap_s": 0.06, "prefill_s": parts["prefill"] + before,
                      "first_chunk_s": parts["handover"] + parts["decode_step"] + after})
    fitted = fit_served(collocated + split, model)
    # Medians (0.040, 0.040, 0.045); the split rows change nothing else.
    assert fitted == pytest.approx(served | {"served_split_s": 0.040})
    breakdown = split_breakdown(collocated + split, model | fitted)
    assert breakdown["prefill_extra_s"] == pytest.approx(0.011) and breakdown["decode_extra_s"] == pytest.approx(0.030)
    assert breakdown["num_requests"] == 3
    assert PerfModel.from_fitted(model | fitted).split_handover_s(1000) == pytest.approx(0.004 + 0.01 + 0.040)
    assert split_breakdown(collocated, model) == {}


def _decode_steps(offsets: dict[int, float], num_each: int = 6) -> list[Step]:
    """Pure decode steps of the _steps() engine at several contexts, each batch size `offsets[b]` off its line (on
    this host's CPU 2 sequences step slower than 1 or 3: bench/results/profile)."""
    steps = []
    for size, offset in offsets.items():
        for index in range(num_each):
            context = size * (128 + 40 * index)
            seconds = 0.02 + 0.015 + 0.003 * size + 2e-6 * context + offset
            steps.append(Step("decode", 0, size, context, seconds, 0))
    return steps


def test_pure_decode_steps_get_a_table_per_batch_size_over_the_line():
    from bench.profile import fit_decode_batches, fitted_s

    offsets = {1: 0.002, 2: 0.008, 4: -0.006, 8: 0.0}
    steps = _steps() + _decode_steps(offsets) + _decode_steps({6: 0.05}, num_each=2)  # 6: too few for its own
    line = fit_steps(steps)
    table = fit_decode_batches(steps, line)
    assert sorted(table) == sorted(f"decode_batch_s@{size}" for size in range(1, 9))  # up to the largest measured
    model = line | table
    # Each measured size's steps fit better than by the line alone; 3 lies between 2 and 4, 6 between 4 and 8.
    for size in (1, 2, 4, 8):
        mine = [step for step in steps if step.kind == "decode" and step.num_decode_seqs == size]
        with_table = sorted(abs(fitted_s(model, step) - step.seconds) for step in mine)[len(mine) // 2]
        line_only = sorted(abs(fitted_s(line, step) - step.seconds) for step in mine)[len(mine) // 2]
        assert with_table <= line_only and with_table < 1.5e-3, size
    assert table["decode_batch_s@3"] == pytest.approx((table["decode_batch_s@2"] + table["decode_batch_s@4"]) / 2)
    assert table["decode_batch_s@6"] == pytest.approx((table["decode_batch_s@4"] + table["decode_batch_s@8"]) / 2)
    # Steps that compute prompt tokens keep the line: their matrices are as tall as their tokens.
    mixed = Step("mixed", 256, 2, 600, 0.0, pairs(256))
    assert fitted_s(model, mixed) == pytest.approx(fitted_s(line, mixed))
    # The simulator reads the same table and applies the same rule; past the table, its last entry.
    read = PerfModel.from_fitted(model)
    for step in (Step("decode", 0, 2, 300, 0.0), Step("decode", 0, 12, 3000, 0.0), mixed,
                 Step("prefill", 512, 0, 0, 0.0, pairs(512))):
        assert read.step_s(step.num_prompt_tokens, step.num_decode_seqs, step.num_context_tokens,
                           step.num_prompt_pairs) == pytest.approx(fitted_s(model, step))
    assert read.step_s(0, 12, 0) - PerfModel.from_fitted(line).step_s(0, 12, 0) == \
        pytest.approx(table["decode_batch_s@8"])
    with pytest.raises(ValueError, match="every batch size"):
        PerfModel.from_fitted({**line, "decode_batch_s@1": 0.0, "decode_batch_s@3": 0.0})


def test_a_refit_fits_the_committed_measurements_again_and_says_so(tmp_path):
    from bench.profile import STEP_FIELDS, _write_csv, read_measurements, refit

    steps = _steps() + _decode_steps({1: 0.002, 2: 0.008, 4: -0.006})
    _write_csv([step.__dict__ for step in steps], STEP_FIELDS, tmp_path / "steps.csv")
    _write_csv([{"backend": "nixl", "num_prompt_tokens": tokens, "num_bytes": tokens * 10,
                 "seconds": 0.004 + 1e-5 * tokens} for tokens in (128, 512, 2048)],
               ("backend", "num_prompt_tokens", "num_bytes", "seconds"), tmp_path / "transfers.csv")
    measured = {"started_at": "2026-12-06 00:43:21", "wall_s": 540.0, "commit": "67c255e", "is_dirty": False,
                "host": {"cpu": "AMD EPYC"}, "num_steps": len(steps), "num_handovers": 3, "num_served": 0,
                "model": {"step_s0": 1.0}}
    (tmp_path / "run.json").write_text(json.dumps(measured))

    refit(tmp_path, ["python -m bench.profile", "--refit", "--out", str(tmp_path)])

    assert read_measurements(tmp_path)[0] == steps  # the measurements are untouched
    model = PerfModel.from_profile(tmp_path / "model.csv")
    assert len(model.decode_batch_s) == 4 and model.handover_s(1000) == pytest.approx(0.004 + 0.01)
    after = json.loads((tmp_path / "run.json").read_text())
    assert {key: after[key] for key in ("started_at", "commit", "host")} == \
        {key: measured[key] for key in ("started_at", "commit", "host")}  # when and where they were measured
    assert after["model"]["step_s0"] == pytest.approx(model.step_s0) != 1.0  # this fit, not the one before
    assert after["refit"]["command"].endswith(str(tmp_path))
    report = (tmp_path / "report.md").read_text()
    assert "at commit 67c255e" in report and "Refitted" in report and "decode_batch_s@b" in report
