"""bench.sim_whatif: a measured comparison's requests replayed under variants of its systems, side by side."""

from __future__ import annotations

import argparse
import copy
import csv
import json

import pytest
from pydantic import ValidationError

from bench.load_generator import RequestRecord
from bench.result_files import write_requests_csv
from bench.sim_whatif import main, parse_variant
from bench.slo import LinearFit, Reference, ReferenceFit
from bench.systems import SPLITSERVE_UPDATES, serve_config


def test_a_variant_names_a_system_and_its_scheduling_overrides():
    assert parse_variant("shipped=splitserve-predictive") == ("shipped", "splitserve-predictive", {})
    assert parse_variant("holds=splitserve-predictive:split_late_slowdown=null,tbt_mean_slowdown=1.5") == (
        "holds", "splitserve-predictive", {"split_late_slowdown": None, "tbt_mean_slowdown": 1.5})
    for bad in ("splitserve-predictive", "x=", "x=y:novalue"):
        with pytest.raises(argparse.ArgumentTypeError, match="variant|setting"):
            parse_variant(bad)


def _comparison(tmp_path):
    """A comparison of one open cell, prompts of about 300 tokens at 2.5/s with 32-token answers, recorded for
    splitserve-predictive; a profile whose prompts cost 2 ms a token on either engine."""
    compare = tmp_path / "compare"
    compare.mkdir()
    app = serve_config(**copy.deepcopy(SPLITSERVE_UPDATES["splitserve-predictive"]))
    (compare / "run.json").write_text(json.dumps({
        "measured_commit": "abc", "started_at": "then", "request_timeout_s": 60,
        "cells": [{"name": "code@2.5/s", "trace": "code", "kind": "open", "rate_per_s": 2.5}],
        "systems": [{"name": "splitserve-predictive", "config": app}]}))
    fit = ReferenceFit(num_requests=30, ttft=LinearFit(intercept_s=0.05, slope_s=0.002, floor_s=0.05,
                                                       median_abs_error=0.0),
                       tpot=LinearFit(intercept_s=0.05, slope_s=0.0, floor_s=0.05, median_abs_error=0.0))
    (compare / "reference.json").write_text(Reference(system="collocated", commit="abc",
                                                      fits={"all": fit}).model_dump_json())
    # The first 12 one at a time, from which the policy learns its rates (a prompt is timed alone), then the load.
    arrivals = [3.0 * i for i in range(12)] + [36.0 + i / 2.5 for i in range(90)]
    records = [RequestRecord(request_id=i, arrival_s=at, prompt_tokens=250 + 17 * (i % 7), output_tokens=32,
                             start_s=at, ttft_s=1.0, e2e_s=3.0, tbt_s=[0.07] * 31, workload="code@2.5/s")
               for i, at in enumerate(arrivals)]
    write_requests_csv(records, compare / "requests_splitserve-predictive.csv")
    profile = tmp_path / "model.csv"
    profile.write_text("parameter,value\nstep_s0,0.05\nprompt_token_s,0.002\ndecode_seq_s,0.002\n"
                       "handover_s0,0.01\n")
    return compare, profile


def test_every_variant_replays_the_same_requests_and_the_report_names_what_each_changed(tmp_path):
    compare, profile = _comparison(tmp_path)
    out = tmp_path / "out"
    main(["--compare", str(compare), "--profile", str(profile), "--out", str(out),
          "--variant", "shipped=splitserve-predictive",
          "--variant", "holds=splitserve-predictive:split_late_slowdown=null"])
    with open(out / "whatif.csv", newline="") as handle:
        rows = {row["variant"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"shipped", "holds"}
    assert json.loads(rows["holds"]["overrides"]) == {"split_late_slowdown": None}
    # Prefill alone cannot keep up with 2.5 prompts a second of ~300 tokens at 2 ms a token (1.6 s of work a
    # second), the two engines can: the guard that holds leaves them queued on prefill while decode streams (13% of
    # prompts on decode in this replay); the one that yields runs the prompts the queue makes late there (41%).
    assert float(rows["shipped"]["share_decode_local"]) > 2 * float(rows["holds"]["share_decode_local"])
    assert float(rows["shipped"]["ttft_p50_ms"]) < 0.5 * float(rows["holds"]["ttft_p50_ms"])
    report = (out / "whatif.md").read_text()
    assert "split_late_slowdown" in report and "| holds |" in report and "Saturation" in report


def test_a_bad_override_is_refused_with_its_name(tmp_path):
    compare, profile = _comparison(tmp_path)
    with pytest.raises(ValidationError, match="split_late_slowdown"):
        main(["--compare", str(compare), "--profile", str(profile), "--out", str(tmp_path / "out"),
              "--variant", "bad=splitserve-predictive:split_late_slowdown=0.5"])
    with pytest.raises(SystemExit, match="no system 'nope'"):
        main(["--compare", str(compare), "--profile", str(profile), "--out", str(tmp_path / "out"),
              "--variant", "x=nope"])
