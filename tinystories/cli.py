"""The `tinystories` command: one subcommand per pipeline stage.

Each stage module owns its subcommand through a `register_cli(subparsers)` function; this file only
assembles them and turns a `UserError` into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable
from typing import Any

from tinystories import __version__
from tinystories.errors import UserError

# (module, in order of the pipeline); each defines register_cli(subparsers)
STAGE_MODULES = [
    "tinystories.prepare",  # data, tokenizer
    "tinystories.train",
    "tinystories.plot",
    "tinystories.generate",
    "tinystories.evaluate",
    "tinystories.doctor",
    "tinystories.interop",
    "tinystories.serve",
    "tinystories.quickstart",
]


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


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


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (a bad type, a missing or unknown argument) in the project's form: one line,
    exit status 2, instead of the usage block followed by the message."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")

    def _get_value(self, action, arg_string):
        # argparse's one hook between a type's error and the message: an OutOfRange names the flag and value
        try:
            return super()._get_value(action, arg_string)
        except argparse.ArgumentError as e:
            if isinstance(e.__context__, OutOfRange) and action.option_strings:
                raise argparse.ArgumentError(None, f"{action.option_strings[-1]} {arg_string}: {e.__context__}") \
                    from None
            raise


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tinystories",
        description="From raw TinyStories text to a small Llama-style model that writes children's stories.",
        epilog="Run `tinystories COMMAND --help` for a command's options and examples.",
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"tinystories {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in STAGE_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.register_cli(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return int(args.func(args) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def add_command(sub, name: str, help: str, examples: str, func) -> argparse.ArgumentParser:
    """Add a subcommand whose --help ends with real examples."""
    p = sub.add_parser(name, help=help, description=help, epilog="examples:\n" + examples, formatter_class=_Formatter)
    p.set_defaults(func=func)
    return p


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

    from tinystories.atomic import write_text_atomic

    check_report_path(path, flag)
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, json.dumps(obj, indent=2) + "\n")
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write it ({e.strerror or e})") from None
