"""Training: loss falls on real data, exact resume after kill -9, atomic saves, NaN guard, mismatch errors,
fine-tuning an imported llama2.c model with --init-from."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import (
    DATA_DIR,
    LLAMA2_TOKENIZER,
    REPO,
    STORIES260K,
    TOK512,
    TRAIN_HEAD,
    one_line_error,
    poison_loss_after,
    run_cli,
)
from procwatch import Lines
from tinystories.core.config import load_config
from tinystories.core.errors import UserError
from tinystories.model.checkpoint import architecture, load_model, read_checkpoint, save_checkpoint
from tinystories.training.loop import train
from tinystories.training.schedule import lr_at

TINY = ["model.dim=64", "model.n_layers=2", "model.n_heads=4", "model.max_seq_len=64", "model.dropout=0.1",
        "train.batch_size=8", "train.warmup_steps=10", "train.lr=3e-3", "train.max_minutes=null",
        "train.log_interval=1", "train.eval_tokens=4096", "train.sample_tokens=8", "train.dtype=float32",
        "train.compile=false"]


def tiny_cfg(tmp: Path, tok4k: Path, *extra: str):
    cfg = load_config(REPO / "configs" / "cpu.yaml", TINY + [f"tokenizer.path={tok4k}", f"data.source={DATA_DIR}",
                                                             f"data.data_dir={tmp / 'data'}", *extra])
    cfg.out_dir = str(tmp / "run")
    return cfg


def cli_args(tmp: Path, tok4k: Path, *extra: str) -> list[str]:
    args = ["train", "--config", str(REPO / "configs" / "cpu.yaml"), "--out", str(tmp / "run"), "--data", str(DATA_DIR)]
    for s in TINY + [f"tokenizer.path={tok4k}", f"data.data_dir={tmp / 'data'}", *extra]:
        args += ["--set", s]
    return args


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        p = json.loads(line)
        if p["kind"] == "train":
            out[p["step"]] = p["loss"]  # the last value logged for a step wins (a resumed run logs again)
    return out


def test_cosine_schedule_shape():
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=10"])
    lrs = [lr_at(s, cfg, 110) for s in range(111)]
    assert lrs[9] == pytest.approx(1e-3) and lrs[0] == pytest.approx(1e-4)
    assert lrs[60] == pytest.approx(5.5e-4)  # halfway through the decay
    assert lrs[110] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # one decay, no warm restarts


def test_run_shorter_than_its_warmup_still_decays():
    cfg = load_config(None, ["train.lr=1e-3", "train.min_lr=1e-4", "train.warmup_steps=100"])
    lrs = [lr_at(s, cfg, 50) for s in range(51)]  # 50 steps < 100 warmup steps: warm up over the first 10%
    assert lrs[0] == pytest.approx(2e-4) and lrs[4] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[50] == pytest.approx(1e-4)


def lr_points(run_dir: Path) -> list[dict]:
    return [p for p in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if p["kind"] == "train"]


@pytest.mark.slow
def test_short_extended_and_budgeted_runs_pass_doctors_lr_check(tmp_path, tok4k):
    from tinystories.evaluation.doctor import run_checks

    def lr_check(run_dir):
        return next(c for c in run_checks(run_dir, samples=0)[0] if c.name == "lr schedule")

    # 20 steps with a 100-step warmup: 2 warmup steps, then the whole cosine down to min_lr
    cfg = tiny_cfg(tmp_path, tok4k, "train.max_steps=20", "train.warmup_steps=100", "train.min_lr=3e-4",
                   "train.eval_interval=1000", "train.checkpoint_interval=1000")
    train(cfg)
    lrs = [p["lr"] for p in lr_points(tmp_path / "run")]
    assert lrs[1] == pytest.approx(3e-3) and lrs[0] == pytest.approx(1.5e-3)
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:])) and lrs[-1] < 3.5e-4
    check = lr_check(tmp_path / "run")
    assert check.status == "PASS" and "warmup 2 steps" in check.detail, check

    # extended with --resume --set train.max_steps: the cosine is stretched from step 20 on; doctor knows both lengths
    r = run_cli("train", "--resume", tmp_path / "run", "--set", "train.max_steps=30")
    assert r.returncode == 0, r.stderr
    check = lr_check(tmp_path / "run")
    assert check.status == "PASS" and "run length 20 from step 1 -> 30 from step 21" in check.detail, check

    # a time budget fixes the length after 10 steps and the run still decays; tampered rates are caught
    budget = tmp_path / "budget"
    budget.mkdir()
    cfg = tiny_cfg(budget, tok4k, "train.max_minutes=0.5", "train.warmup_steps=1000", "train.min_lr=3e-4",
                   "train.eval_interval=100000", "train.checkpoint_interval=100000")
    train(cfg)
    pts = lr_points(budget / "run")
    lengths = [p["total_steps"] for p in pts]
    fixed = next(i for i, n in enumerate(lengths) if n is not None)  # after 10 steps, or earlier at the deadline
    assert fixed <= 10 and set(lengths[:fixed]) == {None} and len(set(lengths[fixed:])) == 1
    # it ends at that length, or earlier when a slowed-down machine ran past the deadline (the budget wins)
    assert pts[-1]["step"] == lengths[-1] or pts[-1]["step"] < lengths[-1] and pts[-1]["time"] >= 0.5 * 60
    assert lr_check(budget / "run").status == "PASS"  # the warmup-only points and the fixed schedule both check
    (budget / "run" / "metrics.jsonl").write_text("".join(json.dumps({**p, "lr": 3e-3}) + "\n" for p in pts))
    assert lr_check(budget / "run").status == "FAIL"


@pytest.mark.slow
def test_loss_falls_on_real_data(tmp_path, tok4k):
    cfg = tiny_cfg(tmp_path, tok4k, "train.max_steps=60", "train.eval_interval=60")
    result = train(cfg)
    vals = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [p for p in vals if p["kind"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 60
    assert val[-1]["val_loss"] < val[0]["val_loss"] - 1.5  # 8.3 nats (uniform over 4K) -> well below
    assert 0 < val[-1]["val_bpb"] < val[0]["val_bpb"]
    ck = read_checkpoint(tmp_path / "run")
    assert ck.step == 60 and ck.state["metrics"]["val_loss"] == pytest.approx(result["metrics"]["val_loss"])
    model, ck = load_model(tmp_path / "run")
    assert model.cfg.vocab_size == 4096
    # the evaluation inside the training loop saw the weights that were saved (no stale inference state)
    from tinystories.data.cache import TokenCache
    from tinystories.model.likelihood import likelihood
    from tinystories.training.batches import validation_subset

    stream, n_bytes = validation_subset(TokenCache.open(ck.state["cache_dir"]), ck.tokenizer, cfg.train.eval_tokens)
    again = likelihood(model, stream, n_bytes, cfg.model.max_seq_len)
    assert again["loss_per_token"] == pytest.approx(ck.state["metrics"]["val_loss"], abs=1e-4)


@pytest.mark.slow
def test_exact_resume_after_kill_9(tmp_path, tok4k):
    common = ("train.max_steps=150", "train.checkpoint_interval=20", "train.eval_interval=1000")
    ref = tmp_path / "ref"
    ref.mkdir()
    r = run_cli(*cli_args(ref, tok4k, *common))
    assert r.returncode == 0, r.stderr
    killed = tmp_path / "killed"
    killed.mkdir()
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *cli_args(killed, tok4k, *common)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        Lines(proc).saved_step_at_least(40)  # it printed that the step-40 checkpoint is saved
        assert proc.poll() is None, "the run finished before it could be killed"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resumed_from = read_checkpoint(killed / "run", prefer="latest").step
    assert 40 <= resumed_from < 150
    r = run_cli("train", "--resume", killed / "run")
    assert r.returncode == 0, r.stderr
    a, b = losses(ref / "run"), losses(killed / "run")
    after = [s for s in a if s > resumed_from]
    assert len(after) >= 10
    # every loss after the resume equals the uninterrupted run's, to the last printed digit
    assert [f"{a[s]:.4f}" for s in after] == [f"{b[s]:.4f}" for s in after]
    assert [a[s] for s in after] == [b[s] for s in after]  # in fact bit for bit on CPU


@pytest.mark.slow
def test_atomic_save_survives_a_crash_mid_save(tmp_path, tok4k, monkeypatch):
    cfg = tiny_cfg(tmp_path, tok4k, "train.max_steps=20", "train.eval_interval=1000")
    train(cfg)
    run = tmp_path / "run"
    model, ck = load_model(run, prefer="latest")
    import tinystories.model.checkpoint as ckmod

    def crash(dest, *a, **k):
        dest.mkdir(parents=True)
        (dest / "model.safetensors").write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(ckmod, "write_checkpoint_dir", crash)
    with pytest.raises(OSError):
        save_checkpoint(run, model, ck.cfg, ck.tokenizer, {"step": 40}, {}, is_best=True)
    monkeypatch.undo()
    again, ck2 = load_model(run, prefer="latest")  # still the step-20 checkpoint, intact
    assert ck2.step == 20
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))


@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_last_good_checkpoint(tmp_path, tok4k, monkeypatch):
    cfg = tiny_cfg(tmp_path, tok4k, "train.max_steps=50", "train.checkpoint_interval=10", "train.eval_interval=1000")
    poison_loss_after(monkeypatch, 25)
    with pytest.raises(UserError, match="NaN/inf at step 25"):
        train(cfg)
    ck = read_checkpoint(tmp_path / "run", prefer="latest")
    assert ck.step == 20
    model, _ = load_model(tmp_path / "run", prefer="latest")
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.slow
def test_resume_with_other_tokenizer_and_arch_mismatch(tmp_path, tok4k, random_checkpoint):
    cfg = tiny_cfg(tmp_path, tok4k, "train.max_steps=5", "train.eval_interval=1000")
    train(cfg)
    run = tmp_path / "run"
    data = tmp_path / "data"
    built = sorted(p.name for p in data.rglob("*"))

    def untouched():  # a refused resume built no token cache or tokenizer, and left the run as it was
        assert sorted(p.name for p in data.rglob("*")) == built
        assert read_checkpoint(run, prefer="latest").step == 5

    # the architecture and the tokenizer are checked before anything is built, naming what to do
    r = run_cli("train", "--resume", run, "--set", "model.dim=128")
    one_line_error(r, "--resume: model.dim cannot change on resume (the run has 64)", "--set model.dim=128")
    r = run_cli("train", "--resume", run, "--set", "model.n_kv_heads=2")
    one_line_error(r, "--resume: model.n_kv_heads cannot change on resume (the run has 4)")
    r = run_cli("train", "--resume", run, "--set", f"tokenizer.path={TOK512}")
    line = one_line_error(r, "--resume: the tokenizer cannot change on resume", "tok512.model",
                          f"start a new run, or fine-tune with --init-from {run}")
    assert "vocab_size" not in line  # not the old advice to set model.vocab_size=0
    r = run_cli("train", "--resume", run, "--set", "tokenizer.path=null", "--set", "tokenizer.vocab_size=2048")
    one_line_error(r, "--resume: the tokenizer cannot change on resume", "2048")
    untouched()
    # not a training run: an imported checkpoint, a directory without config.yaml, a checkpoint inside a run
    r = run_cli("train", "--resume", random_checkpoint)
    one_line_error(r, "not a training run (an imported/exported checkpoint)",
                   f"fine-tune it with --init-from {random_checkpoint} --out NEW_RUN")
    assert not (random_checkpoint / "checkpoints").exists() and not (random_checkpoint / "metrics.jsonl").exists()
    (tmp_path / "empty").mkdir()
    one_line_error(run_cli("train", "--resume", tmp_path / "empty"), "no config.yaml",
                   "pass a run directory made by `tinystories train`, e.g. runs/cpu")
    one_line_error(run_cli("train", "--resume", run / "checkpoints" / "latest"), f"--resume {run}")
    # --config is not silently ignored, nor is --init-from
    r = run_cli("train", "--resume", run, "--config", REPO / "configs" / "cpu.yaml")
    one_line_error(r, "--config and --resume cannot be combined: a resumed run keeps its own config",
                   "change keys with --set")
    one_line_error(run_cli("train", "--resume", run, "--init-from", random_checkpoint), "cannot be combined")
    untouched()
    # a checkpoint whose weights do not fit its config's architecture
    ck = read_checkpoint(tmp_path / "run")
    text = (ck.path / "config.yaml").read_text().replace("n_layers: 2", "n_layers: 3")
    (ck.path / "config.yaml").write_text(text)
    r = run_cli("generate", "--checkpoint", ck.path, "--prompt", "Once")
    assert r.returncode == 2 and "do not match the architecture" in r.stderr
    # starting a new run over an existing one is refused without --force
    r = run_cli(*cli_args(tmp_path, tok4k, "train.max_steps=5"))
    assert r.returncode == 2 and "--resume" in r.stderr


@pytest.mark.slow
def test_finetune_imported_stories260k_with_init_from(tmp_path):
    """--init-from alone (no --config, no model keys): the architecture and the SentencePiece tokenizer come from
    the imported llama2.c checkpoint; train.* from the defaults and --set."""
    s260 = tmp_path / "s260k"
    r = run_cli("import", "llama2c", STORIES260K, "--tokenizer", TOK512, "--out", s260)
    assert r.returncode == 0, r.stderr
    run, data = tmp_path / "ft", tmp_path / "data"
    common = ["--set", f"data.data_dir={data}", "--set", "train.compile=false", "--set", "train.batch_size=4",
              "--set", "train.eval_tokens=4096", "--set", "train.sample_tokens=8", "--set", "train.lr=3e-4",
              "--set", "train.min_lr=3e-5", "--set", "train.log_interval=1"]
    # a contradicting architecture key is refused before anything is built
    r = run_cli("train", "--init-from", s260, "--data", TRAIN_HEAD, "--out", run, "--set", "train.max_steps=4",
                "--set", "model.dim=128", *common)
    one_line_error(r, "model.dim cannot differ from the --init-from checkpoint (64)", "model.dim=128")
    assert not run.exists() and not data.exists()
    r = run_cli("train", "--init-from", s260, "--data", TRAIN_HEAD, "--out", run, "--set", "train.max_steps=4",
                "--set", f"tokenizer.path={LLAMA2_TOKENIZER}", *common)
    one_line_error(r, "the tokenizer cannot differ from the --init-from checkpoint")
    assert not run.exists() and not data.exists()

    r = run_cli("train", "--init-from", s260, "--data", TRAIN_HEAD, "--out", run, "--set", "train.max_steps=4",
                "--set", "model.dropout=0.05", *common)  # dropout is not architecture: it may change
    assert r.returncode == 0, r.stderr
    assert "initialised from" in r.stdout
    val = [p for p in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if p["kind"] == "val"]
    assert val[0]["step"] == 0 and val[-1]["step"] == 4
    # it starts from the trained model: ~1.1 bits per byte (llama2.c's measurement), not the ~6.2 nats of a
    # random 512-token model
    assert 0.8 < val[0]["val_bpb"] < 1.4 and val[0]["val_loss"] < 2.0, val[0]
    assert math.isfinite(val[-1]["val_loss"]) and val[-1]["val_loss"] < 2.0, val[-1]
    src = read_checkpoint(s260)
    cfg = load_config(run / "config.yaml")
    assert architecture(cfg.model) == architecture(src.cfg.model) and cfg.model.dropout == 0.05
    assert cfg.model.max_seq_len == 512 and cfg.model.n_kv_heads == 4 and cfg.model.hidden_dim == 172
    assert Path(cfg.tokenizer.path).suffix == ".model" and Path(cfg.tokenizer.path).parent.parent == run
    ck = read_checkpoint(run, prefer="latest")
    assert ck.tokenizer.kind == "sentencepiece" and ck.tokenizer.sha256 == src.tokenizer.sha256
    assert ck.state["init_from"] == str(src.path)
    # the starting model is saved at step 0, so `best` is the lowest val loss even if fine-tuning made it worse
    best = read_checkpoint(run, prefer="best")
    assert best.state["metrics"]["val_loss"] == pytest.approx(min(p["val_loss"] for p in val))
    # the run is an ordinary run: resumable, and generate loads it
    r = run_cli("train", "--resume", run, "--set", "train.max_steps=6")
    assert r.returncode == 0 and "resumed from" in r.stdout, r.stderr
    assert read_checkpoint(run, prefer="latest").step == 6
    r = run_cli("generate", "--checkpoint", run, "--prompt", "Once upon a time", "--max-new-tokens", "20")
    assert r.returncode == 0 and "Once upon a time" in r.stdout, r.stderr


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint(tmp_path, tok4k):
    proc = subprocess.Popen([sys.executable, "-m", "tinystories", *cli_args(tmp_path, tok4k, "train.max_steps=100000",
                             "train.eval_interval=100000", "train.checkpoint_interval=100000")],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            # a child inherits an ignored SIGINT (some test libraries ignore it in pytest's
                            # process): give the trainer the default disposition, as a shell would
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines = Lines(proc)
    try:
        lines.logged_step_at_least(5)  # training, past its start
    except AssertionError:
        proc.kill()
        raise
    proc.send_signal(signal.SIGINT)
    out = lines.text()
    assert proc.wait() == 130, out[-3000:]
    assert "--resume" in out and "Traceback" not in out, out[-3000:]
    assert read_checkpoint(tmp_path / "run", prefer="latest").step > 0


@pytest.mark.slow
def test_bad_micro_batch_is_a_one_line_error(tmp_path):
    for value in ("foo", "0", "-2", "1.5"):
        r = run_cli("train", "--config", REPO / "configs" / "cpu.yaml", "--out", tmp_path / "run",
                    "--micro-batch", value)
        assert r.returncode == 2 and f"--micro-batch '{value}'" in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_early_stop_evaluates_and_saves_its_step_once(tmp_path, tok4k, monkeypatch):
    """An early stop ends the run at the evaluation that decided it: that step is evaluated once, has one
    validation row in metrics.jsonl and is saved once (the final evaluation after the loop repeated it before)."""
    import tinystories.training.loop as train_mod

    saved: list[int] = []
    real_save = train_mod.save_checkpoint

    def counting_save(run_dir, model, cfg, tok, state, *rest, **kw):
        saved.append(state["step"])
        return real_save(run_dir, model, cfg, tok, state, *rest, **kw)

    monkeypatch.setattr(train_mod, "save_checkpoint", counting_save)
    # AdamW at lr 1e-30 changes no float32 weight: the val loss after step 0 never improves, so patience 2 stops the
    # run at the evaluation of step 4 (evaluations at 0 (best), 2, 4)
    cfg = tiny_cfg(tmp_path, tok4k, "train.optimizer=adamw", "train.zero_init_residual=false", "train.lr=1e-30",
                   "train.min_lr=1e-30", "model.dropout=0", "train.max_steps=50", "train.eval_interval=2",
                   "train.checkpoint_interval=1000", "train.early_stopping_patience=2")
    result = train(cfg)
    assert result["step"] == 4
    points = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [p["step"] for p in points if p["kind"] == "val"] == [0, 2, 4]
    assert saved == [2, 4]
    assert read_checkpoint(tmp_path / "run", prefer="latest").step == 4


@pytest.mark.slow
def test_first_step_error_without_compile_is_not_a_compile_failure(tmp_path, tok4k, monkeypatch, capsys):
    """train.compile=true where the device policy turns compile off (here: Windows): an error on the first step
    (e.g. out of memory) is that error, not "torch.compile failed" followed by a retry."""
    import dataclasses

    import tinystories.model.transformer as model_mod
    import tinystories.training.loop as train_mod
    from tinystories.model.device import detect_caps

    monkeypatch.setattr(train_mod, "detect_caps",
                        lambda device: dataclasses.replace(detect_caps(device), platform="win32"))
    real_forward, calls = model_mod.Transformer.forward, {"n": 0}

    def fails_first_training_pass(self, tokens, targets=None, **kw):
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("simulated first-step failure: out of memory")
        return real_forward(self, tokens, targets, **kw)

    monkeypatch.setattr(model_mod.Transformer, "forward", fails_first_training_pass)
    cfg = tiny_cfg(tmp_path, tok4k, "train.compile=true", "train.max_steps=2", "train.eval_interval=1000")
    with pytest.raises(RuntimeError, match="simulated first-step failure"):
        train(cfg)
    out = capsys.readouterr().out
    assert "not compiled (torch.compile is off on Windows)" in out, out
    assert "torch.compile failed" not in out and calls["n"] == 1
