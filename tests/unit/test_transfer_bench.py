"""The transfer microbenchmark: its pieces (cache flush, NIXL descriptors, the two NIXL sides, the row statistics
and the table), and a 1 MB smoke run of every path that writes transfer.csv and report.md (not a measurement)."""

from __future__ import annotations

import csv
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

from bench import transfer_bench
from bench.processes import PROJECT_ROOT

HAS_NIXL = importlib.util.find_spec("nixl") is not None
needs_nixl = pytest.mark.skipif(not HAS_NIXL, reason="NIXL is not installed")


def test_last_level_cache_is_found_and_the_flusher_reads_twice_its_size():
    assert transfer_bench.last_level_cache_bytes() >= 1 << 20
    flush = transfer_bench.CacheFlusher(cache_bytes=4 << 20)
    assert flush._lines.size == (8 << 20) // transfer_bench.CACHE_LINE_BYTES
    flush()


def test_memcpy_times_every_repeat_and_flushes_before_each():
    flushes = []
    seconds = transfer_bench.measure_memcpy(1 << 20, 7, lambda: flushes.append(1))
    assert len(seconds) == 7 and len(flushes) == 7 and all(s > 0 for s in seconds)


def test_block_descriptors_cut_each_layer_into_blocks_with_a_shorter_last_one():
    block = transfer_bench.NIXL_BLOCK_BYTES
    rows = transfer_bench.block_descriptors([1_000_000, 9_000_000], 2 * block + 10)
    assert rows.dtype == np.uint64 and rows.shape == (6, 3)
    assert rows[:, 0].tolist() == [1_000_000, 1_000_000 + block, 1_000_000 + 2 * block,
                                   9_000_000, 9_000_000 + block, 9_000_000 + 2 * block]
    assert rows[:, 1].tolist() == [block, block, 10] * 2
    assert rows[:, 2].tolist() == [0] * 6  # DRAM is device 0


def test_block_descriptors_follow_the_block_size_asked_for():
    block = 512 * transfer_bench.KV_BYTES_PER_TOKEN_PER_LAYER
    rows = transfer_bench.block_descriptors([4096], 3 * block, block)
    assert rows[:, 0].tolist() == [4096, 4096 + block, 4096 + 2 * block] and rows[:, 1].tolist() == [block] * 3


@needs_nixl
def test_other_blocks_add_their_own_nixl_and_kernel_rows():
    measures = transfer_bench.paths(block_tokens=[512])
    assert list(measures)[-3:] == ["kernel_read", "nixl_block512", "kernel_read_block512"]
    assert measures["nixl_block512"].keywords["block_bytes"] == 512 * 3 * 64 * 4


