"""Run directories: the one answer to "which run directory holds this checkpoint?".

A run directory holds config.yaml, metrics.jsonl and checkpoints/ (step-N directories and the `latest` and `best`
links). A checkpoint is a directory with model.safetensors, either inside a run (RUN/checkpoints/step-N) or on its
own (an import or an export).
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINTS = "checkpoints"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def run_dir_of(path: str | Path) -> Path | None:
    """The run directory of `path`: itself when it is one (it has checkpoints/ or metrics.jsonl), the run around
    it when it is a checkpoint inside one (RUN/checkpoints/step-N, or the `latest`/`best` link), else None."""
    p = Path(path)
    if (p / CHECKPOINTS).is_dir() or (p / "metrics.jsonl").is_file():
        return p
    for cand in (p, p.resolve()):
        if cand.parent.name == CHECKPOINTS:
            return cand.parent.parent
    return None


def run_name(path: str | Path) -> str:
    """A short name for a checkpoint: RUN/step-N inside a run, the run's name for a run, else the directory's."""
    p = Path(path)
    run = run_dir_of(p)
    if run is None or run == p:
        return p.name
    return f"{run.name}/{p.resolve().name if p.name in ('latest', 'best') else p.name}"
