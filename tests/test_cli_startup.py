"""The CLI answers at once (issue 17): `tinystories --help`, every `CMD --help` and an argument error import none of
the heavy libraries (torch alone is seconds on 2 cores). The import list is the test, not a time, so it cannot flake
on a slow machine; benchmarks/cli_startup.py prints the times."""

from __future__ import annotations

import argparse
import importlib
import re
import subprocess
import sys

import pytest

from conftest import REPO
from tinystories.cli import build_parser

HEAVY = {"torch", "numpy", "pydantic", "yaml", "safetensors", "tokenizers", "transformers", "matplotlib"}


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(words, parser) for the program and every command and subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))


COMMANDS = [words for words, _ in _commands(build_parser())]


def imported(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Run `python -X importtime -m tinystories ARGS`; returns the run and the top-level packages it imported."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "tinystories", *args], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    tops = {m.group(1).split(".")[0] for m in re.finditer(r"^import time:\s+\d+ \|\s+\d+ \| *(\S+)", r.stderr, re.M)}
    assert "tinystories.cli" in {m for m in re.findall(r"\| *(\S+)$", r.stderr, re.M)}, r.stderr[-2000:]
    return r, tops


def test_every_command_is_found():
    assert {words[0] for words in COMMANDS if words} >= {"data", "tokenizer", "train", "plot", "generate", "eval",
                                                         "doctor", "import", "export", "serve", "quickstart"}


@pytest.mark.parametrize("words", COMMANDS, ids=lambda w: " ".join(w) or "tinystories")
def test_help_imports_no_heavy_library(words):
    r, tops = imported(*words, "--help")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith(f"usage: tinystories{''.join(' ' + w for w in words)} ")
    assert tops.isdisjoint(HEAVY), f"imported {sorted(tops & HEAVY)}"


@pytest.mark.parametrize("args, says", [
    (["generate"], "the following arguments are required: --checkpoint"),
    (["train", "--nope"], "unrecognized arguments: --nope"),
    (["generate", "--checkpoint", "x", "--top-k", "-3"], "--top-k -3: must be >= 0"),
    (["serve", "--checkpoint", "x", "--port", "abc"], "invalid int value: 'abc'"),
    (["data", "prepare"], "the following arguments are required: --tokenizer"),
    (["tokenizer", "train", "--out", "x", "--max-stories", "abc"], "--max-stories: expected a number of stories"),
])
def test_argument_error_imports_no_heavy_library(args, says):
    r, tops = imported(*args)
    assert r.returncode == 2
    assert re.search(rf"^error: tinystories.*{re.escape(says)}", r.stderr, re.M), r.stderr[-2000:]
    assert tops.isdisjoint(HEAVY), f"imported {sorted(tops & HEAVY)}"


def test_every_handler_resolves():
    """Each command names its handler as "module:function" (imported when it runs): each one exists."""
    handlers = {sub.get_default("func") for _, sub in _commands(build_parser())} - {None}
    assert len(handlers) >= 14
    for handler in sorted(handlers):
        module, name = handler.split(":")
        assert callable(getattr(importlib.import_module(module), name, None)), handler
