"""A token cache, and a tokenizer trained here, are never used silently once they changed after they were written:
the manifest records the size and SHA-256 of every file the cache is read from (and a hash of itself, which covers
its tokenizer's SHA-256); opening a cache checks sizes and sample hashes, `tinystories data verify` every byte.
Each problem is a one-line error naming the file and what to do; deleting a damaged file and rerunning
`data prepare` rebuilds it byte for byte."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import DATA_DIR, one_line_error, run_cli
from tinystories.core.errors import UserError
from tinystories.data.cache import TokenCache, prepare
from tinystories.data.integrity import SAMPLE_BYTES, file_problem, file_record, sha256_file
from tinystories.data.tokenizer import load_tokenizer


def flip_byte(path: Path, at: float | int = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[at if isinstance(at, int) else int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def built(tmp_path_factory, tok4k) -> Path:
    """A cache of the real train and validation heads, built once; tests damage copies of it."""
    path, _ = prepare(load_tokenizer(tok4k), DATA_DIR, tmp_path_factory.mktemp("cache") / "root")
    return path


@pytest.fixture
def cache(built, tmp_path) -> Path:
    dest = tmp_path / "root" / built.name
    shutil.copytree(built, dest)
    return dest


def prepare_cli(tok4k, cache: Path):
    return run_cli("data", "prepare", "--tokenizer", tok4k, "--from", DATA_DIR, "--cache-dir", cache.parent)


def test_the_manifest_records_every_file_it_lists(cache, tok4k):
    m = TokenCache.open(cache).manifest
    assert m["tokenizer"]["sha256"] == load_tokenizer(tok4k).sha256
    listed = [(s["file"], s["record"]) for sp in m["splits"].values() for s in sp["shards"]]
    listed += [(sp["docs"], sp["docs_record"]) for sp in m["splits"].values()]
    assert {name for name, _ in listed} >= {"train-00000.bin", "val-00000.bin", "train.docs.npy", "val.docs.npy"}
    for name, rec in listed:
        assert rec["sha256"] == sha256_file(cache / name) and rec["size"] == (cache / name).stat().st_size
    r = run_cli("data", "verify", "--cache", cache.parent)
    assert r.returncode == 0 and f"ok: {cache}" in r.stdout, r.stderr


@pytest.mark.parametrize("name", ["train-00000.bin", "val-00000.bin", "train.docs.npy"])
def test_a_flipped_byte_is_caught_when_the_cache_is_opened(cache, tok4k, name):
    before = (cache / name).read_bytes()
    flip_byte(cache / name)
    one_line_error(prepare_cli(tok4k, cache), str(cache / name), "checksum mismatch", "tinystories data prepare")
    with pytest.raises(UserError, match="checksum mismatch"):
        TokenCache.open(cache)
    r = run_cli("data", "verify", "--cache", cache)
    assert r.returncode == 2 and f"DAMAGED {cache / name}: checksum mismatch" in r.stdout
    # what the error says to do: delete it and rerun prepare, which rebuilds it byte for byte
    (cache / name).unlink()
    r = prepare_cli(tok4k, cache)
    assert r.returncode == 0, r.stderr
    assert (cache / name).read_bytes() == before
    assert run_cli("data", "verify", "--cache", cache).returncode == 0


def test_a_truncated_shard_is_caught_by_its_size(cache):
    shard = cache / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(UserError, match="truncated or overwritten"):
        TokenCache.open(cache)


def test_a_truncated_or_edited_manifest_is_a_one_line_error(cache, tok4k):
    mf = cache / "manifest.json"
    text = mf.read_text()
    mf.write_text(text[: len(text) // 2])
    one_line_error(prepare_cli(tok4k, cache), str(mf), "truncated or corrupt", "tinystories data prepare")
    m = json.loads(text)
    m["splits"]["train"]["tokens"] += 1  # valid JSON, a different claim
    mf.write_text(json.dumps(m))
    one_line_error(run_cli("data", "verify", "--cache", cache), "1 damaged file")
    with pytest.raises(UserError, match=f"{mf}: checksum mismatch"):
        TokenCache.open(cache)
    mf.unlink()
    assert prepare_cli(tok4k, cache).returncode == 0
    assert json.loads(mf.read_text())["splits"] == json.loads(text)["splits"]


def test_verify_reads_every_byte_where_opening_samples_the_ends(tmp_path):
    """The open-time check reads the first and last MiB of a file; `data verify` every byte, so damage in the
    middle of a large shard is caught there."""
    f = tmp_path / "big.bin"
    f.write_bytes(bytes(range(256)) * (5 * SAMPLE_BYTES // 256))
    rec = file_record(f)
    for at in (10, f.stat().st_size - 10):  # near either end: the cheap check sees it
        flip_byte(f, at)
        assert "checksum mismatch" in file_problem(f, rec, full=False)
        flip_byte(f, at)
    flip_byte(f, 0.5)
    assert "checksum mismatch" in file_problem(f, rec, full=True)


def test_a_changed_tokenizer_is_reported_by_verify(tmp_path, tok4k):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tok4k, tok_dir)
    path, _ = prepare(load_tokenizer(tok_dir), DATA_DIR / "TinyStories-valid-head.txt", tmp_path / "root")
    (tok_dir / "training-sample.json").unlink()  # a deliberate replacement, not damage: no recorded hash left
    tok = tok_dir / "tokenizer.json"
    tok.write_text(tok.read_text().replace('"dropout": null', '"dropout": null '))
    r = run_cli("data", "verify", "--cache", path)
    assert r.returncode == 2 and f"DAMAGED {tok}: changed since this cache was built" in r.stdout


def test_a_flipped_byte_in_a_trained_tokenizer_is_a_one_line_error(tmp_path, tok4k):
    tok_dir = tmp_path / "tok"
    shutil.copytree(tok4k, tok_dir)
    recorded = json.loads((tok_dir / "training-sample.json").read_text())["sha256"]
    assert recorded == sha256_file(tok_dir / "tokenizer.json")
    flip_byte(tok_dir / "tokenizer.json", 0.7)
    r = run_cli("tokenizer", "report", "--tokenizer", tok_dir, "--from", DATA_DIR, "--stories", "5")
    one_line_error(r, str(tok_dir / "tokenizer.json"), "checksum mismatch", "tokenizer train")


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MiB tmpfs (root only), unmounted afterwards."""
    import os
    import subprocess

    d = tmp_path / "small"
    d.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(d)]).returncode:
        pytest.skip("needs root to mount a tmpfs")
    yield d
    subprocess.run(["umount", str(d)])


