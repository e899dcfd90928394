"""A run's progress, as a checkpoint's state.json records it and a resumed run reads it back (torch-free).

The optimizer's state, the loss scaler's and every rank's RNG states (trainer.pt) belong to the objects a run
trains with: Run.trainer_state and Run.load_trainer_state (run.py) write and read them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """What a checkpoint records about the run's progress (state.json) and a resumed run reads back."""

    step: int = 0
    total_steps: int | None = None  # the run length when the checkpoint was saved; None: a budget still measuring
    metrics: dict = field(default_factory=dict)  # of the last evaluation
    best_val_loss: float = math.inf
    evals_without_improvement: int = 0
    deadline_left_s: float | None = None  # what is left of a time budget
    init_from: str | None = None  # the checkpoint a fine-tuning run started from

    def record_eval(self, val_loss: float, count_miss: bool = True) -> bool:
        """A new validation loss: True when it is the best so far. A periodic evaluation that is not counts toward
        early stopping; the final one does not (`count_miss` False)."""
        improved = val_loss < self.best_val_loss
        if improved:
            self.best_val_loss, self.evals_without_improvement = val_loss, 0
        elif count_miss:
            self.evals_without_improvement += 1
        return improved

    def early_stop(self, patience: int | None) -> str | None:
        """The reason to stop, when `patience` evaluations in a row have not improved."""
        if patience and self.evals_without_improvement >= patience:
            return f"early stop: no val improvement in {self.evals_without_improvement} evaluations"
        return None

    def to_dict(self, facts: dict | None = None) -> dict:
        """state.json: these fields, with `facts` about the run beside them for readers (tokens, epoch, cache_dir,
        global_batch, world_size, n_params; from_dict does not read them back: they follow from the run)."""
        facts = facts or {}
        out = {"step": self.step, "tokens": facts.get("tokens"), "epoch": facts.get("epoch"),
               "total_steps": self.total_steps, "cache_dir": facts.get("cache_dir"), "metrics": self.metrics,
               "best_val_loss": self.best_val_loss, "evals_without_improvement": self.evals_without_improvement,
               "global_batch": facts.get("global_batch"), "world_size": facts.get("world_size"),
               "n_params": facts.get("n_params"), "deadline_left_s": self.deadline_left_s}
        if self.init_from:
            out["init_from"] = self.init_from
        return out

    @classmethod
    def from_dict(cls, d: dict) -> TrainState:
        """From a state.json, of this version or an older one (a missing key takes its default)."""
        return cls(step=int(d.get("step", 0)), total_steps=d.get("total_steps"), metrics=d.get("metrics") or {},
                   best_val_loss=d.get("best_val_loss", math.inf),
                   evals_without_improvement=d.get("evals_without_improvement", 0),
                   deadline_left_s=d.get("deadline_left_s"), init_from=d.get("init_from"))
