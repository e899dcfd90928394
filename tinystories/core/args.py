"""Argument types and report files shared by the commands: `ranged` numbers that must lie in a range (a one-line
error naming the flag and value), and JSON reports that may replace only an earlier report. Torch-free: the
command line's --help uses them."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

from tinystories.core.errors import UserError


class OutOfRange(argparse.ArgumentTypeError):
    """A value of the right type outside its range (raised by a `ranged` type)."""


def ranged(kind: Callable[[str], Any], ok: Callable[[Any], bool], says: str) -> Callable[[str], Any]:
    """An argparse `type=` for a number that must satisfy `ok`, e.g. `ranged(int, lambda v: v >= 1, "must be at
    least 1")`: a value outside is the parser's one-line error `--flag VALUE: must be at least 1`, before any
    work starts; text that is not a number stays argparse's `invalid int value: 'abc'`."""

    def parse(text: str):
        value = kind(text)  # a ValueError: argparse's own "invalid <kind> value"
        if not ok(value):
            raise OutOfRange(says)
        return value

    parse.__name__ = getattr(kind, "__name__", "value")
    return parse


def at_least(n: int) -> Callable[[str], int]:
    return ranged(int, lambda v: v >= n, f"must be at least {n}")


def check_report_path(path: str | os.PathLike, flag: str = "--json") -> None:
    """A report may replace an earlier JSON file, never anything else: a typo such as `--json README.md` must not
    destroy a file that is not a report. Commands call this before their (slow) work, and again on writing."""
    import json
    from pathlib import Path

    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a directory; give a file name such as report.json")
    if path.exists():
        try:
            json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            raise UserError(f"{flag} {path}: exists and is not a JSON report; refusing to overwrite it "
                            f"(choose another file name, or delete it first)") from None


def write_json_report(path: str | os.PathLike, obj, flag: str = "--json") -> None:
    """Write a command's JSON report atomically (see check_report_path)."""
    import json
    from pathlib import Path

    from tinystories.core.atomic import ensure_writable_dir, write_text_atomic

    check_report_path(path, flag)
    path = Path(path)
    ensure_writable_dir(path.parent, "report", flag)
    try:
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None
