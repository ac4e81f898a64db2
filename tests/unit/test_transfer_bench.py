"""The transfer microbenchmark runs every path and writes its files, transfer.csv and report.md (a 1 MB smoke run,
not a measurement)."""

from __future__ import annotations

import csv
import subprocess
import sys

from bench.processes import PROJECT_ROOT


def test_transfer_bench_writes_csv_and_table(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "bench.transfer_bench", "--sizes-mb", "1", "--repeats", "1", "--cold-object-store", "--out", str(tmp_path)],
        cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "transfer.csv")))
    assert [row["path"] for row in rows] == ["memcpy", "object_store", "object_store_one_send", "nixl"]
    assert all(float(row["gb_per_s"]) > 0 for row in rows)
    assert float(rows[0]["ratio_to_memcpy"]) == 1.0
    assert "| 1 MB | object_store |" in (tmp_path / "report.md").read_text()
