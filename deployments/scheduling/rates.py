"""How fast each engine works, learned online from what the router observes, so that no constant fits one host.

1. `observe_prefill(engine, tokens, seconds)`: a prompt of `tokens` took `seconds` from dispatch to its first token
   on an engine that had nothing queued ahead of it: the engine's prefill rate, tokens/s.
2. `observe_handover(engine, tokens, num_ahead, seconds)`: a split request's hand-over (prefill's answer to decode's
   first token, less one decode step). On an idle decode engine (`num_ahead` 0) it is the transfer itself, a line
   seconds = a + b · tokens, shared by the pool; on a busy one, what it took beyond that is the engine's wait, a
   line against the requests ahead (the KV moves only as the engine's loop polls it, between steps). Kept apart,
   so that hand-overs timed under load never pass for the transfer of an idle engine, and the other way round.
3. `observe_decode_step(engine, num_running, seconds)`: a decode step with `num_running` requests in the batch: a
   line, seconds = c + d · num_running.
Each is an exponentially weighted estimate (recent observations count more; `half_life` observations halve an old
one's weight), per engine where engines differ (prefill rate, step time) and per pool where they share a path (the
transfer). Until an estimate has `min_observations`, `is_known` is False and a policy falls back to what needs none.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeGuard


@dataclass
class WeightedLine:
    """y = intercept + slope · x, fitted by exponentially weighted least squares (one observation at a time)."""

    half_life: float = 32.0
    _weight: float = 0.0
    _sx: float = 0.0
    _sy: float = 0.0
    _sxx: float = 0.0
    _sxy: float = 0.0
    num_observations: int = 0
    _line: tuple[float, float] | None = field(default=None, repr=False, compare=False)
    _keep: float = field(init=False, repr=False, compare=False)  # an old observation's weight after one more

    def __post_init__(self) -> None:
        self._keep = 0.5 ** (1.0 / self.half_life)

    def observe(self, x: float, y: float) -> None:
        keep = self._keep
        self._weight = keep * self._weight + 1.0
        self._sx = keep * self._sx + x
        self._sy = keep * self._sy + y
        self._sxx = keep * self._sxx + x * x
        self._sxy = keep * self._sxy + x * y
        self.num_observations += 1
        self._line = None

    @property
    def slope(self) -> float:
        return self.fitted()[1]

    @property
    def intercept(self) -> float:
        return self.fitted()[0]

    def fitted(self) -> tuple[float, float]:
        """(intercept, slope), computed once per observation: a router or a simulator predicts far more often
        than it observes."""
        if self._line is None:
            slope = self._slope()
            intercept = max(0.0, self._sy / self._weight - slope * self._sx / self._weight) if self._weight else 0.0
            self._line = (intercept, slope)
        return self._line

    def _slope(self) -> float:
        if self._weight == 0:
            return 0.0
        mean_x, mean_y = self._sx / self._weight, self._sy / self._weight
        spread = self._sxx / self._weight - mean_x * mean_x
        if spread <= 1e-12 * max(1.0, mean_x * mean_x):
            return 0.0  # every x alike: no slope to tell; the mean is the estimate
        return max(0.0, (self._sxy / self._weight - mean_x * mean_y) / spread)  # work never gets cheaper with size

    def predict(self, x: float) -> float:
        intercept, slope = self.fitted()
        return intercept + slope * x

    def summary(self) -> dict[str, float]:
        return {"intercept": round(self.intercept, 6), "slope": round(self.slope, 9),
                "num_observations": self.num_observations}


@dataclass
class EngineLines:
    """One line per engine, and the sums of the trusted lines' coefficients kept as they change: an engine without a
    trusted line of its own is estimated by the mean of those that have one, and that mean (of lines, so the mean
    line) costs O(1) per estimate instead of a pass over every engine (a decision must stay O(log engines))."""

    half_life: float
    min_observations: int
    by_engine: dict[str, WeightedLine] = field(default_factory=dict)
    num_trusted: int = 0
    num_observations: int = 0
    _sum_intercept: float = 0.0
    _sum_slope: float = 0.0

    def observe(self, engine_id: str, x: float, y: float) -> None:
        line = self.by_engine.get(engine_id)
        if line is None:
            line = self.by_engine[engine_id] = WeightedLine(half_life=self.half_life)
        was_trusted = self.is_trusted(line)
        if was_trusted:
            intercept, slope = line.fitted()
            self._sum_intercept -= intercept
            self._sum_slope -= slope
        line.observe(x, y)
        self.num_observations += 1
        if self.is_trusted(line):
            intercept, slope = line.fitted()
            self._sum_intercept += intercept
            self._sum_slope += slope
            self.num_trusted += 0 if was_trusted else 1

    def is_trusted(self, line: WeightedLine | None) -> TypeGuard[WeightedLine]:
        return line is not None and line.num_observations >= self.min_observations

    def estimate(self, engine_id: str, x: float) -> float:
        """The engine's own line once trusted; before that, the mean of the engines that have one (0: none yet)."""
        line = self.by_engine.get(engine_id)
        if self.is_trusted(line):
            return line.predict(x)
        if not self.num_trusted:
            return 0.0
        return (self._sum_intercept + self._sum_slope * x) / self.num_trusted

    def summary(self) -> dict[str, dict[str, float]]:
        return {engine_id: line.summary() for engine_id, line in self.by_engine.items()}


