"""The learning-rate schedule (torch-free): the trainer sets it and `doctor` checks logged rates against it.

`lr_at(step, cfg, total)` reads cfg.train; `Schedule` is the same schedule from its five parameters alone, as a
run's metrics.jsonl records them for each segment (a start or a resume, which may change them with --set).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

PROVISIONAL_TOTAL = 10**9  # the run length while a time budget is still measuring the step time (warmup only)


def effective_warmup(warmup_steps: int, total_steps: int) -> int:
    """The configured warmup, or the first 10% of a run too short for it, so that every run also decays."""
    return warmup_steps if warmup_steps < total_steps else total_steps // 10


@dataclass(frozen=True)
class Schedule:
    """The parameters of the schedule (train.lr, min_lr, warmup_steps, lr_schedule, cooldown_frac)."""

    lr: float
    min_lr: float
    warmup_steps: int
    lr_schedule: str = "cosine"
    cooldown_frac: float = 0.2

    @classmethod
    def of(cls, train) -> Schedule:
        """The schedule of a TrainConfig (or anything with its five attributes)."""
        return cls(float(train.lr), float(train.min_lr), int(train.warmup_steps), str(train.lr_schedule),
                   float(train.cooldown_frac))

    @classmethod
    def from_dict(cls, d: dict) -> Schedule | None:
        """The schedule a metrics.jsonl segment row records, or None when the row lacks it or is malformed."""
        try:
            s = cls(float(d["lr"]), float(d["min_lr"]), int(d["warmup_steps"]), str(d.get("lr_schedule", "cosine")),
                    float(d.get("cooldown_frac", 0.2)))
        except (KeyError, TypeError, ValueError):
            return None
        return s if s.lr_schedule in ("cosine", "linear", "wsd") and s.cooldown_frac > 0 else None

    def to_dict(self) -> dict:
        return asdict(self)

    def lr_at(self, step: int, total_steps: int) -> float:
        """Learning rate of optimizer step `step` (0-based): linear warmup, then one decay from lr to min_lr at
        total_steps (lr_schedule: cosine; linear; wsd = constant, then linear over the last cooldown_frac of the
        run)."""
        warm = effective_warmup(self.warmup_steps, total_steps)
        if step < warm:
            return self.lr * (step + 1) / warm
        if step >= total_steps:
            return self.min_lr
        progress = (step - warm) / max(total_steps - warm, 1)
        if self.lr_schedule == "cosine":
            return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * progress))
        if self.lr_schedule == "wsd":
            progress = max(0.0, 1 - (1 - progress) / self.cooldown_frac)
        return self.lr - (self.lr - self.min_lr) * progress

    def describe(self, total_steps: int) -> str:
        decay = {"cosine": "cosine", "linear": "linear",
                 "wsd": f"constant, then linear over the last {self.cooldown_frac:.0%}"}[self.lr_schedule]
        return (f"warmup {effective_warmup(self.warmup_steps, total_steps)} steps to {self.lr:g}, {decay} to "
                f"{self.min_lr:g} at step {total_steps}")


def lr_at(step: int, cfg, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) for a RunConfig's train section (see Schedule.lr_at). The
    one schedule: the trainer sets it and `doctor` checks logged rates against it."""
    return Schedule.of(cfg.train).lr_at(step, total_steps)