def fill(d: Path, leave: int = 0) -> None:
    free = shutil.disk_usage(d).free
    with open(d / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def test_a_full_disk_is_a_one_line_error_and_keeps_the_old_file(full_disk):
    from tinystories.core.atomic import write_bytes_atomic

    target = full_disk / "weights.bin"
    write_bytes_atomic(target, b"old" * 1000)
    fill(full_disk, leave=2000)
    with pytest.raises(UserError, match=f"{target}: no space left on the device"):
        write_bytes_atomic(target, b"new" * 100_000)
    assert target.read_bytes() == b"old" * 1000
    assert sorted(p.name for p in full_disk.iterdir()) == ["filler", "weights.bin"]  # no temporary file left


def test_a_full_disk_while_logging_metrics_is_a_one_line_error(full_disk):
    from tinystories.core.config import RunConfig
    from tinystories.core.metrics import read_metrics
    from tinystories.training.report import Reporter

    rep = Reporter(full_disk, RunConfig(), True, 10, 0)
    fill(full_disk, leave=100)
    try:
        with pytest.raises(UserError, match="metrics.jsonl: no space left on the device"):
            for step in range(1000):
                rep.log({"kind": "train", "step": step, "loss": 1.0}, None, 10)
    finally:
        rep.close()
    (full_disk / "filler").unlink()
    assert read_metrics(full_disk)[-1]["step"] >= 0  # what was written reads back; a torn last line is skipped
