"""Waiting for what a child process prints, not for the clock: its output is read line by line on a thread, and a
test blocks until the line that says an event happened (a checkpoint saved at step N, a training step logged). The
timeout is only a hang guard: a slow machine takes longer, a fast one no less correctly."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable

HANG_GUARD_S = 600  # generous: only a hung child (or a broken test) ever reaches it

SAVED = re.compile(r"^checkpoint step (\d+) saved")  # what the trainer prints after each checkpoint
STEP = re.compile(r"^step (\d+)/")  # its progress line (not a terminal: one plain line per log interval)


class Lines:
    """The lines `proc` writes to its stdout pipe (opened with text=True), collected as they come."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines, self.ended = proc, [], False
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        with self._cond:
            self.ended = True
            self._cond.notify_all()

    def wait_for(self, match: Callable[[str], object], timeout: float = HANG_GUARD_S):
        """The first truthy match(line) among the lines printed so far and to come. AssertionError when the output
        ends (the process exited) without one, or at the hang guard."""
        deadline, i = time.monotonic() + timeout, 0
        with self._cond:
            while True:
                for i in range(i, len(self.lines)):
                    found = match(self.lines[i])
                    if found:
                        return found
                i = len(self.lines)
                if self.ended:
                    raise AssertionError("the process ended before printing the line waited for:\n"
                                         + "".join(self.lines[-40:]))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"hang guard: nothing matched in {timeout:g} s:\n" + "".join(self.lines[-40:]))
                self._cond.wait(left)

    def saved_step_at_least(self, step: int, timeout: float = HANG_GUARD_S) -> int:
        """Wait until the trainer says it saved a checkpoint at a step >= `step`; returns that step."""
        return self._step_at_least(SAVED, step, timeout)

    def logged_step_at_least(self, step: int, timeout: float = HANG_GUARD_S) -> int:
        """Wait until the trainer logs a training step >= `step`; returns that step."""
        return self._step_at_least(STEP, step, timeout)

    def _step_at_least(self, pattern: re.Pattern, step: int, timeout: float) -> int:
        found = self.wait_for(lambda line: (m := pattern.match(line)) is not None and int(m.group(1)) >= step and m,
                              timeout)
        return int(found.group(1))

    def text(self, timeout: float = HANG_GUARD_S) -> str:
        """Everything printed, once the output has ended (the process and every child holding the pipe exited)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while not self.ended:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"hang guard: the output did not end in {timeout:g} s")
                self._cond.wait(left)
            return "".join(self.lines)
