"""raw/<system>/<cell>.r<repeat>.csv and .json: what a comparison measured, one cell at a time, so that a stopped
run resumes cell by cell and a report is rebuilt from what was measured.

1. `RawCells.save` writes a cell's requests and how they were measured (the commit, the cell's digest, the
   generator's own costs) as soon as the cell ends.
2. `cells_to_run` is what a system still has to measure at this commit; a cell measured at a commit with other
   measured code, or with other requests (a changed plan under the same name), is measured again. Cells measured
   at a commit whose measured code is this one's count (a long comparison resumes after its results were
   committed, or gains systems later).
3. `measured_commit` is the commit a rebuilt report reads at; it refuses to mix code or other plans' cells.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench import plots
from bench.load_generator import GeneratorStats, RequestRecord
from bench.provenance import is_same_measured_code
from bench.result_files import read_requests_csv, write_requests_csv
from bench.workloads import Workload

if TYPE_CHECKING:  # torch is imported where the probe runs, not where raw cells are read
    from bench.host_probe import HostProbe


def cell_digest(cell: Workload) -> str:
    """What a cell sends (kind, concurrency, every request's arrival and sizes), in 16 hex digits."""
    sent = cell.model_dump_json(include={"kind", "rate_per_s", "concurrency", "requests"})
    return hashlib.sha256(sent.encode()).hexdigest()[:16]


class RawCells:
    """raw/<system>/<cell>.r<repeat>.csv and .json: one cell's requests and how they were measured.

    A cell is done when its files were measured at this commit, or at one with the same measured code
    (`is_same_measured_code`: no measured file changed between them), and sent what the plan's cell of that name
    sends (its digest): a plan changed under the same name (a rate's scaling, `--min-requests`) is measured again,
    not resumed. Files written before digests were recorded are taken by name, at their own commit only.
    """

    def __init__(self, root: Path, is_same_code: Callable[[str, str], bool] = is_same_measured_code) -> None:
        self.root = root
        self._is_same_code = is_same_code
        self._same_code: dict[tuple[str, str], bool] = {}

    def is_same_code(self, measured: str, current: str) -> bool:
        if (measured, current) not in self._same_code:
            self._same_code[measured, current] = self._is_same_code(measured, current)
        return self._same_code[measured, current]

    def _path(self, system: str, cell: str, repeat: int, suffix: str) -> Path:
        return self.root / system / f"{plots.file_name(cell)}.r{repeat}{suffix}"

    def meta(self, system: str, cell: str, repeat: int) -> dict[str, Any] | None:
        path = self._path(system, cell, repeat, ".json")
        return json.loads(path.read_text()) if path.exists() else None

    def is_done(self, system: str, cell: Workload, repeat: int, commit: str) -> bool:
        meta = self.meta(system, cell.name, repeat)
        if meta is None or not self.is_same_cell(meta, cell):
            return False
        return meta["commit"] == commit or ("cell_digest" in meta and self.is_same_code(meta["commit"], commit))

    @staticmethod
    def is_same_cell(meta: dict[str, Any], cell: Workload) -> bool:
        return meta.get("cell_digest") in (None, cell_digest(cell))

    def save(self, system: str, cell: Workload, repeat: int, records: list[RequestRecord], stats: GeneratorStats,
             commit: str, *, probe: HostProbe | None = None) -> None:
        csv_path = self._path(system, cell.name, repeat, ".csv")
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        write_requests_csv(records, csv_path)
        self._path(system, cell.name, repeat, ".json").write_text(json.dumps(
            {"system": system, "cell": cell.name, "repeat": repeat, "commit": commit, "cell_digest": cell_digest(cell),
             "finished_at": time.strftime("%Y-%m-%d %H:%M:%S"), "generator": stats.__dict__,
             "host_probe_ms": probe.cpu_ms if probe else None, "host_probe_wall_ms": probe.wall_ms if probe else None,
             "host_memory_probe_ms": probe.memory_ms if probe else None},
            indent=1))

    def load(self, system: str, cell: str, repeat: int) -> tuple[list[RequestRecord], GeneratorStats]:
        meta = json.loads(self._path(system, cell, repeat, ".json").read_text())
        return read_requests_csv(self._path(system, cell, repeat, ".csv")), GeneratorStats(**meta["generator"])


def cells_to_run(raw: RawCells, system: str, cells: list[Workload], repeats: int, commit: str
                 ) -> list[tuple[Workload, int]]:
    """The (cell, repeat) pairs of `system` not yet measured at `commit` with the requests they send now."""
    todo = [(cell, repeat) for repeat in range(repeats) for cell in cells
            if not raw.is_done(system, cell, repeat, commit)]
    for cell, repeat in todo:
        if (meta := raw.meta(system, cell.name, repeat)) is not None and meta["commit"] == commit:
            print(f"{system}/{cell.name}: measured at this commit with other requests; measuring it again")
    return todo


def measured_commit(raw: RawCells, systems: list[str], cells: list[Workload], repeats: int) -> str:
    """The commit a rebuilt report reads the raw files at: the newest one they were measured at, when every other
    one has the same measured code; a report never mixes code, nor other plans' cells."""
    metas = {(system, cell.name, repeat): (meta, cell) for system in systems for cell in cells
             for repeat in range(repeats) if (meta := raw.meta(system, cell.name, repeat)) is not None}
    if not metas:
        raise SystemExit("--report-only found no raw files of these systems and cells")
    newest = max((meta for meta, _ in metas.values()), key=lambda meta: meta["finished_at"])["commit"]
    others = sorted({meta["commit"] for meta, _ in metas.values()
                     if not (meta["commit"] == newest or ("cell_digest" in meta
                                                          and raw.is_same_code(meta["commit"], newest)))})
    if others:
        raise SystemExit(f"--report-only needs raw files of one commit, or of commits with the same measured code; "
                         f"{', '.join(others)} differ from {newest}")
    other = [f"{system}/{name}" for (system, name, _), (meta, cell) in metas.items()
             if not raw.is_same_cell(meta, cell)]
    if other:
        raise SystemExit(f"--report-only: these raw cells sent other requests than this plan's cells of the same "
                         f"name (pass the options they were run with): {', '.join(other)}")
    return newest
