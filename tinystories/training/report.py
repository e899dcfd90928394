"""How a run reports its progress (rank 0 only): the progress bar (rich, on a terminal) or plain log lines,
metrics.jsonl (a `segment` row at each start or resume, then `train` and `val` points), TensorBoard and wandb."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tinystories.core.config import RunConfig
from tinystories.core.fmt import fmt_clock, fmt_count
from tinystories.training.schedule import Schedule


def progress_line(point: dict, shown_total: int | str, eta: float, gflops: bool) -> str:
    """The log line of a train point: `step 40/200 | epoch 0.01 | tokens 655.36k | loss 5.1234 | lr 3.00e-04 |
    12.34k tok/s | MFU 1.2% | eta 2m05s` (GFLOP/s on a CPU, the loss scale in float16)."""
    scale = (f" | scale {point['loss_scale']:.0e} ({point['skipped_steps']} skipped)" if "loss_scale" in point
             else "")
    return (f"step {point['step']}/{shown_total} | epoch {point['epoch']:.2f} | tokens {fmt_count(point['tokens'])} | "
            f"loss {point['loss']:.4f} | lr {point['lr']:.2e} | {fmt_count(point['tokens_per_s'])} tok/s"
            + (f" | {point['gflops']:.3g} GFLOP/s" if gflops else "")
            + (f" | MFU {point['mfu']:.1%}" if "mfu" in point else "") + scale + f" | eta {fmt_clock(eta)}")


class Reporter:
    """Progress bar (rich, on a terminal) or plain log lines, metrics.jsonl, TensorBoard and wandb. Disabled (every
    call a no-op) on the ranks other than 0."""

    def __init__(self, run_dir: Path, cfg: RunConfig, enabled: bool, total_steps: int, start_step: int):
        self.enabled = enabled
        self.metrics = self.tb = self.wandb = self.progress = None
        if not enabled:
            return
        self._open_metrics(run_dir, cfg, start_step)
        if cfg.train.tensorboard:
            self._open_tensorboard(run_dir)
        if cfg.train.wandb:
            self._open_wandb(run_dir, cfg)
        if sys.stdout.isatty():
            self._open_progress_bar(total_steps, start_step)

    def _open_metrics(self, run_dir: Path, cfg: RunConfig, start_step: int) -> None:
        from tinystories.core.metrics import drop_torn_tail, metrics_path

        drop_torn_tail(metrics_path(run_dir))  # a killed run's half-written line would glue onto the next one
        self.metrics = open(metrics_path(run_dir), "ab", buffering=0)  # one write per line, nothing held back
        # this segment's schedule (a resume may change it with --set): doctor checks its points against it
        self._append({"kind": "segment", "step": start_step, "schedule": Schedule.of(cfg.train).to_dict()})

    def _append(self, point: dict) -> None:
        """One line of metrics.jsonl, written through (unbuffered); a full disk is a one-line error naming the file
        (the line it cut short is a torn last line: readers skip it, a resume removes it)."""
        from tinystories.core.atomic import disk_full_is_user_error

        data, done = (json.dumps(point) + "\n").encode(), 0
        with disk_full_is_user_error(self.metrics.name, "metrics", "its last line may be torn: readers skip it, "
                                                                   "`train --resume` removes it"):
            while done < len(data):  # a short write (the disk filling up) is followed by one that raises
                done += self.metrics.write(data[done:])

    def _open_tensorboard(self, run_dir: Path) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        except ImportError:
            print("note: tensorboard is not installed (pip install tensorboard); TensorBoard logging is off")

    def _open_wandb(self, run_dir: Path, cfg: RunConfig) -> None:
        try:
            import wandb

            self.wandb = wandb.init(project=cfg.train.wandb_project, dir=str(run_dir), config=cfg.model_dump())
        except ImportError:
            print("note: wandb is not installed; wandb logging is off")

    def _open_progress_bar(self, total_steps: int, start_step: int) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(), refresh_per_second=4,
        )
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")
        self.progress.start()

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress:
            self.progress.console.print(text, highlight=False, markup=False)
        else:
            print(text, flush=True)

    def log(self, point: dict, line: str | None, total_steps: int) -> None:
        """A point in metrics.jsonl, TensorBoard and wandb; `line` on the progress bar or as a log line."""
        if not self.enabled:
            return
        self._append(point)
        scalars = {k: v for k, v in point.items() if isinstance(v, (int, float)) and k not in ("step", "kind")}
        if self.tb:
            for k, v in scalars.items():
                self.tb.add_scalar(f"{point['kind']}/{k}", v, point["step"])
        if self.wandb:
            self.wandb.log({f"{point['kind']}/{k}": v for k, v in scalars.items()}, step=point["step"])
        if self.progress:
            self.progress.update(self.task, completed=point["step"], total=total_steps, info=line or "")
        elif line:
            print(line, flush=True)

    def close(self) -> None:
        if self.progress:
            self.progress.stop()
        if self.metrics:
            self.metrics.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()
