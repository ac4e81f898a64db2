"""The sweep's rates on this host: a comparison's rate sweep is set in loads (the reference's mean requests in
flight, bench/workloads.py), so its rates come from the reference measured here.

1. Explicit `--rates` need nothing: every trace that has them is fixed.
2. `--reference FILE` gives the unit rates at once.
3. Otherwise the baseline runs first: its uncontended cells are measured, `settle` fits the reference from their
   raw files (the same fit the report judges by) and the plan expands into every cell. A resumed run or a rebuilt
   report reads the same raw files back and expands the same cells.
"""

from __future__ import annotations

import argparse

from bench.raw_cells import RawCells
from bench.result_files import request_sample
from bench.slo import Reference, ReferenceFit, RequestSample, fit_reference
from bench.workloads import Plan, Workload


class SweepRates:
    """The sweep's rates: explicit (`--rates`), or the plan's loads at this host's unit rates, from `--reference`
    or from the baseline's uncontended cells measured at this commit (read back from raw/, so that a resumed run
    and a rebuilt report expand the same cells as the run that measured them)."""

    def __init__(self, plan: Plan, raw: RawCells, args: argparse.Namespace, *, baseline: str) -> None:
        self.plan, self.raw, self.args, self.baseline = plan, raw, args, baseline
        self.unit_rates: dict[str, float] | None = None if plan.calibrated_traces() else {}
        self._cells: list[Workload] | None = None
        self._fixed_cells: list[Workload] | None = None
        if self.unit_rates is None and args.reference is not None:
            reference = Reference.model_validate_json(args.reference.read_text())
            self._set_from({trace: reference.for_trace(trace) for trace in plan.calibrated_traces()})

    def settle(self, commit: str, *, is_required: bool = True) -> None:
        """Set the rates from the baseline's uncontended cells measured at `commit`, if they give a reference."""
        if self.unit_rates is not None:
            return
        samples: dict[str, list[RequestSample]] = {}
        uncontended = [cell for cell in self.cells() if cell.kind == "uncontended"]
        for cell in uncontended:
            for repeat in range(self.args.repeats):
                if self.raw.is_done(self.baseline, cell, repeat, commit):
                    records = self.raw.load(self.baseline, cell.name, repeat)[0]
                    samples.setdefault(cell.trace, []).extend(
                        sample for record in records if (sample := request_sample(record)) is not None)
        try:  # the same fit, of the same requests, as the report's reference for that trace
            fits = {trace: fit_reference(samples.get(trace, []), min_requests=self.args.min_reference_requests)
                    for trace in self.plan.calibrated_traces()}
        except ValueError as exc:
            if is_required:
                raise SystemExit(f"the sweep's rates come from {self.baseline}'s uncontended cells, which did not "
                                 f"give a reference: {exc}") from exc
            return
        self._set_from(fits)

    def _set_from(self, fits: dict[str, ReferenceFit]) -> None:
        self.unit_rates = self.plan.unit_rates(fits)
        cells = self.cells()
        for trace, unit in self.unit_rates.items():
            rates = [cell.rate_per_s for cell in cells if cell.trace == trace and cell.kind == "open"]
            loads = ", ".join(f"{load:g}" for load in self.plan.loads_of(trace))
            print(f"{trace}: one reference request in flight at {unit:.3f}/s (its mean uncontended E2E "
                  f"{1 / unit:.2f} s); the sweep at loads {loads} is {', '.join(f'{rate:g}' for rate in rates)} "
                  f"requests/s", flush=True)
        arrivals_s = sum(cell.requests[-1].arrival_s for cell in cells if cell.kind == "open")
        print(f"the sweep's arrivals: {arrivals_s / 60:.1f} min per system", flush=True)

    def cells(self) -> list[Workload]:
        """Every cell; before the rates are known, only those that need none."""
        if self.unit_rates is None:
            if self._fixed_cells is None:
                self._fixed_cells = self.plan.fixed_workloads()
            return self._fixed_cells
        if self._cells is None:
            self._cells = self.plan.workloads(self.unit_rates)
        return self._cells
