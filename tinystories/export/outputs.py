"""The output checks every import and export makes before it writes: an existing directory or file is replaced
only with --force, and only when it is what this command writes there (never a training run or a stranger's
file); the parent directory is created, or the command says in one line why it cannot be."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tinystories.core.atomic import ensure_writable_dir
from tinystories.core.errors import UserError


def prepare_out_dir(out: Path, force: bool, what: str) -> None:
    """`out` may be written as a `what` directory (a checkpoint, a Hugging Face export)."""
    if out.exists() or out.is_symlink():
        if not force:
            raise UserError(f"{out} already exists; pass --force to replace it")
        if not out.is_dir():
            raise UserError(f"{out} exists and is not a directory; remove it yourself")
        names = {p.name for p in out.iterdir()}
        if names & {"checkpoints", "metrics.jsonl"}:
            raise UserError(f"{out} is a training run (it has checkpoints/ or metrics.jsonl); refusing to replace it "
                            f"even with --force: choose another --out")
        if names and not names & {"model.safetensors", "config.json", "config.yaml"}:
            raise UserError(f"{out} is a non-empty directory that does not look like a {what}; refusing to replace "
                            "it even with --force")
    ensure_writable_dir(out.parent, "output")


def check_replaceable_file(target: Path, force: bool, looks_right: Callable[[Path], bool], what: str,
                           hint: str = "") -> None:
    """An existing output file is replaced only with --force, and only when it is what we would write there."""
    if not target.exists():
        return
    if not force:
        raise UserError(f"{target} already exists; pass --force to replace it{hint}")
    if not target.is_file() or not looks_right(target):
        raise UserError(f"{target} exists and is not a {what}; refusing to replace it even with --force")
