"""The CLI answers at once: `tinystories --help`, every `CMD --help` and an argument error import none of
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


# a torch older than the API floor, faked in a subprocess: its metadata says 2.5.1 and it lacks the newer APIs the
# package uses (torch.optim.Muon: 2.9; torch.nn.utils.get_total_norm: 2.6)
OLD_TORCH = """
import importlib.metadata as md, sys
import torch
real_version = md.version
md.version = lambda name: "2.5.1" if name == "torch" else real_version(name)
del torch.optim.Muon, torch.nn.utils.get_total_norm
from tinystories.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_old_torch_is_a_one_line_error_naming_both_versions(tmp_path):
    """An older torch than pyproject.toml requires: one line naming the installed and the required version, before a
    command's module meets a missing API (an AttributeError traceback from optim.py's torch.optim.Muon before)."""
    from conftest import one_line_error

    floor = re.search(r'"torch>=([\d.]+)"', (REPO / "pyproject.toml").read_text()).group(1)
    assert tuple(map(int, floor.split("."))) >= (2, 9)  # torch.optim.Muon, the newest API the package uses
    r = subprocess.run([sys.executable, "-c", OLD_TORCH, "train", "--config", "configs/cpu.yaml",
                        "--out", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True, timeout=120)
    one_line_error(r, "torch 2.5.1", f"torch>={floor}")
    assert not (tmp_path / "run").exists()
