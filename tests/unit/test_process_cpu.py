"""bench.process_cpu: CPU seconds per kind of process over the busiest window of a run."""

from __future__ import annotations

import os

from bench import process_cpu


def _snapshot(t: float, **processes: tuple[str, float]) -> dict:
    return {"t": t, "processes": dict(processes)}


def test_cpu_is_summed_by_name_over_the_busiest_window():
    samples = [_snapshot(0, a=("router", 1.0), b=("VLLM::Worker", 10.0)),
               _snapshot(5, a=("router", 1.5), b=("VLLM::Worker", 12.0)),
               _snapshot(10, a=("router", 2.0), b=("VLLM::Worker", 21.0), c=("router", 3.0)),  # c born in between
               _snapshot(15, a=("router", 2.1), b=("VLLM::Worker", 22.0), c=("router", 3.1))]
    assert process_cpu.used(samples[1], samples[2]) == {"router": 3.5, "VLLM::Worker": 9.0}
    # 10 s windows: 0-10 used 15.0, 5-15 used 13.7 (c counts from zero in both): the first is the busiest.
    assert process_cpu.busiest_window(samples, 10.0) == (0, 2)
    assert process_cpu.busiest_window(samples, 20.0) is None
    lines, rows = process_cpu.report_lines(samples, (0, 2), {"command": ["true"], "commit": "abc"})
    assert [row["name"] for row in rows] == ["VLLM::Worker", "router"] and rows[0]["cpu_s"] == 11.0
    assert any("`VLLM::Worker` | 11.0" in line for line in lines)


def test_a_pid_reused_by_another_process_counts_from_zero_and_a_renamed_one_from_where_it_was():
    first, last = _snapshot(0, a=("raylet", 50.0)), _snapshot(5, a=("gcs_server", 2.0))
    assert process_cpu.used(first, last) == {"gcs_server": 2.0}
    # vLLM's worker renames itself once started: its CPU before the window is not the window's.
    first, last = _snapshot(0, a=("python -c from multiprocessing.spawn", 30.0)), _snapshot(5, a=("VLLM::Worker", 34.0))
    assert process_cpu.used(first, last) == {"VLLM::Worker": 4.0}


def test_a_ray_actor_keeps_one_name_whatever_method_it_runs():
    assert process_cpu.process_name("ray::ServeRepli", "ray::ServeReplica:app:Router.handle_request_with_rejection"
                                    ) == "ray::ServeReplica:app:Router"
    assert process_cpu.without_method("ray::ServeReplica:app:Router") == "ray::ServeReplica:app:Router"
    assert process_cpu.process_name("raylet", "/path/raylet --flags") == "raylet"


def test_a_sample_holds_this_process():
    found = process_cpu.sample()
    name, cpu_s = found[str(os.getpid())]
    assert "python" in name or "pytest" in name
    assert cpu_s > 0