def test_an_unknown_path_is_refused_with_the_known_ones_named():
    refused = subprocess.run([sys.executable, "-m", "bench.transfer_bench", "--paths", "nixl_fast"],
                             cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 2 and "nixl_fast" in refused.stderr and "object_store_one_send" in refused.stderr


def test_summary_row_has_percentiles_and_a_ratio_interval_around_it():
    memcpy = [0.001 * (1 + i / 100) for i in range(51)]
    row = transfer_bench.summarize(1, "slow", 1 << 20, [0.004, 0.002, 0.003, 0.005, 0.001], memcpy)
    assert (row["p10_ms"], row["median_ms"], row["p90_ms"]) == (1.4, 3.0, 4.6)
    assert row["ratio_low"] <= row["ratio_to_memcpy"] <= row["ratio_high"]
    assert row["ratio_to_memcpy"] == round(np.median(memcpy) / 0.003, 3)
    assert transfer_bench.summarize(1, "memcpy", 1 << 20, memcpy, memcpy)["ratio_to_memcpy"] == 1.0
    line = transfer_bench.markdown_table([row])[2]
    assert line.startswith("| 1 MB | slow | 5 | 3.0 (1.4-4.6) |") and f"({row['ratio_low']}-" in line


@needs_nixl
def test_nixl_reader_reads_the_source_layers_and_the_source_sees_each_read():
    """Both sides in this process (the smoke run below has prefill's in another)."""
    source = transfer_bench.NixlSource(transfer_bench.NIXL_BLOCK_BYTES + 100)
    reader = transfer_bench.NixlReader(source.handshake())
    seen = []
    try:
        assert reader.read(b"one", poll_source=lambda: seen.append(source.poll_notifications())) > 0
        reader.check_layers()
        deadline_polls = 1000
        while sum(seen) < 1 and deadline_polls:
            seen.append(source.poll_notifications())
            deadline_polls -= 1
        assert sum(seen) == 1
        reader.layers[3][0] ^= 0xFF
        with pytest.raises(RuntimeError, match="layer 3"):
            reader.check_layers()
    finally:
        reader.close()
        source.close()


def test_transfer_bench_writes_csv_and_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.transfer_bench", "--sizes-mb", "1", "--repeats", "2", "--memcpy-repeats", "3",
         "--cold-object-store", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "transfer.csv")))
    # kernel_read*: nixl's blocks read by the kernel from the source's process, the bytes checked (check_layers).
    nixl_paths = ["nixl", "nixl_polled_source", "nixl_one_process", "kernel_read"] if HAS_NIXL else []
    if HAS_NIXL and "kernel_read skipped" in result.stderr:  # a host that forbids process_vm_readv says so
        nixl_paths.remove("kernel_read")
    assert [row["path"] for row in rows] == ["memcpy", "object_store", "object_store_one_send",
                                             "object_store_one_send_handoff", "object_store_claimed", *nixl_paths]
    assert [row["repeats"] for row in rows] == ["3"] + ["2"] * (len(rows) - 1)
    assert all(float(row["gb_per_s"]) > 0 for row in rows)
    assert all(float(row["p10_ms"]) <= float(row["median_ms"]) <= float(row["p90_ms"]) for row in rows)
    assert float(rows[0]["ratio_to_memcpy"]) == 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| 1 MB | object_store | 2 |" in report
    assert "python -m bench.transfer_bench" in report and "commit " in report


def test_the_cross_node_rows_run_on_a_second_ray_node_of_this_host(tmp_path):
    # Only the cross-node rows (the smoke run above has the others): two Ray nodes are slow enough to start.
    cross = ["object_store_cross_node", "tcp_cross_node", *(["nixl_cross_node"] if HAS_NIXL else [])]
    bench = subprocess.Popen(
        [sys.executable, "-m", "bench.transfer_bench", "--sizes-mb", "1", "--repeats", "2", "--memcpy-repeats", "3",
         "--cold-object-store", "--cross-node", "--paths", *cross, "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        _, stderr = bench.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        bench.terminate()  # SIGTERM: the bench stops its two Ray nodes on the way out (a kill would leave them)
        _, stderr = bench.communicate(timeout=120)
        pytest.fail(f"the cross-node bench did not finish in 300 s: {stderr[-3000:]}")
    assert bench.returncode == 0, stderr[-3000:]
    paths = [row["path"] for row in csv.DictReader(open(tmp_path / "transfer.csv"))]
    assert paths == ["memcpy", *cross]
    assert "127.0.0.2" in (tmp_path / "report.md").read_text()


def test_put_probe_writes_its_table(tmp_path):
    result = subprocess.run([sys.executable, "-m", "bench.put_probe", "--repeats", "1", "--out", str(tmp_path)],
                            cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "probe.csv")))
    assert [(row["case"], row["num_buffers"]) for row in rows][:3] == [("put_small", "1"), ("put_16mb", "1"),
                                                                        ("put_16mb", "30")]
    assert all(float(row["put_ms"]) > 0 and float(row["copy_ms"]) > 0 for row in rows)
    assert "python -m bench.put_probe" in (tmp_path / "report.md").read_text()
