"""`tinystories plot`: the PNG is written where --out says, creating missing directories; bad --out is one line."""

from __future__ import annotations

import json

import pytest

from conftest import one_line_error, run_cli


@pytest.fixture
def run_dir(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    points = [{"kind": "val", "step": 0, "tokens": 0, "val_loss": 8.0, "val_bpb": 3.0}]
    points += [{"kind": "train", "step": s, "tokens": s * 512, "loss": 8.0 - s / 10, "lr": 1e-3} for s in range(1, 11)]
    points += [{"kind": "val", "step": 10, "tokens": 5120, "val_loss": 7.0, "val_bpb": 2.6}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(p) + "\n" for p in points))
    return d


def test_plot_creates_missing_parent_directories(run_dir, tmp_path):
    out = tmp_path / "some" / "missing" / "dir" / "x.png"
    r = run_cli("plot", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in r.stdout


def test_plot_bad_out_is_one_line(run_dir, tmp_path):
    one_line_error(run_cli("plot", run_dir, "--out", tmp_path / "x.foo"), "--out", "x.foo", ".png")
    blocker = tmp_path / "a-file"
    blocker.write_text("keep me")
    one_line_error(run_cli("plot", run_dir, "--out", blocker / "x.png"), "--out", "a-file")
    assert blocker.read_text() == "keep me"
    one_line_error(run_cli("plot", run_dir, "--out", run_dir), "--out", "directory")
    assert (run_dir / "metrics.jsonl").is_file()


def test_plot_of_a_live_run_skips_a_half_written_last_line(run_dir, tmp_path):
    # a run still training: the reader caught the trainer mid-write (no newline, not yet whole JSON)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"kind": "segment", "step": 10, "schedule": {"lr": 0.001, "min_lr": 0.0001, "warmup_steps": 1}}\n')
        f.write('{"kind": "train", "step": 11, "tokens": 5632, "lo')
    out = tmp_path / "live.png"
    r = run_cli("plot", run_dir, "--out", out)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_corrupt_middle_line_is_one_line_naming_file_and_line(run_dir, tmp_path):
    f = run_dir / "metrics.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    f.write_text("".join(lines[:4]) + '{"kind": "train", "st\n' + "".join(lines[4:]))
    one_line_error(run_cli("plot", run_dir, "--out", tmp_path / "x.png"), f"{f}:5", "corrupt")
    assert not (tmp_path / "x.png").exists()
