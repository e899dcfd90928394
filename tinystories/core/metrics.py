"""The one reader of a run's metrics.jsonl (torch-free), for `plot`, `doctor` and the model card.

The trainer appends one JSON object per line and flushes it, so a reader that looks while a run is writing can
find the last line half-written, and a run killed (or stopped by a full disk) mid-write leaves one. The policy: a
torn last line (not ended by a newline and not a whole JSON object) is skipped, with a one-line note on stderr
naming the file and the line (`train --resume` cuts it off); any other line that is not a JSON object is an
error naming the file and the line. Blank lines are ignored. A resumed run appends again, so a step can appear
more than once: the later line wins.

Rows: {"kind": "train", ...} and {"kind": "val", ...} points, and since segments were recorded one
{"kind": "segment", "step": START, "schedule": {...}} row at each start or resume of the run, before its points.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

from tinystories.core.errors import UserError

METRICS_FILE = "metrics.jsonl"


def metrics_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / METRICS_FILE


def parse_metrics(text: str, where: str | Path, on_torn: Callable[[int], None] | None = None) -> list[dict]:
    """The records of metrics.jsonl text (see the module's policy); `where` names the file in errors;
    `on_torn(line number)` is called when a torn last line is skipped."""
    lines = text.split("\n")
    torn = lines.pop() if lines else ""  # "" when the text ends with a newline: nothing after the last line
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        rec = _record(line)
        if rec is None:
            shown = line.strip()
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            raise UserError(f"{where}:{i}: corrupt line, not a JSON object ({shown!r}); fix or delete that line")
        out.append(rec)
    if torn.strip():
        rec = _record(torn)  # a whole record whose newline is still to come, else a torn write: skipped
        if rec is not None:
            out.append(rec)
        elif on_torn is not None:
            on_torn(len(lines) + 1)
    return out


def _record(line: str) -> dict | None:
    try:
        rec = json.loads(line)
    except ValueError:
        return None
    return rec if isinstance(rec, dict) else None


def read_metrics(run_dir: str | Path) -> list[dict] | None:
    """The records of RUN_DIR/metrics.jsonl, or None when the run has none. A corrupt line is a UserError."""
    f = metrics_path(run_dir)
    if not f.is_file():
        return None
    try:
        text = f.read_bytes().decode("utf-8", errors="replace")
    except OSError as e:
        raise UserError(f"{f}: cannot read it ({e.strerror or e})") from None
    return parse_metrics(text, f, lambda n: print(
        f"note: {f}:{n}: torn last line skipped (a write cut short by a killed run or a full disk); the lines before "
        f"it are used, and `tinystories train --resume` removes it", file=sys.stderr))


def drop_torn_tail(f: str | Path) -> bool:
    """Cut a torn last line (a write a killed run never finished) off metrics.jsonl before a resumed run appends
    to it, which would otherwise glue its first record onto the torn one as a corrupt middle line. True if cut."""
    f = Path(f)
    try:
        size = f.stat().st_size
    except FileNotFoundError:
        return False
    if size == 0:
        return False
    with open(f, "rb+") as fh:
        fh.seek(size - 1)
        if fh.read(1) == b"\n":
            return False
        keep, pos, chunk = 0, size, 1 << 16
        while pos > 0:  # the last newline, reading backwards
            start = max(0, pos - chunk)
            fh.seek(start)
            block = fh.read(pos - start)
            nl = block.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        fh.seek(keep)
        if _record(fh.read().decode("utf-8", errors="replace")) is not None:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")  # a whole record that only lacks its newline: keep it
            return False
        fh.truncate(keep)
    return True
