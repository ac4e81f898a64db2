"""The Azure traces are vendored in bench/data/azure_traces: whole, readable, and with their attribution."""

from __future__ import annotations

import pytest

from bench.processes import PROJECT_ROOT
from bench.traces import read_trace
from bench.workloads import TRACE_FILES, TRACES_DIR

NUM_ROWS = {"code": 8819, "conv": 19366}  # as the source's README lists them


def test_the_traces_dir_is_the_vendored_folder_in_the_project():
    assert TRACES_DIR == PROJECT_ROOT / "bench" / "data" / "azure_traces"
    assert set(TRACE_FILES.values()) == {path.name for path in TRACES_DIR.glob("*.csv")}


@pytest.mark.parametrize("name", list(NUM_ROWS))
def test_each_vendored_trace_reads_whole(name):
    trace = read_trace(TRACES_DIR / TRACE_FILES[name])
    assert len(trace) == NUM_ROWS[name]
    assert trace[0].arrival_s == 0.0 and trace[-1].arrival_s > 0


def test_the_conversation_trace_has_the_documented_median_prompt():
    conv = read_trace(TRACES_DIR / TRACE_FILES["conv"])
    assert sorted(request.prompt_tokens for request in conv)[len(conv) // 2] == 1020


def test_the_readme_keeps_the_attribution_and_license():
    readme = (TRACES_DIR / "README.md").read_text()
    for required in ("Azure Public Dataset", "Azure/AzurePublicDataset", "790921015d50dd6aae7f7e47f39ba0e235ad6b08",
                     "data/AzureLLMInferenceTrace_code.csv", "data/AzureLLMInferenceTrace_conv.csv",
                     "CC-BY-4.0", "https://creativecommons.org/licenses/by/4.0/", "unchanged copies"):
        assert required in readme, required
