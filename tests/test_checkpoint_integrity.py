"""A checkpoint is never used silently when it changed after it was written: one flipped byte in the weights, the
tokenizer or the trainer state is a one-line error naming the file, and a trainer.pt replaced by a hostile pickle
cannot run code (torch.load with weights_only=True) and is refused in one line."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import pytest

from conftest import one_line_error, run_cli


def flip_byte(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    i = int(len(data) * at)
    data[i] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def s260_copy(s260, tmp_path) -> Path:
    dest = tmp_path / "ck"
    shutil.copytree(s260, dest)
    return dest


def test_a_checkpoint_records_the_sha256_of_what_it_holds(s260_copy):
    from tinystories.model.checkpoint import CHECKSUMS, WEIGHTS, sha256_file

    sums = json.loads((s260_copy / CHECKSUMS).read_text())["sha256"]
    assert sums[WEIGHTS] == sha256_file(s260_copy / WEIGHTS)
    assert {"config.yaml", "state.json"} <= set(sums) and any(n.startswith("tokenizer") for n in sums)
    r = run_cli("generate", "--checkpoint", s260_copy, "--prompt", "Once upon a time", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("name", ["model.safetensors", "tok512.model"])
def test_a_flipped_byte_is_a_one_line_error_naming_the_file(s260_copy, name):
    target = s260_copy / name if (s260_copy / name).exists() else next(s260_copy.glob("tokenizer.*"))
    flip_byte(target)
    r = run_cli("generate", "--checkpoint", s260_copy, "--prompt", "Once upon a time", "--max-new-tokens", "5")
    one_line_error(r, str(target), "checksum mismatch")


def test_checkpoints_without_a_checksum_record_still_load(s260_copy):
    """Checkpoints written before checksums were recorded load as before."""
    from tinystories.model.checkpoint import CHECKSUMS

    (s260_copy / CHECKSUMS).unlink()
    r = run_cli("generate", "--checkpoint", s260_copy, "--prompt", "Once upon a time", "--max-new-tokens", "5")
    assert r.returncode == 0, r.stderr


def test_a_truncated_checksum_record_is_a_one_line_error(s260_copy):
    from tinystories.model.checkpoint import CHECKSUMS

    record = s260_copy / CHECKSUMS
    record.write_text(record.read_text()[:40])
    r = run_cli("generate", "--checkpoint", s260_copy, "--prompt", "Once upon a time", "--max-new-tokens", "5")
    one_line_error(r, str(record), "unreadable checksum record")


class _Planted:
    """A pickle that runs code when unpickled: it would create the file `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.slow
def test_a_hostile_trainer_pt_runs_no_code_and_is_one_line(tiny_bpe_run, tmp_path):
    """An attacker who replaces trainer.pt and rewrites its checksum: the pickle's code never runs, and the user
    reads one line naming the file, not torch's advice to file a bug."""
    from tinystories.model.checkpoint import read_checkpoint, write_checksums

    run = tmp_path / "run"
    shutil.copytree(tiny_bpe_run, run, symlinks=True)
    ck = read_checkpoint(run, prefer="latest").path
    marker = tmp_path / "pwned"
    with open(ck / "trainer.pt", "wb") as f:
        pickle.dump({"optimizer": _Planted(marker)}, f)
    write_checksums(ck)
    r = run_cli("train", "--resume", run, "--set", "train.max_steps=90")
    one_line_error(r, str(ck / "trainer.pt"), "not a trainer state this toolkit wrote")
    assert not marker.exists()


@pytest.mark.slow
def test_a_flipped_byte_in_trainer_pt_is_caught_before_unpickling(tiny_bpe_run, tmp_path):
    from tinystories.model.checkpoint import read_checkpoint

    run = tmp_path / "run"
    shutil.copytree(tiny_bpe_run, run, symlinks=True)
    ck = read_checkpoint(run, prefer="latest").path
    flip_byte(ck / "trainer.pt", 0.7)
    r = run_cli("train", "--resume", run, "--set", "train.max_steps=90")
    one_line_error(r, str(ck / "trainer.pt"), "checksum mismatch")