@dataclass
class Rates:
    """The learned rates the predictive policy needs. `min_observations` before an estimate is trusted."""

    min_observations: int = 4
    half_life: float = 32.0
    _prefill: EngineLines = field(init=False)  # engine -> seconds against prompt tokens
    _decode_step: EngineLines = field(init=False)  # engine -> seconds against batch size
    _transfer: WeightedLine | None = None  # seconds against prompt tokens, decode idle
    _handover_wait: EngineLines = field(init=False)  # decode engine -> seconds against requests ahead
    _is_known: bool = False

    def __post_init__(self) -> None:
        self._prefill, self._decode_step, self._handover_wait = (
            EngineLines(self.half_life, self.min_observations) for _ in range(3))

    @property
    def num_handovers(self) -> int:
        return ((self._transfer.num_observations if self._transfer is not None else 0)
                + self._handover_wait.num_observations)

    # 1-3. Observations.
    def observe_prefill(self, engine_id: str, num_tokens: int, seconds: float) -> None:
        self._prefill.observe(engine_id, num_tokens, seconds)

    def observe_decode_step(self, engine_id: str, num_running: int, seconds: float) -> None:
        self._decode_step.observe(engine_id, num_running, seconds)

    def observe_handover(self, engine_id: str, num_tokens: int, num_ahead: int, seconds: float) -> None:
        if num_ahead == 0:
            if self._transfer is None:
                self._transfer = WeightedLine(half_life=self.half_life)
            self._transfer.observe(num_tokens, seconds)
        else:
            wait = max(0.0, seconds - self.transfer_s(num_tokens))
            self._handover_wait.observe(engine_id, num_ahead, wait)

    # Estimates.
    def is_known(self) -> bool:
        """Enough of each kind to predict: some prefill, some decode step, and (for a split) some hand-overs.
        Observations only accumulate, so once known it stays known (and is not searched for again)."""
        if not self._is_known:
            self._is_known = (self._prefill.num_trusted > 0 and self._decode_step.num_trusted > 0
                              and self.num_handovers >= self.min_observations)
        return self._is_known

    def prefill_s(self, engine_id: str, num_tokens: float) -> float:
        """Seconds the engine takes to compute `num_tokens` of prompt."""
        return self._prefill.estimate(engine_id, num_tokens)

    def prompt_compute_s(self, engine_id: str, num_tokens: float) -> float:
        """The compute `num_tokens` of prompt add to a step that runs anyway: the prefill line's slope only. Its
        intercept is what a request pays once (the calls, a forward pass of its own), which a chunk riding in a
        decode step that runs for the streams does not pay again."""
        return max(0.0, self.prefill_s(engine_id, num_tokens) - self.prefill_s(engine_id, 0))

    def drain_s(self, engine_id: str, num_tokens: int) -> float:
        """What the load book orders engines by: the seconds to compute `num_tokens` of pending prompt once the rates
        are known; until then the tokens themselves (token join-the-shortest-queue). The router and the simulator
        both hand this to their LoadBook."""
        if self._is_known or self.is_known():  # (the flag first: the book asks this for every entry it makes)
            return self._prefill.estimate(engine_id, num_tokens)
        return float(num_tokens)

    def decode_step_s(self, engine_id: str, num_running: int) -> float:
        """Seconds of one decode step with `num_running` requests in the engine's batch."""
        return self._decode_step.estimate(engine_id, num_running)

    def transfer_s(self, num_tokens: int) -> float:
        """The hand-over of `num_tokens` of KV to an idle decode engine (0 until one was timed)."""
        transfer = self._transfer
        return transfer.predict(num_tokens) if transfer is not None and self._is_transfer_timed() else 0.0

    def _is_transfer_timed(self) -> bool:
        return self._transfer is not None and self._transfer.num_observations >= self.min_observations

    def handover_s(self, engine_id: str, num_tokens: int, num_ahead: int) -> float:
        """The hand-over to a decode engine with `num_ahead` requests: the transfer, plus the engine's wait when
        busy. Until an idle engine was timed, the busy engines' line (at `num_ahead`, or at 0) stands for both."""
        if num_ahead == 0 and self._is_transfer_timed():
            return self.transfer_s(num_tokens)
        return self.transfer_s(num_tokens) + self._handover_wait.estimate(engine_id, num_ahead)

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Every learned line (intercept s, slope s per unit, observations), for /health."""
        return {"prefill_s_per_token": self._prefill.summary(),
                "decode_step_s_per_stream": self._decode_step.summary(),
                "transfer_s_per_token": {} if self._transfer is None else {"pool": self._transfer.summary()},
                "handover_wait_s_per_request_ahead": self._handover_wait.summary()}
