"""bench.call_overhead's arithmetic: engine calls from the Serve replicas' logs, prompt outputs from the step
traces, each call matched to the output inside it, and the report beside the profile's steps."""

from __future__ import annotations

import datetime

import pytest

from bench.call_overhead import engine_calls, match, profile_steps, prompt_outputs, report_lines


def _log_time(epoch_s: float) -> str:
    return datetime.datetime.fromtimestamp(epoch_s).strftime("%Y-%m-%d %H:%M:%S,%f")[:-3]


def test_a_call_is_split_at_its_prompts_output(tmp_path):
    base = 1_800_000_000.0
    log = tmp_path / "replica_splitserve_PrefillServer_x.log"
    log.write_text("\n".join([
        f"INFO {_log_time(base - 5)} splitserve_PrefillServer x 0a1b2c3d-0000-0000-0000-000000000000 -- CALL prefill "
        "OK 120.0ms",  # before the timed requests: left out
        f"INFO {_log_time(base + 1.2)} splitserve_PrefillServer x 11111111-2222-3333-4444-555555555555 -- request "
        "11111111-2222-3333-4444-555555555555: prefilled 64 tokens into 1 blocks",
        f"INFO {_log_time(base + 1.2)} splitserve_PrefillServer x 11111111-2222-3333-4444-555555555555 -- CALL prefill "
        "OK 200.0ms",
        f"INFO {_log_time(base + 3.5)} splitserve_CollocatedServer y 66666666-2222-3333-4444-555555555555 -- CALL "
        "generate OK 500.0ms"]) + "\n")
    calls = engine_calls([log], since_s=base)
    assert calls == [pytest.approx((base + 1.0, base + 1.2), abs=2e-3), pytest.approx((base + 3.0, base + 3.5),
                                                                                      abs=2e-3)]
    trace = tmp_path / "prefill-p.steps.tsv"
    trace.write_text("wall_s\tnum_prompts_finished\tnum_prompt_tokens\tnum_generation_tokens\n"
                     f"{base + 1.18}\t1\t64\t1\n{base + 1.19}\t0\t0\t0\n{base + 3.25}\t1\t256\t1\n")
    outputs = prompt_outputs([trace])
    assert outputs == pytest.approx([base + 1.18, base + 3.25])
    (first, second) = match(calls, outputs)
    assert first == pytest.approx((0.18, 0.02), abs=2e-3) and second == pytest.approx((0.25, 0.25), abs=2e-3)
    assert match([(base + 10, base + 11)], outputs) == [None]  # no output inside it


def test_the_report_sets_each_call_beside_the_profiles_step(tmp_path):
    steps = tmp_path / "steps.csv"
    steps.write_text("kind,num_prompt_tokens,num_decode_seqs,num_context_tokens,seconds,num_prompt_pairs\n"
                     "prefill,64,0,0,0.150,2080\nprefill,64,0,0,0.160,2080\nprefill,64,0,0,0.155,2080\n"
                     "decode,0,1,64,0.06,0\n")
    assert profile_steps(steps) == {64: pytest.approx(0.155)}
    assert profile_steps(tmp_path / "missing.csv") == {}
    rows = [{"system": "collocated", "num_prompt_tokens": 64, "to_prompt_output_s": value,
             "output_to_call_end_s": 0.003, "router_prefill_s": None, "router_first_chunk_s": value + 0.005}
            for value in (0.180, 0.185, 0.190)]
    meta = {"command": "python -m bench.call_overhead", "commit": "abc", "is_dirty": False, "started_at": "now",
            "host": {"cpu": "Some CPU"}, "profile": str(steps)}
    table = [line for line in report_lines(rows, profile_steps(steps), meta) if line.startswith("| collocated")]
    assert table == ["| collocated | 64 | 3 | 185.0 [181.0-189.0] | 155.0 | 30.0 [26.0-34.0] | 3.0 [3.0-3.0] | – | "
                     "190.0 [186.0-194.0] |"]
