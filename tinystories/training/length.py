"""How long a run trains (torch-free): its length in optimizer steps, and so its learning-rate schedule.

The length comes from train.max_steps, max_tokens or epochs (known from the start) or from a time budget,
train.max_minutes: measured during the first steps, then re-planned at each evaluation from the pace the run
really keeps (evaluations and checkpoints included), so that a budget of N minutes trains for N minutes, or for
train.max_passes over the training text where those come first. The schedule itself is schedule.py's.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tinystories.core.config import RunConfig
from tinystories.core.errors import UserError
from tinystories.training.schedule import PROVISIONAL_TOTAL, lr_at
from tinystories.training.state import TrainState

BUDGET_MEASURE_STEPS = 10  # a time budget fixes the run length after this many steps (or at its deadline)
BUDGET_MARGIN = 1.08  # the measured step time is stretched by this much when the budget is turned into steps
BUDGET_GRACE_S = 5  # a run still going this long after its deadline (a slow machine) finishes at once
REPLAN_UNTIL = 0.85  # a time budget's length is re-planned at evaluations before this share of the run
REPLAN_MIN_CHANGE = 0.01  # ... when the pace moves it by more than this share


def require_run_length(cfg: RunConfig) -> None:
    """A run's config must say how long to train."""
    t = cfg.train
    if not (t.max_steps or t.max_tokens or t.epochs or t.max_minutes):
        raise UserError("set the run length: --set train.max_steps=N (or train.max_tokens, train.epochs, "
                        "train.max_minutes)")


def configured_steps(cfg: RunConfig, tokens_per_step: int, train_tokens: int) -> int | None:
    """The run length the config sets in steps (max_steps > max_tokens > epochs), or None for a time budget."""
    require_run_length(cfg)
    t = cfg.train
    if t.max_steps:
        return t.max_steps
    if t.max_tokens:
        return max(1, math.ceil(t.max_tokens / tokens_per_step))
    if t.epochs:
        return max(1, math.ceil(t.epochs * train_tokens / tokens_per_step))
    return None  # train.max_minutes: the length is measured during the first steps


@dataclass
class RunLength:
    """The run's length in optimizer steps, and so its learning-rate schedule.

    A length in steps, tokens or epochs is known from the start. A time budget (train.max_minutes) is provisional
    (PROVISIONAL_TOTAL: a warmup-only schedule) until BUDGET_MEASURE_STEPS steps have measured the step time (or the
    deadline has passed); it is then fixed early, so that a budget shorter than the configured warmup still gets a
    short warmup and a full decay. A resumed run keeps the length its budget fixed; a resumed run given a new
    max_steps (tokens, epochs) stretches the cosine to it. Under DDP `now` is rank 0's clock and `sync` makes
    rank 0's decision everyone's, so that every rank runs the same number of steps."""

    cfg: RunConfig
    total: int
    start_step: int = 0
    deadline: float | None = None  # time.time() at which a time budget ends
    provisional: bool = False
    t_start: float = field(default_factory=time.time)
    measured_steps: int = 0
    measured_time: float = 0.0
    fixed_at: tuple[int, float] | None = None  # (step, time) the budget fixed the length: the pace is measured since
    cap: int | None = None  # a time budget's most steps: train.max_passes over the training text

    @classmethod
    def plan(cls, cfg: RunConfig, tokens_per_step: int, train_tokens: int, saved: TrainState | None = None,
             now: float | None = None, sync: Callable[[float], float] = float) -> RunLength:
        saved = saved or TrainState()
        now = time.time() if now is None else now
        total = configured_steps(cfg, tokens_per_step, train_tokens)
        if total is None and saved.total_steps:
            total = saved.total_steps  # a resumed time-budget run: the length its budget fixed
        deadline = None
        if cfg.train.max_minutes and total is None:
            deadline = sync(now + (saved.deadline_left_s or cfg.train.max_minutes * 60))
        if total is None:
            cap = None
            if cfg.train.max_passes:
                cap = max(1, math.ceil(cfg.train.max_passes * train_tokens / tokens_per_step))
            return cls(cfg, max(saved.step + 1, PROVISIONAL_TOTAL), saved.step, deadline, True, now, cap=cap)
        return cls(cfg, total, saved.step, deadline, False, now)

    def lr(self, step: int) -> float:
        return lr_at(step, self.cfg, self.total)

    @property
    def logged_total(self) -> int | None:
        """The length the schedule is set for, None while provisional (as metrics.jsonl and state.json record it)."""
        return None if self.provisional else self.total

    def record_step_time(self, step: int, seconds: float) -> None:
        """The time of the step that ended at `step`; the first steps (allocation, compilation) are not counted."""
        if step - self.start_step > 2:
            self.measured_steps += 1
            self.measured_time += seconds

    def fix_budget(self, step: int, now: float, sync: Callable[[float], float] = float) -> str | None:
        """After step `step`: fix a provisional length once it has been measured; returns the line to log then."""
        if not (self.provisional and (step >= self.start_step + BUDGET_MEASURE_STEPS or now > self.deadline)):
            return None
        per_step = (self.measured_time / self.measured_steps if self.measured_steps
                    else (time.time() - self.t_start) / max(step - self.start_step, 1))
        total = max(step + 1, step + int((self.deadline - now) / (per_step * BUDGET_MARGIN)))
        self.total = int(sync(self._capped(total)))
        self.provisional = False
        self.fixed_at = (step, now)
        capped = (f"; at most {self.cfg.train.max_passes:g} passes over the data (train.max_passes): {self.total} "
                  f"of the {total} the budget buys" if self.cap is not None and total > self.cap else "")
        return (f"time budget: {self.cfg.train.max_minutes:g} min -> {self.total} steps "
                f"({per_step * 1000:.0f} ms/step, evaluation included{capped})")

    def _capped(self, total: int) -> int:
        return min(total, self.cap) if self.cap is not None else total

    def replan(self, step: int, now: float, reserve_s: float, sync: Callable[[float], float] = float) -> str | None:
        """At an evaluation of a time-budget run: the length the pace kept since the budget was fixed (evaluations
        and checkpoints included) fits in the time left, less `reserve_s` for the final evaluation. Not in the last
        part of the run (REPLAN_UNTIL), so the decay ends as planned; returns the line to log when it changed."""
        if self.provisional or self.fixed_at is None or not self.deadline or step >= REPLAN_UNTIL * self.total:
            return None
        step0, t0 = self.fixed_at
        if step <= step0 or now <= t0:
            return None
        per_step = (now - t0) / (step - step0)
        total = int(sync(self._capped(max(step + 1, step + int((self.deadline - now - reserve_s) / per_step)))))
        if abs(total - self.total) <= REPLAN_MIN_CHANGE * self.total:
            return None
        old, self.total = self.total, total
        return f"time budget: on pace for {total} steps, not {old} ({per_step * 1000:.0f} ms/step since step {step0})"

    def stop_if_over_budget(self, step: int, now: float) -> None:
        if self.deadline and now > self.deadline + BUDGET_GRACE_S:
            self.total = step  # over budget (a slow machine): finish now

    def deadline_left(self) -> float | None:
        return (self.deadline - time.time()) if self.deadline else None

    def seconds_left(self, step: int, now: float, tokens_per_s: float, tokens_per_step: int) -> float:
        if self.provisional and self.deadline:
            return self.deadline - now
        return (self.total - step) * tokens_per_step / max(tokens_per_s, 1e-9)
