"""What the step counts on the device between two log lines, without a host sync per step: the train loss
(LossMeter) and, in float16, the updates the loss scaler skipped (ScalerSkips). Read at log intervals, they raise
NonFiniteLoss when a step's loss was NaN/inf and ScalerGaveUp when the gradients overflowed at every scale.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from tinystories.model.device import Dist

MAX_SKIPPED_IN_A_ROW = 30  # float16: the scale halves at each skipped step; 30 in a row is divergence, not overflow


class NonFiniteLoss(Exception):
    """A step's loss was NaN or infinite: args[0] is the step."""


class LossMeter:
    """The train loss between two log lines, summed on the device (no host sync per step), and the first step
    whose loss was not finite."""

    def __init__(self, device: torch.device):
        self.device = device
        self.sum = torch.zeros((), device=device)
        self.n = 0
        self.bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, loss: torch.Tensor) -> None:
        self.sum += loss.detach()
        self.n += 1

    def end_step(self, step: int) -> None:
        finite = torch.isfinite(self.sum)
        self.bad_step = torch.where((~finite) & (self.bad_step < 0), torch.tensor(step, device=self.device),
                                    self.bad_step)

    def mean(self, d: Dist) -> float:
        """The mean loss since the last call, over every rank's micro-batches (the one host sync, at log
        intervals). Raises NonFiniteLoss(step) when a step's loss was NaN or infinite."""
        if d.enabled:
            dist.all_reduce(self.sum)
            self.sum /= d.world
            dist.all_reduce(self.bad_step, op=dist.ReduceOp.MAX)
        mean = float(self.sum) / max(self.n, 1)
        if int(self.bad_step) >= 0:
            raise NonFiniteLoss(int(self.bad_step))
        self.sum.zero_()
        self.n = 0
        return mean


class ScalerGaveUp(NonFiniteLoss):
    """float16: MAX_SKIPPED_IN_A_ROW updates in a row were skipped (overflow at every loss scale tried)."""


class ScalerSkips:
    """float16: the optimizer steps the loss scaler skipped, counted on the device like LossMeter's loss (no host
    sync per step; read at log intervals). The scaler skips a step when the unscaled gradients hold inf/NaN, which
    is when their total norm is not finite: that norm is what is counted."""

    def __init__(self, device: torch.device):
        self.total = torch.zeros((), dtype=torch.long, device=device)
        self.in_a_row = torch.zeros((), dtype=torch.long, device=device)
        self.gave_up_at = torch.full((), -1, dtype=torch.long, device=device)

    def add(self, grad_norm: torch.Tensor, step: int) -> None:
        skipped = (~torch.isfinite(grad_norm)).long()
        self.total += skipped
        self.in_a_row.mul_(skipped).add_(skipped)  # +1 if skipped, else back to 0
        self.gave_up_at = torch.where((self.in_a_row >= MAX_SKIPPED_IN_A_ROW) & (self.gave_up_at < 0),
                                      torch.tensor(step, device=grad_norm.device), self.gave_up_at)

    def check(self) -> int:
        """The steps skipped so far (one host sync); raises ScalerGaveUp(step) after a long run of skips."""
        if int(self.gave_up_at) >= 0:
            raise ScalerGaveUp(int(self.gave_up_at))
        return int(self.total)

    def state_dict(self) -> dict:
        return {"skipped_steps": int(self.total), "skipped_in_a_row": int(self.in_a_row)}

    def load_state_dict(self, sd: dict) -> None:
        self.total.fill_(sd.pop("skipped_steps", 0))
        self.in_a_row.fill_(sd.pop("skipped_in_a_row", 0))
