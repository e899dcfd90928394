"""Shared fixtures: paths to the real data in ../shared and small checkpoints built from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared").resolve()
DATA_DIR = SHARED / "data" / "tinystories"
TRAIN_HEAD = DATA_DIR / "TinyStories-train-head.txt"
VALID_HEAD = DATA_DIR / "TinyStories-valid-head.txt"
STORIES260K = SHARED / "models" / "llama2c-stories260K" / "stories260K.bin"
TOK512 = SHARED / "models" / "llama2c-stories260K" / "tok512.model"
LLAMA2_TOKENIZER = SHARED / "models" / "llama2-tokenizer" / "tokenizer.model"

# pure unit tests (config, schedule, optimizer, device policy, memory, story statistics, CLI start-up): they run
# without ../shared; every other test uses the real data there and is skipped, saying so, where it is missing
UNIT_TEST_FILES = {"test_config.py", "test_story_stats.py", "test_optim.py", "test_device_policy.py",
                   "test_memory.py", "test_cli_startup.py", "test_sizing.py"}


def pytest_collection_modifyitems(config, items):
    if TRAIN_HEAD.is_file():
        return
    skip = pytest.mark.skip(reason=f"needs the real data in {DATA_DIR} (../shared beside the repository)")
    for item in items:
        if Path(str(item.fspath)).name not in UNIT_TEST_FILES:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def s260(tmp_path_factory) -> Path:
    """llama2.c's stories260K (a real model that writes sentences), imported through the real CLI."""
    out = tmp_path_factory.mktemp("s260") / "ck"
    r = run_cli("import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", out)
    assert r.returncode == 0, r.stderr
    return out


def poison_loss_after(monkeypatch, good_steps: int) -> None:
    """Make the training loss NaN from training forward pass `good_steps` + 1 on (a divergence, for the NaN tests)."""
    import tinystories.model.transformer as model_mod

    original, calls = model_mod.Transformer.forward, {"n": 0}

    def poisoned(self, tokens, targets=None, **kw):
        logits, loss = original(self, tokens, targets, **kw)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] > good_steps:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(model_mod.Transformer, "forward", poisoned)


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `python -m tinystories ARGS` in a subprocess (the real CLI, exit code and all)."""
    return subprocess.run(
        [sys.executable, "-m", "tinystories", *map(str, args)],
        cwd=cwd or REPO, capture_output=True, text=True, timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
    )


def one_line_error(r: subprocess.CompletedProcess, *needles: str) -> str:
    """Assert a CLI run failed the project's way: exit status 2, one `error: ...` line naming each needle on
    stderr, no traceback. Returns the line."""
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr + r.stdout, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture(scope="session")
def tok4k(tmp_path_factory) -> Path:
    """A 4,096-token BPE trained on the real train head (directory holding tokenizer.json)."""
    from tinystories.data.prepare import train_tokenizer

    out = tmp_path_factory.mktemp("tok4k")
    train_tokenizer(TRAIN_HEAD, 4096, out, None)
    return out


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, tok4k) -> Path:
    """A checkpoint directory with a tiny randomly initialised model and the real 4K tokenizer."""
    import torch

    from tinystories.core.config import RunConfig
    from tinystories.data.tokenizer import load_tokenizer
    from tinystories.model.checkpoint import write_checkpoint_dir
    from tinystories.model.transformer import Transformer

    tok = load_tokenizer(tok4k)
    cfg = RunConfig.model_validate({"model": {"vocab_size": tok.vocab_size, "dim": 64, "n_layers": 2, "n_heads": 4,
                                              "n_kv_heads": 2, "max_seq_len": 128}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    dest = tmp_path_factory.mktemp("ck") / "random"
    write_checkpoint_dir(dest, model, cfg, tok, {"step": 0})
    return dest


@pytest.fixture(scope="session")
def stories300(tmp_path_factory) -> Path:
    """The first 300 stories of the real train head, in the official format (a small raw-text source)."""
    from tinystories.data.text import iter_documents

    docs = list(iter_documents([TRAIN_HEAD], 300))
    out = tmp_path_factory.mktemp("stories300") / "stories.txt"
    out.write_text("".join(d + "\n<|endoftext|>\n" for d in docs), encoding="utf-8")
    return out


@pytest.fixture(scope="session")
def tiny_bpe_run(tmp_path_factory, tok4k, stories300) -> Path:
    """A real run directory: a tiny model (dim 64, 2 layers, grouped-query attention) trained by `tinystories train`
    for 80 steps on 300 real stories with the 4K BPE (metrics.jsonl, checkpoints/best, state.json)."""
    tmp = tmp_path_factory.mktemp("tiny-run")
    args = ["train", "--config", REPO / "configs" / "cpu.yaml", "--out", tmp / "run", "--data", stories300]
    for s in ("model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.n_kv_heads=2", "model.max_seq_len=128",
              "model.dropout=0", "train.batch_size=8", "train.max_steps=80", "train.max_minutes=null",
              "train.warmup_steps=8", "train.lr=4e-3", "train.eval_interval=40", "train.eval_tokens=4096",
              "train.log_interval=20", "train.checkpoint_interval=40", "train.sample_tokens=8", "train.dtype=float32",
              "train.compile=false", f"tokenizer.path={tok4k}", f"data.data_dir={tmp / 'data'}"):
        args += ["--set", s]
    r = run_cli(*args, timeout=1200)
    assert r.returncode == 0, r.stderr[-2000:]
    return tmp / "run"
