"""Every stage sized to the run. Small real stand-ins for the full-size behaviour: a cache of many
shards read without loading it whole, a budget-sized part of the cache, the tokenizer's bounded sample stated,
eval with --max-tokens all and progress. (Full-size figures: benchmarks/full_scale.py, not CI.)"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import DATA_DIR, TRAIN_HEAD, run_cli
from tinystories.data.cache import TokenCache, prepare
from tinystories.data.tokenizer import load_tokenizer


@pytest.fixture()
def many_shards(tmp_path, tok4k, monkeypatch):
    import tinystories.data.text as textdata

    monkeypatch.setattr(textdata, "UNIT_BYTES", 150_000)  # the 2 MB head in ~14 units, 1 story in 10 held out
    path, _ = prepare(load_tokenizer(tok4k), TRAIN_HEAD, tmp_path / "cache", val_fraction=0.1, workers=1)
    return TokenCache.open(path)


def test_training_reads_a_cache_of_many_shards(many_shards, tok4k):
    import torch

    from tinystories.training.batches import WindowSampler, validation_subset

    cache, tok = many_shards, load_tokenizer(tok4k)
    train = cache.split("train")
    assert len(train.shards) > 5 and isinstance(train.docs, np.memmap)  # the story index is mapped, not read
    sampler = WindowSampler(cache, 64, 8, 0, 0, torch.device("cpu"))
    assert len(sampler.shards) == len(train.shards) and abs(sampler.shard_p.sum() - 1) < 1e-9
    for step in range(5):
        x, y, _ = sampler.get(step, 0)
        assert x.shape == (8, 64) and torch.equal(x[:, 1:], y[:, :-1])
    val = cache.split("val")
    assert len(val.shards) > 2
    stream, n_bytes = validation_subset(cache, tok, 20_000)
    val_whole = np.concatenate([np.asarray(s) for s in val.shards])
    assert np.array_equal(stream, val_whole[: len(stream)]) and len(stream) == 20_001  # 20,000 predicted tokens
    # the whole stories' bytes from the index, plus the decoded bytes of the story the cut ends in
    n_whole = int((stream == tok.doc_start_id).sum()) - 1
    last = int(val.docs[n_whole, 0])
    tail = len(tok.decode(stream[last + 1:].tolist()).encode("utf-8"))
    assert n_bytes == int(np.asarray(val.docs[:n_whole, 1]).sum()) + tail


def test_a_part_of_the_cache_for_a_short_run(tmp_path, tok4k, monkeypatch):
    import tinystories.data.text as textdata
    from tinystories.core.config import RunConfig
    from tinystories.data.prepare import ensure_run_data

    monkeypatch.setattr(textdata, "UNIT_BYTES", 150_000)
    cfg = RunConfig.model_validate({"data": {"source": str(DATA_DIR), "data_dir": str(tmp_path / "d"),
                                             "cache_tokens": 80_000}, "tokenizer": {"path": str(tok4k)}})
    logged: list[str] = []
    _, cache = ensure_run_data(cfg, logged.append)
    part = cache.manifest["part"]
    assert part and part["units"] < part["of"] and cache.split("train").tokens >= 80_000
    said = "\n".join(logged)
    assert "a part of the cache" in said and "data.cache_tokens=80000" in said
    assert f"tinystories data prepare --tokenizer {load_tokenizer(tok4k).path} --from {DATA_DIR}" in said
    # a longer run (here: the whole cache) completes the same cache directory, reusing the part's shards
    # (the part's own shards: a unit that workers had in flight beyond the part may have been written unrecorded)
    before = {f.name: f.stat().st_mtime_ns for f in sorted(cache.path.glob("train-*.bin"))[: part["units"]]}
    cfg.data.cache_tokens = None
    _, cache2 = ensure_run_data(cfg, logged.append)
    assert cache2.path == cache.path
    after = {f.name: f.stat().st_mtime_ns for f in cache.path.glob("train-*.bin")}
    assert all(after[n] == t for n, t in before.items()) and len(after) == part["of"]
    full = TokenCache.open(cache.path).manifest
    assert full["part"] is None and full["splits"]["train"]["documents"] == 2316


def test_tokenizer_sample_is_bounded_and_stated(tmp_path):
    from tinystories.core.config import TokenizerConfig

    assert TokenizerConfig().max_stories == 100_000  # the default sample (benchmarks/tokenizer_sample.py)
    r = run_cli("tokenizer", "train", "--from", TRAIN_HEAD, "--vocab-size", "300", "--max-stories", "200",
                "--out", tmp_path / "t")
    assert r.returncode == 0, r.stderr
    assert "the first 200 stories at most" in r.stdout
    assert "trained on       the first 200 stories (0.2 MB)" in r.stdout
    r = run_cli("tokenizer", "train", "--from", TRAIN_HEAD, "--vocab-size", "300", "--max-stories", "all",
                "--out", tmp_path / "all")
    assert r.returncode == 0, r.stderr
    assert "every story" in r.stdout and "trained on       all 2,316 stories (2.1 MB)" in r.stdout
    r = run_cli("tokenizer", "report", "--tokenizer", tmp_path / "t", "--from", TRAIN_HEAD, "--stories", "20")
    assert "trained on       the first 200 stories" in r.stdout


def test_likelihood_reports_progress_and_eval_takes_all(random_checkpoint):
    from tinystories.cli import build_parser
    from tinystories.model.checkpoint import load_model
    from tinystories.model.likelihood import likelihood

    model, ck = load_model(random_checkpoint)
    stream = np.arange(3000, dtype=np.int64) % ck.tokenizer.vocab_size
    calls: list[tuple[int, int]] = []
    a = likelihood(model, stream, 10_000, window=128, batch_size=4, progress=lambda d, t: calls.append((d, t)))
    b = likelihood(model, stream, 10_000, window=128, batch_size=4)
    assert a["nats"] == b["nats"]
    assert calls[-1] == (2999, 2999) and all(x[0] < y[0] for x, y in zip(calls, calls[1:])) and len(calls) == 6
    assert build_parser().parse_args(["eval", "--checkpoint", "x", "--max-tokens", "all"]).max_tokens is None
    assert build_parser().parse_args(["eval", "--checkpoint", "x", "--max-tokens", "500"]).max_tokens == 500


COPIES = 48  # of the 2 MB train head


@pytest.mark.slow
def test_ctrl_c_stops_the_workers_and_the_rerun_resumes(tmp_path, tok4k):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    text = TRAIN_HEAD.read_bytes()
    # ~100 MB: four units of work (3 x 32 MiB + the rest), so that when the first finished unit is reported two
    # more are still being tokenized, however fast the machine (with two units the rest could finish first)
    src = tmp_path / "stories.txt"
    with open(src, "wb") as f:
        for _ in range(COPIES):
            f.write(text)
    args = [sys.executable, "-m", "tinystories", "data", "prepare", "--tokenizer", str(tok4k), "--from", str(src),
            "--cache-dir", str(tmp_path / "cache"), "--workers", "2"]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # the first progress line comes when the first unit is finished
        if "tokenizing:" in line:
            break
    workers = [int(p) for t in os.listdir(f"/proc/{proc.pid}/task")
               for p in open(f"/proc/{proc.pid}/task/{t}/children").read().split()]
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err, err[-2000:]
    def running(w: int) -> bool:
        try:
            return open(f"/proc/{w}/stat").read().split()[2] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 30  # the workers exit on their own (SIGTERM / parent death): wait for that event
    while any(running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [w for w in workers if running(w)]  # no worker left running
    [cache_dir] = list((tmp_path / "cache").iterdir())
    assert not (cache_dir / "manifest.json").exists() and (cache_dir / "unit-00000.json").exists()
    first = (cache_dir / "train-00000.bin").stat().st_mtime_ns
    r = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0 and "built in" in r.stdout, r.stderr[-2000:]
    assert (cache_dir / "train-00000.bin").stat().st_mtime_ns == first  # the finished unit was not redone
    m = TokenCache.open(cache_dir).manifest
    assert m["splits"]["train"]["documents"] + m["splits"]["val"]["documents"] == COPIES * 2316


def test_epoch_windows_read_every_target_once_per_pass(many_shards):
    """train.windows=epochs: a pass reads each shard in windows seq_len apart from one phase, so every target
    but the first phase's few is predicted exactly once; the next pass moves the phase; DDP ranks read the
    windows a single process with world x the accumulation reads; a fresh sampler (a resume) reads the same."""
    import torch

    from tinystories.training.batches import WindowSampler

    cpu = torch.device("cpu")
    seq, batch = 64, 8
    one = WindowSampler(many_shards, seq, batch, 5, 0, cpu, order="epochs", accum=4)
    n = one.windows_per_pass
    steps = -(-n // (batch * 4)) + 1  # a little over one pass
    windows = [w for s in range(steps) for m in range(4) for w in one._windows(s, m)]
    first, second = windows[:n], windows[n:]
    assert len(set(first)) == n  # no window twice in a pass
    covered = {si: np.zeros(len(one.shards[si]), int) for si in range(len(one.shards))}
    for si, o in first:
        covered[si][o + 1 : o + seq + 1] += 1  # the targets this window predicts
    for si, c in covered.items():
        inner = c[seq + 1 : len(one.shards[si]) - 2 * seq]  # away from the phase's edges
        assert inner.min() == 1 and inner.max() == 1, si
    assert len({o % seq for _, o in first}) == 1 and len({o % seq for _, o in second}) == 1
    shard_of, offset = one._windows_in_pass(1)
    assert second == list(zip(shard_of.tolist(), offset.tolist(), strict=True))[: len(second)]  # pass 2 begins
    assert len({int(one._windows_in_pass(p)[1][0]) % seq for p in range(4)}) > 1  # the phase moves
    # DDP: rank r's micro-step m = micro-step m * world + r of a single process with world x the accumulation
    for rank in range(2):
        ddp = WindowSampler(many_shards, seq, batch, 5, rank, cpu, world=2, order="epochs", accum=2)
        for s in (0, 3, steps - 1):
            for m in range(2):
                assert ddp._windows(s, m) == one._windows(s, m * 2 + rank)
    resumed = WindowSampler(many_shards, seq, batch, 5, 0, cpu, order="epochs", accum=4)
    x, y, _ = resumed.get(steps - 1, 3)
    x0, y0, _ = one.get(steps - 1, 3)
    assert torch.equal(x, x0) and torch.equal(y, y0) and torch.equal(x[:, 1:], y[:, :-1])
